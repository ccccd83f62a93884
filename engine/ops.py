"""The one place that picks an implementation per device.

CUDA tensors go to the Triton kernels, CPU tensors to the compiled ops
(torch.ops.depthcut) when depthcut._C is built, else to the plain torch references.
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
            raise RuntimeError("DEPTHCUT_BACKEND=ext but the compiled extension depthcut._C is not built")
        return "ext"
    if device.type == "cuda":
        return "triton"
    return "ext" if HAS_EXT and device.type == "cpu" else "reference"


def _nll_forward(hidden, weight, targets, softcap):
    backend = _backend(hidden.device)
    if backend == "ext":
        return torch.ops.depthcut.linear_nll_forward(hidden, weight, targets, float(softcap or 0.0), 0)
    from .kernels import linear_nll as K

    if backend == "triton":
        return K.linear_nll_forward(hidden, weight, targets, softcap=softcap)
    return K.linear_nll_reference(hidden, weight, targets, softcap=softcap)


def _has_ext_op(name: str, device: torch.device) -> bool:
    """Whether depthcut._C has a kernel of op `name` for `device` (CUDA builds lack the training ops)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"depthcut::{name}", key)
    except RuntimeError:  # an older build of the extension, without the op's schema
        return False


def _nll_backward(hidden, weight, targets, lse, grad_nll, softcap, need_weight_grad):
    """(grad_hidden, grad_weight fp32 or None) of sum(grad_nll * nll)."""
    backend = _backend(hidden.device)
    cap = float(softcap or 0.0)
    if backend == "ext" and need_weight_grad and _has_ext_op("linear_nll_backward_full", hidden.device):
        return torch.ops.depthcut.linear_nll_backward_full(hidden, weight, targets, lse, grad_nll, cap, 0)
    if backend == "ext" and not need_weight_grad:
        return torch.ops.depthcut.linear_nll_backward(hidden, weight, targets, lse, grad_nll, cap, 0), None
    from .kernels import linear_nll as K

    if backend == "reference" or hidden.device.type != "cuda":
        grad_w = (K.linear_nll_backward_weight_reference(hidden, weight, targets, lse, grad_nll, softcap=softcap)
                  if need_weight_grad else None)
        return K.linear_nll_backward_reference(hidden, weight, targets, lse, grad_nll, softcap=softcap), grad_w
    grad_w = (K.linear_nll_backward_weight(hidden, weight, targets, lse, grad_nll, softcap=softcap)
              if need_weight_grad else None)
    return K.linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap=softcap), grad_w


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Every backend refuses out-of-range targets alike (a silent 0 would hide a tokenizer mismatch)."""
    bad = (targets != -100) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} target id(s) outside the vocabulary [0, {vocab}) and not -100")


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
        if not any(ctx.needs_input_grad[:2]):
            return None, None, None, None
        grad_hidden, grad_weight = _nll_backward(hidden, weight, targets, lse, grad_nll.float().contiguous(),
                                                 ctx.softcap, ctx.needs_input_grad[1])
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden if ctx.needs_input_grad[0] else None, grad_weight, None, None


def linear_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               softcap: float | None = None) -> torch.Tensor:
    """Per-token NLL [M] fp32 of logits = hidden @ weight.T (softcapped if given).

    The [M, V] logits are never materialised, in the backward either. Differentiable in
    `hidden` and `weight` (the head weight gradient is computed only when asked for: full
    training, where tied embeddings receive it); targets equal to -100 give 0 and no gradient.
    """
    _check_targets(targets, weight.shape[0])
    return _LinearNLL.apply(hidden, weight, targets, softcap)


class _LinearNLLSumEager(torch.autograd.Function):
    """sum(nll) whose hidden gradient the CPU op computes in the forward, from the same logit tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):
        nll, _, grad_hidden = torch.ops.depthcut.linear_nll_forward_grad(hidden, weight, targets,
                                                                          float(softcap or 0.0), 0)
        ctx.save_for_backward(grad_hidden)
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_sum):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_sum.to(grad_hidden.dtype), None, None, None


def linear_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None = None) -> torch.Tensor:
    """sum(linear_nll(...)) as a 0-d fp32 tensor: the training loss.

    With a frozen head (LoRA) on the CPU, the hidden gradient is computed during the forward
    (two head GEMMs instead of three: no logit recomputation) and the backward only scales
    it; otherwise this is linear_nll(...).sum().
    """
    eager = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
             and _backend(hidden.device) == "ext" and _has_ext_op("linear_nll_forward_grad", hidden.device))
    if not eager:
        return linear_nll(hidden, weight, targets, softcap).sum()
    _check_targets(targets, weight.shape[0])
    return _LinearNLLSumEager.apply(hidden, weight, targets, softcap)


def _kl_forward(hs, ws, ht, wt, targets, softcap_s, softcap_t):
    backend = _backend(hs.device)
    if backend == "ext" and _has_ext_op("linear_kl_forward", hs.device):
        return torch.ops.depthcut.linear_kl_forward(hs, ws, ht, wt, targets, float(softcap_s or 0.0),
                                                   float(softcap_t or 0.0), 0)
    from .kernels import linear_kl as K

    if backend != "reference" and hs.device.type == "cuda":
        return K.linear_kl_forward(hs, ws, ht, wt, targets, softcap_s, softcap_t)
    return K.linear_kl_reference(hs, ws, ht, wt, targets, softcap_s, softcap_t)


def _kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, softcap_s, softcap_t, need_weight_grad):
    backend = _backend(hs.device)
    if backend == "ext" and _has_ext_op("linear_kl_backward", hs.device):
        grad_h, grad_w = torch.ops.depthcut.linear_kl_backward(
            hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, float(softcap_s or 0.0), float(softcap_t or 0.0),
            need_weight_grad, 0)
        return grad_h, grad_w if need_weight_grad else None
    from .kernels import linear_kl as K

    fn = (K.linear_kl_backward if backend != "reference" and hs.device.type == "cuda"
          else K.linear_kl_backward_reference)
    return fn(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, softcap_s, softcap_t, need_weight_grad=need_weight_grad)


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, softcap_s, softcap_t):
        kl, lse_s, lse_t = _kl_forward(hs, ws, ht, wt, targets, softcap_s, softcap_t)
        ctx.save_for_backward(hs, ws, ht, wt, targets, lse_s, lse_t)
        ctx.softcaps = softcap_s, softcap_t
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hs, ws, ht, wt, targets, lse_s, lse_t = ctx.saved_tensors
        if not any(ctx.needs_input_grad[:2]):
            return (None,) * 7
        grad_h, grad_w = _kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl.float().contiguous(),
                                      *ctx.softcaps, ctx.needs_input_grad[1])
        if grad_w is not None:
            grad_w = grad_w.to(ws.dtype)
        return grad_h if ctx.needs_input_grad[0] else None, grad_w, None, None, None, None, None


def linear_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
              teacher_weight: torch.Tensor, targets: torch.Tensor, student_softcap: float | None = None,
              teacher_softcap: float | None = None) -> torch.Tensor:
    """Per-token KL(teacher || student) [M] fp32 between the softmaxes of two heads' logits.

    Neither model's [M, V] logits are ever held: the vocabulary is streamed in tiles.
    Differentiable in the student's hidden states and head weight; the teacher is a
    constant. Rows whose target is -100 give 0 and no gradient (targets is only a mask).
    """
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}")
    _check_targets(targets, student_weight.shape[0])
    return _LinearKL.apply(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
                           targets, student_softcap, teacher_softcap)


def taylor_saliency(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum |W * (dy^T x)| as a 0-d fp32 tensor, without storing the weight gradient."""
    backend = _backend(x.device)
    if backend == "ext":
        return torch.ops.depthcut.taylor_saliency(x, dy, weight)
    from .kernels import taylor_saliency as K

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
    activations are `dtype` on `device`, with the signatures of depthcut.kernels.decode:
    Triton on CUDA (there are no CUDA C++ decode kernels, so also under
    DEPTHCUT_BACKEND=ext), the compiled ops for fp32 on the CPU, else the references."""
    backend = _backend(device)
    if backend == "ext" and device.type == "cpu" and dtype == torch.float32:
        ops = torch.ops.depthcut

        def attention(q, k_cache, v_cache, start, cache_pos, window, scale, softcap=None):
            return ops.decode_attention(q, k_cache, v_cache, start, cache_pos, int(window or 0), float(scale),
                                        float(softcap or 0.0))

        return ops.add_rmsnorm, ops.rope_cache_write, attention, lambda gu, gelu=False: ops.swiglu(gu, gelu)
    from .kernels import decode as K

    if device.type == "cuda" and backend != "reference":
        return K.add_rmsnorm, K.rope_cache_write, K.decode_attention, K.swiglu
    return K.add_rmsnorm_ref, K.rope_cache_write_ref, K.decode_attention_ref, K.swiglu_ref
