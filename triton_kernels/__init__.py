"""Triton kernels of depthcut, each beside its plain PyTorch reference."""
