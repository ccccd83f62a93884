"""Triton kernels of depthcut, each beside its plain PyTorch reference."""

# Targets with this value contribute no loss (PyTorch's cross_entropy default). Defined here, where
# importing it loads no Triton, for the kernels and for the training data that masks its labels.
IGNORE_INDEX = -100
