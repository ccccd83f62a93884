"""The legacy GGML types, blocks of 32 values: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, written by legacy
exports and by K mixes for rows off the 256 grid (every 576-wide matrix of SmolLM2).

Without importance a block is rounded from its extremes, as llama.cpp's reference quantiser and
the gguf package's copy of it do. With importance (Q4_0, Q5_0, Q5_1, the types K mixes fall back
to) the scale is searched like the K types' (docs/DESIGN.md, "GGUF export": "Importance
matrix"): each weight's error counts w = importance[col] · sqrt(σ² + x²) (σ² the row's mean x²),
19 candidate scales around the extremes' one are tried, each refitted by weighted least squares,
and the best kept. ``quantize`` runs the compiled op (csrc/cpu_legacy_quants.cpp); this module's
numpy is its reference, summing in the op's order (``kquants.tree_sum``) so both write the same
bytes. Blocks are the GGML layouts gguf's dequantiser reads.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import DepthcutError
from .kquants import checked_weight, tree_sum

BLOCK = 32
LEGACY_QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
WEIGHTED_TYPES = ("Q4_0", "Q5_0", "Q5_1")
_LEVELS = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q5_1": (0, 31)}
_TRIES = np.arange(-9, 10, dtype=np.float32) * np.float32(0.1)  # scale candidates: (extreme level + t) / extreme
_EPS = np.float32(1e-20)
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}  # per block: fp16 scale(s), (qh,) codes


def row_bytes(ttype: str, cols: int) -> int:
    """Bytes of one quantised row of ``cols`` values (``ttype`` in either case)."""
    return cols // BLOCK * _BYTES[ttype.upper()]


def quantize(data, ttype: str, importance=None) -> np.ndarray:
    """uint8 [rows, cols / 32 · block bytes]: ``data`` [rows, cols] as GGML ``ttype`` blocks,
    weighted by ``importance`` [cols] (Σx² per input channel) when given."""
    from .ops import quantize_blocks

    return quantize_blocks("quantize_legacy", torch.as_tensor(data), ttype, importance).numpy()


def prepare(op: str, weight, ttype: str, importance=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks the inputs; returns the fp32 CPU weight and the fp32 importance (or None)."""
    ttype = ttype.upper()
    if ttype not in LEGACY_QUANT_TYPES:
        raise DepthcutError(f"{op}: unknown legacy type {ttype!r}; supported: {', '.join(LEGACY_QUANT_TYPES)}")
    w = checked_weight(op, weight, ttype, BLOCK)
    cols = w.shape[1]
    if importance is None:
        return w, None
    if ttype not in WEIGHTED_TYPES:
        raise DepthcutError(f"{op}: {ttype} has no importance-weighted search ({', '.join(WEIGHTED_TYPES)} do)")
    imp = torch.as_tensor(importance).detach().to("cpu", torch.float32).contiguous()
    if tuple(imp.shape) != (cols,) or not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise DepthcutError(f"{op}: importance must be finite, non-negative and of shape ({cols},)")
    return w, imp


def reference_blocks(w: torch.Tensor, ttype: str, importance: torch.Tensor | None) -> np.ndarray:
    """The op's bytes in numpy, for checked inputs (see `prepare`): gguf's round-to-nearest
    without importance, the weighted search with it."""
    if importance is None:
        import gguf

        return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[ttype.upper()])
    return quantize_weighted(w.numpy(), ttype.upper(), importance.numpy())


def quantize_weighted(data: np.ndarray, ttype: str, importance: np.ndarray) -> np.ndarray:
    """The importance-weighted blocks of ``data`` [rows, cols] (a ``WEIGHTED_TYPES`` ttype)."""
    rows, cols = data.shape
    x = np.ascontiguousarray(data, dtype=np.float32)
    sigma2 = np.mean(x * x, axis=1, dtype=np.float64).astype(np.float32)[:, None, None]
    x = x.reshape(rows, cols // BLOCK, BLOCK)
    w = np.asarray(importance, np.float32).reshape(1, cols // BLOCK, BLOCK) * np.sqrt(sigma2 + x * x)
    x, w = x.reshape(-1, BLOCK), w.reshape(-1, BLOCK)
    lo, hi = _LEVELS[ttype]
    if ttype == "Q5_1":
        d, m = _fit_with_min(x, w, hi)
        q = np.clip(np.rint((x - m[:, None]) / _nonzero(d)[:, None]), 0, hi)
        blocks = [_half(d), _half(m), *_pack(q.astype(np.uint8))]
    else:
        d = _fit_symmetric(x, w, lo, hi)
        q = np.clip(np.rint(x / _nonzero(d)[:, None]), lo, hi) - lo
        packed = _pack(q.astype(np.uint8))
        blocks = [_half(d), *(packed if ttype == "Q5_0" else packed[1:])]
    return np.concatenate(blocks, axis=1).reshape(rows, -1)


def _fit_symmetric(x, w, lo, hi) -> np.ndarray:
    """fp16-exact scale d per block minimising Σ w (d·q − x)², q = clip(round(x / d), lo, hi)."""
    at = np.abs(x).argmax(axis=1)
    extreme = np.take_along_axis(x, at[:, None], axis=1)[:, 0]  # signed: it maps to level lo
    inv = np.where(extreme != 0, 1 / np.where(extreme != 0, extreme, 1), 0).astype(np.float32)
    best_d, best = np.zeros(len(x), np.float32), np.full(len(x), -1.0, np.float32)
    q, wq = np.empty_like(x), np.empty_like(x)
    for t in _TRIES:
        _codes(x, (lo - t) * inv, lo, hi, q)
        np.multiply(w, q, out=wq)
        sqx, sqq = _rowdot(wq, x), _rowdot(wq, q)
        score = np.where(sqq > 0, sqx * sqx / np.maximum(sqq, _EPS), 0)
        better = score > best
        best_d = np.where(better, np.where(sqq > 0, sqx / np.maximum(sqq, _EPS), 0), best_d)
        best = np.where(better, score, best)
    return _rounded(best_d)


def _fit_with_min(x, w, hi) -> tuple[np.ndarray, np.ndarray]:
    """fp16-exact (d >= 0, m) per block minimising Σ w (d·q + m − x)², q = round((x − m) / d) in 0..hi."""
    low, span = x.min(1), x.max(1) - x.min(1)
    inv = np.where(span > 0, 1 / np.where(span > 0, span, 1), 0).astype(np.float32)
    best_d, best_m = np.zeros(len(x), np.float32), low.astype(np.float32)
    best = np.full(len(x), np.inf)
    sw, swx, swxx = (s.astype(np.float64) for s in (tree_sum(w), _rowdot(w, x), _rowdot(w * x, x)))
    shifted, q, wq = x - low[:, None], np.empty_like(x), np.empty_like(x)
    for t in _TRIES:
        _codes(shifted, (hi + t) * inv, 0, hi, q)
        np.multiply(w, q, out=wq)
        swq, swqq, swqx = (s.astype(np.float64) for s in (tree_sum(wq), _rowdot(wq, q), _rowdot(wq, x)))
        det = sw * swqq - swq * swq
        ok = det > 1e-12 * np.maximum(sw * swqq, 1e-30)
        d = np.where(ok, (sw * swqx - swq * swx) / np.where(ok, det, 1), 0)
        m = np.where(ok, (swqq * swx - swq * swqx) / np.where(ok, det, 1), low)
        d, m = np.maximum(d, 0), np.where(d < 0, low, m)
        # Σ w (d q + m − x)², expanded over the block sums
        err = d * d * swqq + 2 * d * m * swq + m * m * sw - 2 * d * swqx - 2 * m * swx + swxx
        better = ok & (err < best)
        best_d, best_m, best = np.where(better, d, best_d), np.where(better, m, best_m), np.where(better, err, best)
    return _rounded(best_d.astype(np.float32)), _rounded(best_m.astype(np.float32))


def _codes(x, iscale, lo, hi, out) -> None:
    """out = clip(round(x · iscale), lo, hi), iscale per block."""
    np.multiply(x, iscale[:, None], out=out)
    np.rint(out, out=out)
    np.clip(out, lo, hi, out=out)


def _rowdot(a, b) -> np.ndarray:
    return tree_sum(a * b)


def _rounded(v: np.ndarray) -> np.ndarray:
    """v as fp16 stores it (codes are chosen for the stored scale), +0 for -0."""
    return v.astype(np.float16).astype(np.float32) + np.float32(0)


def _nonzero(d: np.ndarray) -> np.ndarray:
    return np.where(d != 0, d, np.float32(np.inf))


def _half(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _pack(q: np.ndarray) -> list[np.ndarray]:
    """[qh: the fifth bits, bit j of a little-endian uint32 for value j; qs: value j in the low and
    value j + 16 in the high nibble of byte j] of unsigned codes [blocks, 32]."""
    qh = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qh = qh.sum(1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return [qh, qs.astype(np.uint8)]
