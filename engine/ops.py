"""The one place that validates each op's inputs and picks an implementation per device.

Every op has one wrapper here that checks its inputs once (shapes, dtypes, devices, target
ids, softcaps) and raises DepthcutError, so the three implementations behind it (Triton in
depthcut.kernels, the compiled torch.ops.depthcut.* ops, the plain torch references) need
not agree on how to fail. CUDA tensors go to Triton, CPU tensors to the compiled ops when
depthcut._C is built (float32/bfloat16 for the head ops), else to the references.
DEPTHCUT_OPS=reference forces the references everywhere; DEPTHCUT_OPS=ext forces the
compiled ops wherever they have a kernel. Triton modules are imported only when needed, so
CPU-only use never compiles them. The compiled ops get fake (meta) kernels here, so they
trace under torch.compile. See docs/DESIGN.md, "Kernels and backends".
"""
from __future__ import annotations

import importlib
import math
import os

import torch
import torch.nn.functional as F

from ._ext import HAS_EXT
from .errors import DepthcutError
from .train_data import IGNORE_INDEX

_BACKENDS = ("auto", "reference", "ext")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Dtypes of the compiled CPU head kernels (csrc/cpu_rows.h, check_head); fp16 goes to the references.
_CPU_HEAD_DTYPES = (torch.float32, torch.bfloat16)


def _backend(device: torch.device) -> str:
    """'triton', 'ext' or 'reference' for tensors on `device`."""
    choice = os.environ.get("DEPTHCUT_OPS", "auto")
    if choice not in _BACKENDS:
        raise DepthcutError(f"DEPTHCUT_OPS={choice!r}; expected one of {_BACKENDS}")
    if choice == "reference":
        return "reference"
    if choice == "ext":
        if not HAS_EXT:
            raise DepthcutError("DEPTHCUT_OPS=ext but the compiled extension depthcut._C is not built")
        return "ext"
    if device.type == "cuda":
        return "triton"
    return "ext" if HAS_EXT and device.type == "cpu" else "reference"


def _has_ext_op(name: str, device: torch.device) -> bool:
    """Whether depthcut._C has a kernel of op `name` for `device` (CUDA builds lack the training ops)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"depthcut::{name}", key)
    except RuntimeError:  # an older build of the extension, without the op's schema
        return False


def _use_ext(name: str, hidden: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether head op `name` runs compiled on these operands: backend 'ext', a kernel for their
    device, and (on the CPU) dtypes it takes."""
    device = hidden.device
    return (_backend(device) == "ext" and _has_ext_op(name, device)
            and (device.type != "cpu" or all(t.dtype in _CPU_HEAD_DTYPES for t in (hidden, *others))))


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" and _backend(device) != "reference"


# ----------------------------------------------------------------------------- input checks


def _check_matrix(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise DepthcutError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise DepthcutError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_devices(op: str, *tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise DepthcutError(f"{op}: all tensors must be on one device, got {', '.join(sorted(map(str, devices)))}")


def _check_head(op: str, hidden: torch.Tensor, weight: torch.Tensor, names: str = "hidden/weight") -> None:
    """hidden [M, H] and weight [V, H] of one dtype."""
    hn, wn = names.split("/")
    _check_matrix(op, hn, hidden)
    _check_matrix(op, wn, weight)
    if hidden.shape[1] != weight.shape[1]:
        raise DepthcutError(f"{op}: {hn} {tuple(hidden.shape)} and {wn} {tuple(weight.shape)} disagree on H")
    if hidden.dtype != weight.dtype:
        raise DepthcutError(f"{op}: {hn} and {wn} dtypes differ ({hidden.dtype} vs {weight.dtype})")


def _check_targets(op: str, targets: torch.Tensor, rows: int, vocab: int) -> None:
    """int64 [rows], each id in [0, vocab) or IGNORE_INDEX (the loss skips those rows).

    Every backend refuses out-of-range ids alike (the references and Triton would give a
    silent value, hiding a tokenizer mismatch): one min/max, one device sync.
    """
    if targets.dtype != torch.int64 or tuple(targets.shape) != (rows,):
        raise DepthcutError(f"{op}: targets must be int64 [{rows}], got {targets.dtype} {tuple(targets.shape)}")
    if rows:
        lo, hi = torch.stack(torch.aminmax(targets.masked_fill(targets == IGNORE_INDEX, 0))).tolist()
        if lo < 0 or hi >= vocab:
            raise DepthcutError(f"{op}: target ids must lie in [0, {vocab}) or be {IGNORE_INDEX} (ignored), "
                                f"got ids from {lo} to {hi}")


def _check_softcap(op: str, name: str, softcap: float | None) -> None:
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < math.inf):
        raise DepthcutError(f"{op}: {name} must be a positive number or None, got {softcap!r}")


# ----------------------------------------------------------------------------- NLL


def _nll_forward(hidden, weight, targets, softcap):
    if _use_ext("linear_nll_forward", hidden):
        return torch.ops.depthcut.linear_nll_forward(hidden, weight, targets, softcap)
    from .kernels import linear_nll as K

    if _use_triton(hidden.device):
        return K.linear_nll_forward(hidden, weight, targets, softcap=softcap)
    return K.linear_nll_reference(hidden, weight, targets, softcap=softcap)


def _nll_backward(hidden, weight, targets, lse, grad_nll, softcap, need_weight_grad):
    """(grad_hidden, grad_weight fp32 or None) of sum(grad_nll * nll)."""
    if need_weight_grad and _use_ext("linear_nll_backward_full", hidden):
        return torch.ops.depthcut.linear_nll_backward_full(hidden, weight, targets, lse, grad_nll, softcap)
    if not need_weight_grad and _use_ext("linear_nll_backward", hidden):
        return torch.ops.depthcut.linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap), None
    from .kernels import linear_nll as K

    if not _use_triton(hidden.device):
        grad_w = (K.linear_nll_backward_weight_reference(hidden, weight, targets, lse, grad_nll, softcap=softcap)
                  if need_weight_grad else None)
        return K.linear_nll_backward_reference(hidden, weight, targets, lse, grad_nll, softcap=softcap), grad_w
    grad_w = (K.linear_nll_backward_weight(hidden, weight, targets, lse, grad_nll, softcap=softcap)
              if need_weight_grad else None)
    return K.linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap=softcap), grad_w


def _check_nll(op, hidden, weight, targets, softcap):
    _check_head(op, hidden, weight)
    _check_devices(op, hidden, weight, targets)
    _check_targets(op, targets, hidden.shape[0], weight.shape[0])
    _check_softcap(op, "softcap", softcap)


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
    _check_nll("linear_nll", hidden, weight, targets, softcap)
    return _LinearNLL.apply(hidden, weight, targets, softcap)


class _LinearNLLSumEager(torch.autograd.Function):
    """sum(nll) whose hidden gradient the CPU op computes in the forward, from the same logit tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap):
        nll, _, grad_hidden = torch.ops.depthcut.linear_nll_forward_grad(hidden, weight, targets, softcap)
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
    _check_nll("linear_nll_sum", hidden, weight, targets, softcap)
    if torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad \
            and _use_ext("linear_nll_forward_grad", hidden):
        return _LinearNLLSumEager.apply(hidden, weight, targets, softcap)
    return _LinearNLL.apply(hidden, weight, targets, softcap).sum()


# ----------------------------------------------------------------------------- KL


def _kl_forward(hs, ws, ht, wt, targets, softcap_s, softcap_t):
    if _use_ext("linear_kl_forward", hs, ht):
        return torch.ops.depthcut.linear_kl_forward(hs, ws, ht, wt, targets, softcap_s, softcap_t)
    from .kernels import linear_kl as K

    if _use_triton(hs.device):
        return K.linear_kl_forward(hs, ws, ht, wt, targets, softcap_s, softcap_t)
    return K.linear_kl_reference(hs, ws, ht, wt, targets, softcap_s, softcap_t)


def _kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, softcap_s, softcap_t, need_weight_grad):
    if _use_ext("linear_kl_backward", hs, ht):
        grad_h, grad_w = torch.ops.depthcut.linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl,
                                                               softcap_s, softcap_t, need_weight_grad)
        return grad_h, grad_w if need_weight_grad else None
    from .kernels import linear_kl as K

    fn = K.linear_kl_backward if _use_triton(hs.device) else K.linear_kl_backward_reference
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
    op = "linear_kl"
    _check_head(op, student_hidden, student_weight, "student_hidden/student_weight")
    _check_head(op, teacher_hidden, teacher_weight, "teacher_hidden/teacher_weight")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise DepthcutError(f"{op}: student and teacher have {student_hidden.shape[0]} and "
                            f"{teacher_hidden.shape[0]} rows")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise DepthcutError(f"{op}: student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                            f"{teacher_weight.shape[0]}")
    _check_devices(op, student_hidden, student_weight, teacher_hidden, teacher_weight, targets)
    _check_targets(op, targets, student_hidden.shape[0], student_weight.shape[0])
    _check_softcap(op, "student_softcap", student_softcap)
    _check_softcap(op, "teacher_softcap", teacher_softcap)
    return _LinearKL.apply(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(),
                           targets, student_softcap, teacher_softcap)


# ----------------------------------------------------------------------------- saliency and decode


def taylor_saliency(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum |W * (dy^T x)| as a 0-d fp32 tensor, without storing the weight gradient.

    x [M, K] is a linear layer's input, dy [M, N] its output gradient (x's dtype), weight [N, K].
    """
    op = "taylor_saliency"
    for name, t in (("x", x), ("dy", dy), ("weight", weight)):
        _check_matrix(op, name, t)
    if dy.shape[0] != x.shape[0] or tuple(weight.shape) != (dy.shape[1], x.shape[1]):
        raise DepthcutError(f"{op}: weight must be [N, K] for dy [M, N] and x [M, K], got x {tuple(x.shape)}, "
                            f"dy {tuple(dy.shape)}, weight {tuple(weight.shape)}")
    if x.dtype != dy.dtype:
        raise DepthcutError(f"{op}: x and dy dtypes differ ({x.dtype} vs {dy.dtype})")
    _check_devices(op, x, dy, weight)
    if _backend(x.device) == "ext" and _has_ext_op(op, x.device):
        return torch.ops.depthcut.taylor_saliency(x, dy, weight)
    from .kernels import taylor_saliency as K

    if _use_triton(x.device):
        return K.taylor_saliency(x, dy, weight)
    return K.taylor_saliency_reference(x, dy, weight)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias in x's dtype, for the few rows of a decode step.

    Weights may be narrower than x (fp16/bf16 weights, fp32 activations): the product
    is then the fp32 model's arithmetic on rounded weights. On the CPU the compiled op
    widens each weight vector in registers, so a step reads half the bytes of an fp32
    model (and its fp32 GEMV beats ATen's too); elsewhere the weight is cast first.
    """
    op = "decode_linear"
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise DepthcutError(f"{op}: x [..., K], weight [N, K] and bias [N] expected, got x {tuple(x.shape)}, "
                            f"weight {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    _check_devices(op, x, weight, bias)
    if x.device.type == "cpu" and x.dtype == torch.float32 and _backend(x.device) == "ext":
        return torch.ops.depthcut.decode_linear(x, weight, bias)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def decode_ops(device: torch.device, dtype: torch.dtype):
    """(add_rmsnorm, rope_cache_write, decode_attention, swiglu) for decode steps whose
    activations are `dtype` on `device`, with the signatures of depthcut.kernels.decode:
    Triton on CUDA (there are no CUDA C++ decode kernels, so also under
    DEPTHCUT_OPS=ext), the compiled ops for fp32 on the CPU, else the references."""
    backend = _backend(device)
    if backend == "ext" and device.type == "cpu" and dtype == torch.float32:
        ops = torch.ops.depthcut
        return ops.add_rmsnorm, ops.rope_cache_write, ops.decode_attention, ops.swiglu
    from .kernels import decode as K

    if device.type == "cuda" and backend != "reference":
        return K.add_rmsnorm, K.rope_cache_write, K.decode_attention, K.swiglu
    return K.add_rmsnorm_ref, K.rope_cache_write_ref, K.decode_attention_ref, K.swiglu_ref


# ----------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    """Output metadata of each compiled op, so that torch.compile and FakeTensor tracing can run them."""
    f32 = torch.float32

    def rows(t):
        return t.new_empty(t.shape[0], dtype=f32)

    def fake(name):
        return torch.library.register_fake(f"depthcut::{name}")

    @fake("linear_nll_forward")
    def _(hidden, weight, targets, softcap=None, chunk=None):
        return rows(hidden), rows(hidden)

    @fake("linear_nll_backward")
    def _(hidden, weight, targets, lse, grad_nll, softcap=None, chunk=None):
        return hidden.new_empty(hidden.shape)

    @fake("linear_nll_forward_grad")
    def _(hidden, weight, targets, softcap=None, chunk=None):
        return rows(hidden), rows(hidden), hidden.new_empty(hidden.shape)

    @fake("linear_nll_backward_full")
    def _(hidden, weight, targets, lse, grad_nll, softcap=None, chunk=None):
        return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape, dtype=f32)

    @fake("linear_kl_forward")
    def _(hs, ws, ht, wt, targets, softcap_s=None, softcap_t=None, chunk=None):
        return rows(hs), rows(hs), rows(hs)

    @fake("linear_kl_backward")
    def _(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, softcap_s=None, softcap_t=None, need_weight_grad=False,
          chunk=None):
        return hs.new_empty(hs.shape), ws.new_empty(ws.shape if need_weight_grad else (0,), dtype=f32)

    @fake("taylor_saliency")
    def _(x, dy, weight):
        return x.new_empty((), dtype=f32)

    @fake("decode_linear")
    def _(x, weight, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @fake("add_rmsnorm")
    def _(x, residual, weight, eps):
        return x.new_empty(x.shape), torch.empty_like(x)

    @fake("rope_cache_write")
    def _(qkv, cos, sin, pos, k_cache, v_cache, cache_pos, n_q, n_kv, q_norm=None, k_norm=None, eps=1e-6):
        return qkv.new_empty((qkv.shape[0], n_q, k_cache.shape[-1]))

    @fake("decode_attention")
    def _(q, k_cache, v_cache, start, cache_pos, window, scale, softcap=None):
        return q.new_empty(q.shape)

    @fake("swiglu")
    def _(gu, gelu=False):
        return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2))


if HAS_EXT:
    _register_fakes()


# ----------------------------------------------------------------------------- GGML block quantisers

# compiled op -> the module with its input checks (prepare), numpy reference (reference_blocks)
# and row size (row_bytes); docs/DESIGN.md, "GGUF export".
BLOCK_QUANTISERS = {"quantize_kquant": "kquants", "quantize_iquant": "iquants", "quantize_legacy": "legacy_quants"}


def quantize_blocks(op: str, weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [rows, bytes per row]: the GGML blocks of weight [rows, cols] written by quantiser ``op``.

    Checked and normalised once (the module's ``prepare``), then the compiled CPU op or the
    module's numpy reference; both write the same bytes. CPU only, also for CUDA weights:
    quantising is a one-off export step.
    """
    module = importlib.import_module(f"{__package__}.{BLOCK_QUANTISERS[op]}")
    w, colw = module.prepare(op, weight, qtype, importance)
    cpu = torch.device("cpu")
    if _backend(cpu) == "ext" and _has_ext_op(op, cpu):
        return getattr(torch.ops.depthcut, op)(w, qtype.lower(), colw)
    return torch.from_numpy(module.reference_blocks(w, qtype, colw))


def _block_fake(module_name: str):
    def fake(weight, qtype, importance=None):
        row_bytes = importlib.import_module(f"{__package__}.{module_name}").row_bytes
        return weight.new_empty((weight.shape[0], row_bytes(qtype, weight.shape[1])), dtype=torch.uint8)

    return fake


for _op, _module in BLOCK_QUANTISERS.items():
    if HAS_EXT and _has_ext_op(_op, torch.device("cpu")):
        torch.library.register_fake(f"depthcut::{_op}")(_block_fake(_module))
