"""K-quant quantisers of our own: GGML's Q2_K ... Q6_K blocks, scales found by weighted least squares.

`quantize` writes rows of GGML super-blocks (256 weights each) that gguf's dequantiser and
llama.cpp read; it runs the compiled CPU op (csrc/cpu_kquants.cpp) when depthcut._C has it,
else `quantize_reference`, the vectorised numpy version here. Both follow one recipe in one
float order, so they write the same bytes. Quantising is a one-off export step: there is no
CUDA version. See docs/DESIGN.md, "K-quant quantisers".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DepthcutError

KQUANT_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
QK_K = 256
FP16_MAX = 65504.0  # the super-block scales are fp16: larger weights cannot be stored
IMPORTANCE_FLOOR = 1e-4  # of the mean importance: a channel never seen still weighs a little

# Candidate super-block steps: the largest sub-block scale gets code (edge − c), c in here.
STEP_SHRINK = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)

F32 = np.float32


@dataclass(frozen=True)
class Format:
    """One K-quant type: sub-blocks of `sub` weights, levels lo..hi, sub-block scales coded in slo..shi."""

    sub: int
    lo: int
    hi: int
    slo: int
    shi: int
    block_bytes: int
    offsets: tuple[float, ...]  # candidate inverse scales: (levels + offset) / range

    @property
    def symmetric(self) -> bool:
        return self.lo < 0


def _steps(start: float, step: float, count: int) -> tuple[float, ...]:
    return tuple(start + step * k for k in range(count))


_SYMMETRIC_STEPS = _steps(-0.9, 0.1, 19)
FORMATS = {
    "q2_k": Format(16, 0, 3, 0, 15, 84, _steps(-0.5, 0.1, 16)),
    "q3_k": Format(16, -4, 3, -32, 31, 110, _SYMMETRIC_STEPS),
    "q4_k": Format(32, 0, 15, 0, 63, 144, _steps(-1.0, 0.1, 21)),
    "q5_k": Format(32, 0, 31, 0, 63, 176, _steps(-0.5, 0.1, 16)),
    "q6_k": Format(16, -32, 31, -128, 127, 210, _SYMMETRIC_STEPS),
}


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one quantised row of `cols` weights (a multiple of 256)."""
    fmt = _format(qtype)
    if cols <= 0 or cols % QK_K:
        raise DepthcutError(f"{qtype}: rows must be a positive multiple of {QK_K} long, got {cols}")
    return cols // QK_K * fmt.block_bytes


def _format(qtype: str) -> Format:
    if qtype not in FORMATS:
        raise DepthcutError(f"unknown K-quant type {qtype!r}; expected one of {', '.join(KQUANT_TYPES)}")
    return FORMATS[qtype]


def checked_weight(op: str, weight, qtype: str, block: int, limit: float = math.inf) -> torch.Tensor:
    """``weight`` as a contiguous fp32 CPU tensor, after checking it is 2-D, float, ``block``-aligned
    rows, finite and within ±``limit`` (one min/max pass: NaN and inf show in it)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise DepthcutError(f"{op}: weight must be a 2-D float tensor, got "
                            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    cols = weight.shape[1]
    if cols == 0 or cols % block:
        raise DepthcutError(f"{op}: {qtype} needs rows a positive multiple of {block} long, got {cols} columns")
    w = weight.detach().to("cpu", torch.float32).contiguous()
    if w.numel():
        low, high = (float(v) for v in torch.aminmax(w))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise DepthcutError(f"{op}: weight holds NaN or infinite values")
        if max(-low, high) > limit:
            raise DepthcutError(f"{op}: weights beyond ±{limit:g} cannot be stored with fp16 block scales")
    return w


def prepare(op: str, weight, qtype: str, importance=None, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks the inputs; returns the fp32 CPU weight and the column weights (importance over
    its mean, floored at IMPORTANCE_FLOOR; None without importance or when it is all zero).
    ``block``: the row multiple of a qtype the caller has checked (iquants); None for a K type."""
    if block is None:
        _format(qtype)
        block = QK_K
    w = checked_weight(op, weight, qtype, block, FP16_MAX)
    cols = w.shape[1]
    if importance is None:
        return w, None
    if not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (cols,):
        shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise DepthcutError(f"{op}: importance must be a tensor of shape ({cols},), got {shape}")
    imp = importance.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise DepthcutError(f"{op}: importance must be finite and non-negative")
    mean = float(imp.double().mean())
    if mean == 0.0:
        return w, None
    return w, (imp / mean).clamp_min(IMPORTANCE_FLOOR).contiguous()


def quantize(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 [rows, row_bytes(qtype, cols)]: GGML block_<qtype> super-blocks of each row.

    weight [rows, cols] of any float dtype; importance [cols] >= 0 (Σx² per input channel,
    as llama.cpp's imatrix) weights each column's squared error.
    """
    from .ops import quantize_blocks

    return quantize_blocks("quantize_kquant", weight, qtype, importance).numpy()


def quantize_reference(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """The same bytes as `quantize`, computed in numpy (vectorised over super-blocks)."""
    w, colw = prepare("quantize_reference", weight, qtype, importance)
    return reference_blocks(w, qtype, colw)


# ----------------------------------------------------------------------------- the numpy recipe


def reference_blocks(w: torch.Tensor, qtype: str, colw: torch.Tensor | None) -> np.ndarray:
    """Quantises checked inputs (see `prepare`)."""
    return blockwise(w, colw, QK_K, row_bytes(qtype, w.shape[1]), lambda x, cw: _blocks(x, cw, qtype))


def blockwise(w: torch.Tensor, colw: torch.Tensor | None, block: int, out_bytes: int, blocks,
              chunk: int = 1 << 20) -> np.ndarray:
    """uint8 [rows, out_bytes]: ``blocks(x [n, block], column weights [n, block] or None)`` over
    the rows of w [rows, cols], about ``chunk`` weights at a time (bounded numpy temporaries)."""
    rows, cols = w.shape
    out = np.empty((rows, out_bytes), np.uint8)
    x = w.numpy()
    c = None if colw is None else colw.numpy()
    step = max(1, chunk // cols)
    for r0 in range(0, rows, step):
        part = x[r0:r0 + step].reshape(-1, block)
        cw = None if c is None else np.broadcast_to(c, (len(part) * block // cols, cols)).reshape(-1, block)
        out[r0:r0 + step] = blocks(part, cw).reshape(-1, out_bytes)
    return out


def tree_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis (a power of two long) by halving: the order the C++ op uses too."""
    while a.shape[-1] > 1:
        h = a.shape[-1] // 2
        a = a[..., :h] + a[..., h:]
    return a[..., 0]


def element_weights(x: np.ndarray, colw: np.ndarray | None) -> np.ndarray:
    """w = colw * sqrt(σ² + x²) per weight, σ² = 2 · mean x² of its super-block (x: [n, 256])."""
    sigma2 = tree_sum(x * x) * F32(2.0 / QK_K)
    w = np.sqrt(sigma2[:, None] + x * x)
    return w if colw is None else colw * w


def _safe(v: np.ndarray, ok: np.ndarray) -> np.ndarray:
    return np.where(ok, v, F32(1.0))


def _weighted_error(x, w, q, scale, low):
    diff = scale[:, None] * q + low[:, None] - x
    return tree_sum(w * diff * diff)


def fit_asymmetric(x: np.ndarray, w: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """(scale >= 0, low <= 0) per sub-block row of x, minimising Σ w (scale·q + low − x)² over
    the candidate level assignments q = clip(rint(t · (x − low₀)), 0, hi); see DESIGN.md."""
    top = F32(fmt.hi)
    xlo = np.minimum(x.min(-1), F32(0.0))
    span = x.max(-1) - xlo
    live = span > 0
    xs = x - xlo[:, None]
    scale, low = span / top, xlo  # the min/max fit is the first candidate
    q = np.clip(np.rint(np.where(live, top / _safe(span, live), F32(0.0))[:, None] * xs), 0, top)
    best = _weighted_error(x, w, q, scale, low)
    sw, sx = tree_sum(w), tree_sum(w * x)
    for off in fmt.offsets:
        t = np.where(live, (top + F32(off)) / _safe(span, live), F32(0.0))
        q = np.clip(np.rint(t[:, None] * xs), 0, top)
        wq = w * q
        sq, sqq, sxq = tree_sum(wq), tree_sum(wq * q), tree_sum(wq * x)
        det = sw * sqq - sq * sq
        ok = det > 0
        s = (sw * sxq - sx * sq) / _safe(det, ok)
        lo = (sqq * sx - sq * sxq) / _safe(det, ok)
        pin = lo > 0  # the low end must not rise above zero: refit the scale alone
        s = np.where(pin, sxq / _safe(sqq, ok), s)
        lo = np.where(pin, F32(0.0), lo)
        err = _weighted_error(x, w, q, s, lo)
        take = ok & (s >= 0) & (err < best)
        best, scale, low = np.where(take, err, best), np.where(take, s, scale), np.where(take, lo, low)
    return scale, low


def fit_symmetric(x: np.ndarray, w: np.ndarray, fmt: Format) -> np.ndarray:
    """Signed scale per sub-block row of x, maximising (Σ w x q)² / Σ w q² (the least-squares
    error drop) over q = clip(rint(t · x), lo, hi), t = −(|lo| + offset) / (x of largest |x|)."""
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    live = peak != 0
    best = np.zeros(len(x), F32)
    scale = np.zeros(len(x), F32)
    for off in fmt.offsets:
        t = np.where(live, -(F32(-fmt.lo) + F32(off)) / _safe(peak, live), F32(0.0))
        q = np.clip(np.rint(t[:, None] * x), fmt.lo, fmt.hi)
        wq = w * q
        sxq, sqq = tree_sum(wq * x), tree_sum(wq * q)
        ok = sqq > 0
        s = sxq / _safe(sqq, ok)
        gain = sxq * s
        take = ok & (gain > best)
        best, scale = np.where(take, gain, best), np.where(take, s, scale)
    return scale


def step_codes(v: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integer codes of values v [n, k] on the fp16 step d [n] (0 where d is 0)."""
    ok = d != 0
    return np.where(ok[:, None], np.clip(np.rint(v / _safe(d, ok)[:, None]), lo, hi), F32(0.0))


def fp16(v: np.ndarray) -> np.ndarray:
    """fp16 of v, with +0 for −0 (so equal inputs give equal bytes whatever order found them)."""
    return (v + F32(0.0)).astype(np.float16)


def _levels(x, w, ls, lm, d, dmin, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Levels q [n, 256] (lo..hi) of super-blocks x on each sub-block's step d·ls (less its low
    end dmin·lm, for the asymmetric types; lm None otherwise) and the weighted error Σ w (value − x)² [n]."""
    step = np.repeat(d.astype(F32)[:, None] * ls, fmt.sub, 1)
    ok = step != 0
    shift = None if lm is None else np.repeat(dmin.astype(F32)[:, None] * lm, fmt.sub, 1)
    y = x if shift is None else x + shift
    q = np.where(ok, np.clip(np.rint(y / _safe(step, ok)), fmt.lo, fmt.hi), F32(0.0))
    diff = (step * q if shift is None else step * q - shift) - x
    return q, tree_sum(w * diff * diff)


def refit_steps(x, w, ls, lm, d, dmin, fmt: Format):
    """(levels, d, dmin): one weighted least-squares refit of the fp16 super-block steps for the
    chosen codes, x ≈ d·(ls·q) − dmin·lm, kept per super-block where it lowers the error."""
    q, err = _levels(x, w, ls, lm, d, dmin, fmt)
    a = np.repeat(ls, fmt.sub, 1) * q
    wa = w * a
    saa, sxa = tree_sum(wa * a), tree_sum(wa * x)
    if lm is None:
        ok = saa > 0
        nd, nm = sxa / _safe(saa, ok), None
    else:
        b = np.repeat(lm, fmt.sub, 1)
        wb = w * b
        sab, sbb, sxb = tree_sum(wa * b), tree_sum(wb * b), tree_sum(wb * x)
        det = saa * sbb - sab * sab
        ok = det > 0
        nd = (sbb * sxa - sab * sxb) / _safe(det, ok)
        nm = (sab * sxa - saa * sxb) / _safe(det, ok)
        ok = ok & (nd > 0) & (nm >= 0) & (nm <= F32(FP16_MAX))
    ok = ok & (np.abs(nd) <= F32(FP16_MAX))
    d2 = np.where(ok, fp16(np.where(ok, nd, F32(0.0))), d)
    m2 = None if lm is None else np.where(ok, fp16(np.where(ok, nm, F32(0.0))), dmin)
    q2, err2 = _levels(x, w, ls, lm, d2, m2, fmt)
    take = err2 < err
    q = np.where(take[:, None], q2, q)
    return q, np.where(take, d2, d), None if lm is None else np.where(take, m2, dmin)


def _pick(take: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Per super-block choice between arrays whose first axis is the super-block."""
    return np.where(take.reshape(-1, *[1] * (new.ndim - 1)), new, old)


def choose_codes(x, w, s, m, fmt: Format):
    """(ls, lm, d, dmin): the fp16 super-block steps and the sub-block codes of the scales s
    [n, k] (and mins m ≥ 0, None for the symmetric types). The largest scale gets code
    edge ∓ c for each c in STEP_SHRINK (the step d first, then dmin); each super-block keeps
    the candidate of lowest weighted error after re-levelling."""
    lo = fmt.slo if fmt.symmetric else 0
    if fmt.symmetric:
        peak = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)[:, 0]
        lm = dmin = None
    else:
        peak, mpeak = s.max(-1), m.max(-1)
        dmin = fp16(mpeak / F32(fmt.shi))
        lm = step_codes(m, dmin.astype(F32), 0, fmt.shi)
    best = np.full(len(x), np.inf, F32)
    d = ls = None
    for c in STEP_SHRINK:
        dc = fp16(peak / (F32(fmt.slo) + F32(c) if fmt.symmetric else F32(fmt.shi) - F32(c)))
        lsc = step_codes(s, dc.astype(F32), lo, fmt.shi)
        _, err = _levels(x, w, lsc, lm, dc, dmin, fmt)
        take = err < best
        best, d, ls = np.where(take, err, best), dc if d is None else _pick(take, dc, d), \
            lsc if ls is None else _pick(take, lsc, ls)
    for c in STEP_SHRINK[1:] if lm is not None else ():
        mc = fp16(mpeak / (F32(fmt.shi) - F32(c)))
        lmc = step_codes(m, mc.astype(F32), 0, fmt.shi)
        _, err = _levels(x, w, ls, lmc, d, mc, fmt)
        take = err < best
        best, dmin, lm = np.where(take, err, best), _pick(take, mc, dmin), _pick(take, lmc, lm)
    return ls, lm, d, dmin


def _blocks(x: np.ndarray, colw: np.ndarray | None, qtype: str) -> np.ndarray:
    """uint8 [n, block_bytes] for super-blocks x [n, 256]."""
    fmt = FORMATS[qtype]
    n = len(x)
    k = QK_K // fmt.sub
    w = element_weights(x, colw)
    xs, ws = x.reshape(-1, fmt.sub), w.reshape(-1, fmt.sub)
    if fmt.symmetric:
        s, m = fit_symmetric(xs, ws, fmt).reshape(n, k), None
    else:
        s, lo = fit_asymmetric(xs, ws, fmt)
        s, m = s.reshape(n, k), F32(0.0) - lo.reshape(n, k)
    ls, lm, d, dmin = choose_codes(x, w, s, m, fmt)
    q, d, dmin = refit_steps(x, w, ls, lm, d, dmin, fmt)
    return _pack(qtype, (q - F32(fmt.lo)).astype(np.uint8), ls, lm, d, dmin)


# ----------------------------------------------------------------------------- GGML byte layouts


def pack_bits(q: np.ndarray, groups: int, width: int) -> np.ndarray:
    """Packs q [n, groups * per_byte * span] into bytes: element g·P·S + p·S + j goes to byte
    g·S + j at bit p·width, with P = 8 // width values per byte and S bytes per group."""
    n = len(q)
    per = 8 // width
    q = q.reshape(n, groups, per, -1).astype(np.uint8)
    out = np.zeros((n, groups, q.shape[-1]), np.uint8)
    for p in range(per):
        out |= q[:, :, p] << np.uint8(p * width)
    return out.reshape(n, -1)


def _pack_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return np.concatenate([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)],
                          axis=1).astype(np.uint8)


def _pack_q3_scales(u: np.ndarray) -> np.ndarray:
    """The 12 scale bytes of Q3_K: sixteen 6-bit codes, low nibbles then high bit pairs."""
    low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    high = pack_bits(u >> 4, 1, 2)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").view(np.uint8).reshape(len(v), 2)


def _pack(qtype: str, q, ls, lm, d, dmin) -> np.ndarray:
    """The fields of block_<qtype> in GGML's order: levels q [n, 256] (≥ 0, uint8), scale codes ls
    (signed for Q3_K/Q6_K), min codes lm, fp16 d and dmin."""
    if lm is not None:
        ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    if qtype == "q2_k":
        parts = [ls | (lm << 4), pack_bits(q, 2, 2), fp16_bytes(d), fp16_bytes(dmin)]
    elif qtype == "q3_k":
        u = (ls + 32).astype(np.uint8)
        parts = [pack_bits(q >> 2, 1, 1), pack_bits(q & 3, 2, 2), _pack_q3_scales(u), fp16_bytes(d)]
    elif qtype == "q4_k":
        parts = [fp16_bytes(d), fp16_bytes(dmin), _pack_6bit(ls, lm), pack_bits(q, 4, 4)]
    elif qtype == "q5_k":
        parts = [fp16_bytes(d), fp16_bytes(dmin), _pack_6bit(ls, lm), pack_bits(q >> 4, 1, 1), pack_bits(q & 15, 4, 4)]
    else:  # q6_k: int8 scale codes
        parts = [pack_bits(q & 15, 2, 4), pack_bits(q >> 4, 2, 2), ls.astype(np.int8).view(np.uint8), fp16_bytes(d)]
    return np.concatenate(parts, axis=1)
