"""IQ4_NL and IQ4_XS quantisers of our own: 4-bit indices into llama.cpp's fixed non-linear grid.

Both types store each weight as an index into GRID, sixteen levels packed tighter near zero where
most weights lie, times a per-32 step: IQ4_NL keeps one fp16 step per block of 32, IQ4_XS one
fp16 step per super-block of 256 times a 6-bit signed code per 32. `quantize` runs the compiled
CPU op (csrc/cpu_iquants.cpp) when depthcut._C has it, else `quantize_reference`, the numpy
version here, vectorised over blocks; both run one recipe in one float order and write the same
bytes. See docs/DESIGN.md, "IQ4 quantisers".
"""
from __future__ import annotations

import numpy as np
import torch

from . import kquants
from .errors import DepthcutError
from .kquants import F32, FP16_MAX, fp16, fp16_bytes, pack_bits, step_codes, tree_sum

IQUANT_TYPES = ("iq4_nl", "iq4_xs")
SUB = 32  # weights per step
BLOCK = {"iq4_nl": SUB, "iq4_xs": kquants.QK_K}
BLOCK_BYTES = {"iq4_nl": 2 + SUB // 2, "iq4_xs": 2 + 2 + 4 + kquants.QK_K // 2}
GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
BOUNDS = (GRID[1:] + GRID[:-1]) * F32(0.5)  # a value at or above BOUNDS[k] is nearer GRID[k + 1]
# Candidate inverse scales, as level / (the sub-block's largest-magnitude weight): that weight on
# the grid's top end, then on its bottom end shifted by -7 ... +7.
TRIES = (float(-GRID[0]),) + tuple(float(GRID[0]) + k for k in range(-7, 8))
CODE_LO, CODE_HI = -32, 31  # IQ4_XS's sub-block codes, stored + 32


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one quantised row of `cols` weights."""
    block = _block(qtype)
    if cols <= 0 or cols % block:
        raise DepthcutError(f"{qtype}: rows must be a positive multiple of {block} long, got {cols}")
    return cols // block * BLOCK_BYTES[qtype]


def _block(qtype: str) -> int:
    if qtype not in BLOCK:
        raise DepthcutError(f"unknown IQ4 type {qtype!r}; expected one of {', '.join(IQUANT_TYPES)}")
    return BLOCK[qtype]


def prepare(op: str, weight, qtype: str, importance=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kquants.prepare for an IQ4 type: the fp32 CPU weight and the normalised column weights."""
    return kquants.prepare(op, weight, qtype, importance, block=_block(qtype))


def quantize(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 [rows, row_bytes(qtype, cols)]: GGML block_<qtype> blocks of each row.

    weight [rows, cols] of any float dtype; importance [cols] >= 0 (Σx² per input channel, as
    llama.cpp's imatrix) weights each column's squared error.
    """
    from .ops import quantize_blocks

    return quantize_blocks("quantize_iquant", weight, qtype, importance).numpy()


def quantize_reference(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """The same bytes as `quantize`, computed in numpy."""
    w, colw = prepare("quantize_reference", weight, qtype, importance)
    return reference_blocks(w, qtype, colw)


def reference_blocks(w: torch.Tensor, qtype: str, colw: torch.Tensor | None) -> np.ndarray:
    """Quantises checked inputs (see `prepare`)."""
    return kquants.blockwise(w, colw, BLOCK[qtype], row_bytes(qtype, w.shape[1]), lambda x, cw: _blocks(x, cw, qtype))


# ----------------------------------------------------------------------------- the numpy recipe


def nearest(v: np.ndarray) -> np.ndarray:
    """Index of the GRID level nearest each v (ties to the upper one)."""
    return np.searchsorted(BOUNDS, v, side="right")


def element_weights(x: np.ndarray, colw: np.ndarray | None) -> np.ndarray:
    """x² without importance (llama.cpp's IQ4 choice); else colw · sqrt(σ² + x²), σ² = 2 · mean x²
    of the block (32 or 256 weights)."""
    xx = x * x
    if colw is None:
        return xx
    sigma2 = tree_sum(xx) * F32(2.0 / x.shape[-1])
    return colw * np.sqrt(sigma2[:, None] + xx)


def fit_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Signed scale per sub-block row of x [m, 32], maximising (Σ w x g)² / Σ w g² (the weighted
    least-squares error drop) over the level choices g = GRID[nearest(t · x)], t in TRIES / peak."""
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)[:, 0]
    live = peak != 0
    safe_peak = np.where(live, peak, F32(1.0))
    best = np.zeros(len(x), F32)
    scale = np.zeros(len(x), F32)
    for level in TRIES:
        t = np.where(live, F32(level) / safe_peak, F32(0.0))
        g = GRID[nearest(t[:, None] * x)]
        wg = w * g
        sxg, sgg = tree_sum(wg * x), tree_sum(wg * g)
        ok = sgg > 0
        s = sxg / np.where(ok, sgg, F32(1.0))
        gain = sxg * s
        take = ok & (gain > best)
        best, scale = np.where(take, gain, best), np.where(take, s, scale)
    return scale


def _levels(x: np.ndarray, w: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices of blocks x [n, L] on per-32 steps [n, L / 32] (index of 0 where a step is 0)
    and the weighted error Σ w (step · GRID[index] − x)² [n]."""
    st = np.repeat(steps, SUB, 1)
    ok = st != 0
    idx = nearest(np.where(ok, x / np.where(ok, st, F32(1.0)), F32(0.0)))
    diff = st * GRID[idx] - x
    return idx, tree_sum(w * diff * diff)


def refit_step(x, w, codes, d) -> tuple[np.ndarray, np.ndarray]:
    """(indices, d): the levels on steps d · codes, then one weighted least-squares refit of the
    fp16 block step d for those levels, kept per block where it lowers the error."""
    idx, err = _levels(x, w, d.astype(F32)[:, None] * codes)
    a = np.repeat(codes, SUB, 1) * GRID[idx]
    wa = w * a
    saa, sxa = tree_sum(wa * a), tree_sum(wa * x)
    ok = saa > 0
    nd = sxa / np.where(ok, saa, F32(1.0))
    ok = ok & (np.abs(nd) <= F32(FP16_MAX))
    d2 = np.where(ok, fp16(np.where(ok, nd, F32(0.0))), d)
    idx2, err2 = _levels(x, w, d2.astype(F32)[:, None] * codes)
    take = err2 < err
    return np.where(take[:, None], idx2, idx), np.where(take, d2, d)


def _blocks(x: np.ndarray, colw: np.ndarray | None, qtype: str) -> np.ndarray:
    """uint8 [n, block bytes] for blocks x [n, BLOCK[qtype]]."""
    n = len(x)
    w = element_weights(x, colw)
    s = fit_scales(x.reshape(-1, SUB), w.reshape(-1, SUB)).reshape(n, -1)
    if qtype == "iq4_nl":
        d, codes = fp16(s[:, 0]), np.ones((n, 1), F32)
    else:  # the largest-magnitude scale gets code -32, the grid's longer end
        peak = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)[:, 0]
        d = fp16(-peak / F32(-CODE_LO))
        codes = step_codes(s, d.astype(F32), CODE_LO, CODE_HI)
    idx, d = refit_step(x, w, codes, d)
    return _pack(qtype, idx.astype(np.uint8), codes, d)


def _pack(qtype: str, idx: np.ndarray, codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """block_iq4_nl: d, qs[16]; block_iq4_xs: d, scales_h (2 bits a code), scales_l (4 bits a
    code), qs[128]. qs: per 32 weights 16 bytes, weight j in the low nibble of byte j, j + 16 in the high."""
    qs = pack_bits(idx, idx.shape[1] // SUB, 4)
    if qtype == "iq4_nl":
        return np.concatenate([fp16_bytes(d), qs], axis=1)
    u = (codes - F32(CODE_LO)).astype(np.uint8)
    return np.concatenate([fp16_bytes(d), pack_bits(u >> 4, 2, 2), pack_bits(u & 15, 4, 4), qs], axis=1)
