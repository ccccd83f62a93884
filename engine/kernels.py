"""The one place that picks an implementation per device.

CUDA tensors go to the Triton kernels, CPU tensors to the compiled ops
(torch.ops.depthcut) when engine._C is built, else to the plain torch references.
DEPTHCUT_BACKEND=reference forces the references everywhere; DEPTHCUT_BACKEND=ext
forces the compiled ops on every device (the CUDA build has its own kernels).
Triton modules are imported only when needed, so CPU-only use never compiles them.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._ext import HAS_EXT

_BACKENDS = ("auto", "reference", "ext")


def _backend(device: torch.device) -> str:
    """'triton', 'ext' or 'reference' for tensors on `device`."""
    choice = os.environ.get("DEPTHCUT_BACKEND", "auto")
    if choice not in _BACKENDS:
        raise ValueError(f"DEPTHCUT_BACKEND={choice!r}; expected one of {_BACKENDS}")
    if choice == "reference":
        return "reference"
    if choice == "ext":
        if not HAS_EXT:
            raise RuntimeError("DEPTHCUT_BACKEND=ext but the compiled extension engine._C is not built")
        return "ext"
    if device.type == "cuda":
        return "triton"
    return "ext" if HAS_EXT and device.type == "cpu" else "reference"


def _nll_forward(hidden, weight, targets, softcap):
    backend = _backend(hidden.device)
    if backend == "ext":
        return torch.ops.depthcut.linear_nll_forward(hidden, weight, targets, float(softcap or 0.0), 0)
    from triton_kernels import linear_nll as K

    if backend == "triton":
        return K.linear_nll_forward(hidden, weight, targets, softcap=softcap)
    return K.linear_nll_reference(hidden, weight, targets, softcap=softcap)


def _nll_backward(hidden, weight, targets, lse, grad_nll, softcap):
    backend = _backend(hidden.device)
    if backend == "ext":
        return torch.ops.depthcut.linear_nll_backward(hidden, weight, targets, lse, grad_nll, float(softcap or 0.0), 0)
    from triton_kernels import linear_nll as K

    if backend == "triton":
        return K.linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap=softcap)
    return K.linear_nll_backward_reference(hidden, weight, targets, lse, grad_nll, softcap=softcap)


class _LinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):
        nll, lse = _nll_forward(hidden, weight, targets, softcap)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap = softcap
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = _nll_backward(hidden, weight, targets, lse, grad_nll.float().contiguous(), ctx.softcap)
        return grad_hidden, None, None, None


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               softcap: float | None = None) -> torch.Tensor:
    """Per-token NLL [M] fp32 of logits = hidden @ weight.T (softcapped if given).

    The [M, V] logits are never materialised. Differentiable in `hidden` only;
    targets equal to -100 give 0 and no gradient.
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_nll gives no weight gradient: pass weight.detach()")
    return _LinearNLL.apply(hidden, weight, targets, softcap)


def taylor_saliency(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum |W * (dy^T x)| as a 0-d fp32 tensor, without storing the weight gradient."""
    backend = _backend(x.device)
    if backend == "ext":
        return torch.ops.depthcut.taylor_saliency(x, dy, weight)
    from triton_kernels import taylor_saliency as K

    if backend == "triton":
        return K.taylor_saliency(x, dy, weight)
    return K.taylor_saliency_reference(x, dy, weight)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias in x's dtype, for the few rows of a decode step.

    Weights may be narrower than x (fp16/bf16 weights, fp32 activations): the product
    is then the fp32 model's arithmetic on rounded weights. On the CPU the compiled op
    widens each weight vector in registers, so a step reads half the bytes of an fp32
    model (and its fp32 GEMV beats ATen's too); elsewhere the weight is cast first.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and _backend(x.device) == "ext":
        return torch.ops.depthcut.decode_linear(x, weight, bias)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def decode_ops(device: torch.device, dtype: torch.dtype):
    """(add_rmsnorm, rope_cache_write, decode_attention, swiglu) for decode steps whose
    activations are `dtype` on `device`, with the signatures of triton_kernels.decode:
    Triton on CUDA (there are no CUDA C++ decode kernels, so also under
    DEPTHCUT_BACKEND=ext), the compiled ops for fp32 on the CPU, else the references."""
    backend = _backend(device)
    if backend == "ext" and device.type == "cpu" and dtype == torch.float32:
        ops = torch.ops.depthcut

        def attention(q, k_cache, v_cache, start, cache_pos, window, scale, softcap=None):
            return ops.decode_attention(q, k_cache, v_cache, start, cache_pos, int(window or 0), float(scale),
                                        float(softcap or 0.0))

        return ops.add_rmsnorm, ops.rope_cache_write, attention, lambda gu, gelu=False: ops.swiglu(gu, gelu)
    from triton_kernels import decode as K

    if device.type == "cuda" and backend != "reference":
        return K.add_rmsnorm, K.rope_cache_write, K.decode_attention, K.swiglu
    return K.add_rmsnorm_ref, K.rope_cache_write_ref, K.decode_attention_ref, K.swiglu_ref
