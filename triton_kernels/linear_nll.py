"""Fused LM head + log-softmax + NLL that never materialises the [tokens x vocab] logits.

Every residual-stream variant of the scorer, and every training step, ends in the LM head;
with a 32k-150k vocabulary the logits would be the largest tensor of the pass. The kernels stream the vocabulary in tiles
with an online logsumexp (forward) and recompute the logit tiles in the backward. The head
weight gradient (full training; tied embeddings receive it) has its own vocabulary-tile-major
kernel. linear_kl.py reuses both gradient kernels, which take a KL mode.

To fill an H100 when there are few row blocks, the vocabulary is split across a second grid
axis; every split writes its own partials (max / sum-exp / target logit, or an fp32
gradient slab) and torch combines them, so results are deterministic (no float atomics).
The weight gradient splits the rows instead when there are few vocabulary tiles.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import IGNORE_INDEX

_IGNORE = tl.constexpr(IGNORE_INDEX)  # the same value, as jit-ed kernels read globals

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_M, BLOCK_V, BLOCK_H, num_warps, num_stages) under the interpreter, on the GPU for 16-bit
# dot operands, and on the GPU for fp32 ones (their operand tiles take twice the registers and
# their ieee dots are FMA loops, so they get smaller tiles). GPU values compile without register
# spills for sm_90 (ptxas -v, tests/test_triton_aot.py) but are not yet timed on a GPU; interpreter
# values keep the numpy emulation quick on tiny test shapes.
_FWD_CFG = ((64, 128, 64, 4, 1), (128, 128, 64, 8, 3), (64, 128, 64, 8, 3))
_BWD_CFG = ((64, 128, 64, 4, 1), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3))
# Weight gradient: BLOCK_M is the K of its d^T @ h dot and BLOCK_V x BLOCK_H its accumulator, the
# transpose of the hidden gradient's tiles.
_DW_CFG = ((64, 128, 64, 4, 1), (64, 128, 32, 8, 3), (64, 64, 32, 8, 3))


def _config(cfgs, *operands):
    """The row of `cfgs` (one of the triples above) for this process and these dot operands: the
    16-bit one only when all operands share one 16-bit dtype (else some dot runs in fp32)."""
    interp, half, fp32 = cfgs
    if _INTERPRET:
        return interp
    return half if _dot_dtype(*operands)[1] is None else fp32


# ----------------------------------------------------------------------------- reference


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _lse_update(run_max, run_sum, z):
    """Fold a chunk of logits into a running max / sum-exp; also returns the rescale of the old terms."""
    new_max = torch.maximum(run_max, z.amax(dim=1))
    scale = torch.exp(run_max - new_max)
    return new_max, run_sum * scale + torch.exp(z - new_max[:, None]).sum(1), scale


def linear_nll_reference(hidden, weight, targets, softcap=None, chunk_size=4096):
    """Plain-torch NLL of `targets` under softmax(hidden @ weight.T), chunked over the vocabulary.

    Returns (nll [M] fp32, lse [M] fp32); rows whose target is -100 get nll 0.
    """
    m = hidden.shape[0]
    h32 = hidden.float()
    run_max = torch.full((m,), -math.inf, device=hidden.device)
    run_sum = torch.zeros(m, device=hidden.device)
    tgt_logit = torch.zeros(m, device=hidden.device)
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, 0)
    for v0 in range(0, weight.shape[0], chunk_size):
        z = _softcap(h32 @ weight[v0:v0 + chunk_size].float().T, softcap)
        run_max, run_sum, _ = _lse_update(run_max, run_sum, z)
        in_chunk = (safe_t >= v0) & (safe_t < v0 + z.shape[1])
        picked = z.gather(1, (safe_t - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
        tgt_logit = torch.where(in_chunk, picked, tgt_logit)
    lse = run_max + torch.log(run_sum)
    nll = torch.where(valid, lse - tgt_logit, 0.0)
    return nll, lse


def _grad_chunks(hidden, weight, targets, lse, grad, softcap, chunk_size, pull):
    """Yield (v0, weight chunk fp32, grad * d loss / d raw logits) for each vocabulary chunk.

    The loss gradient w.r.t. the (capped) logits is softmax - pull(v0, v1): the distribution the
    softmax is pulled towards, a one-hot for the NLL and the teacher's softmax for the KL.
    """
    h32 = hidden.float()
    g = torch.where(targets != IGNORE_INDEX, grad.float(), 0.0)
    for v0 in range(0, weight.shape[0], chunk_size):
        w = weight[v0:v0 + chunk_size].float()
        z = _softcap(h32 @ w.T, softcap)
        d = torch.exp(z - lse[:, None]) - pull(v0, v0 + w.shape[0])
        if softcap is not None:
            d = d * (1 - (z / softcap) ** 2)
        yield v0, w, d * g[:, None]


def _one_hot(targets):
    return lambda v0, v1: (targets[:, None] == torch.arange(v0, v1, device=targets.device)[None, :]).float()


def linear_nll_backward_reference(hidden, weight, targets, lse, grad_nll, softcap=None, chunk_size=4096):
    """Plain-torch d(sum(grad_nll * nll))/d hidden, recomputing logits chunk by chunk."""
    grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for _, w, d in _grad_chunks(hidden, weight, targets, lse, grad_nll, softcap, chunk_size, _one_hot(targets)):
        grad += d @ w
    return grad.to(hidden.dtype)


def linear_nll_backward_weight_reference(hidden, weight, targets, lse, grad_nll, softcap=None, chunk_size=4096):
    """Plain-torch d(sum(grad_nll * nll))/d weight [V, H] fp32, recomputing logits chunk by chunk."""
    h32 = hidden.float()
    grad = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    for v0, w, d in _grad_chunks(hidden, weight, targets, lse, grad_nll, softcap, chunk_size, _one_hot(targets)):
        grad[v0:v0 + w.shape[0]] = d.T @ h32
    return grad


# ----------------------------------------------------------------------------- triton


@triton.jit
def _tanh(x):
    """tanh via exp(-2|x|) in (0, 1]: no overflow for any x."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_m, mask_m, offs_v, mask_v, H, stride_hm, stride_hh, stride_wv, stride_wh,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """[BLOCK_M, BLOCK_V] = hidden rows @ weight rows.T, fp32 accumulation over H tiles."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_h[None, :] * stride_hh,
                    mask=mask_m[:, None] & mask_h[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
                    mask=mask_v[None, :] & mask_h[:, None], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _online_lse(run_max, run_sum, z):
    """Fold a logit tile (masked columns at -inf) into a running max / sum-exp; also returns the
    rescale of the old terms. Every tile holds a real column, so the new max is finite."""
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    scale = tl.exp(run_max - new_max)
    return new_max, run_sum * scale + tl.sum(tl.exp(z - new_max[:, None]), axis=1), scale


@triton.jit
def _linear_nll_fwd_kernel(h_ptr, w_ptr, t_ptr, max_ptr, sum_ptr, tgt_ptr, M, V, H,
                           stride_hm, stride_hh, stride_wv, stride_wh, v_per_split, softcap,
                           HAS_SOFTCAP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=_IGNORE)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_hi
        z = _logit_tile(h_ptr, w_ptr, offs_m, mask_m, offs_v, mask_v, H, stride_hm, stride_hh, stride_wv,
                        stride_wh, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        hit = (offs_v[None, :] == tgt[:, None]) & mask_v[None, :]
        tgt_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)
        run_max, run_sum, _ = _online_lse(run_max, run_sum, tl.where(mask_v[None, :], z, float("-inf")))

    out = pid_s * M + offs_m
    tl.store(max_ptr + out, run_max, mask=mask_m)
    tl.store(sum_ptr + out, run_sum, mask=mask_m)
    tl.store(tgt_ptr + out, tgt_logit, mask=mask_m)


@triton.jit
def _grad_logit_tile(h_ptr, w_ptr, ht_ptr, wt_ptr, offs_m, mask_m, offs_v, mask_v, tgt, lse, lse_t, g, H, HT,
                     stride_hm, stride_hh, stride_wv, stride_wh, stride_tm, stride_th, stride_tv, stride_tw,
                     softcap, softcap_t, KL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, T_DOT_DTYPE: tl.constexpr,
                     T_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """g * d loss / d raw logits on one tile, fp32: softmax minus the one-hot target (NLL) or minus
    the teacher's softmax (KL), times the softcap's derivative. Zero on masked columns and where g is 0."""
    z = _logit_tile(h_ptr, w_ptr, offs_m, mask_m, offs_v, mask_v, H, stride_hm, stride_hh, stride_wv, stride_wh,
                    DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
    if KL:
        zt = _logit_tile(ht_ptr, wt_ptr, offs_m, mask_m, offs_v, mask_v, HT, stride_tm, stride_th, stride_tv,
                         stride_tw, T_DOT_DTYPE, T_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
        if HAS_SOFTCAP_T:
            zt = softcap_t * _tanh(zt / softcap_t)
        d = tl.exp(z - lse[:, None]) - tl.exp(zt - lse_t[:, None])
    else:
        d = tl.exp(z - lse[:, None]) - tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    if HAS_SOFTCAP:
        d = d * (1.0 - t * t)
    return tl.where(mask_v[None, :], d * g[:, None], 0.0)


@triton.jit
def _grad_hidden_kernel(h_ptr, w_ptr, ht_ptr, wt_ptr, t_ptr, lse_ptr, lse_t_ptr, g_ptr, M, V, H, HT,
                        stride_hm, stride_hh, stride_wv, stride_wh, stride_tm, stride_th, stride_tv, stride_tw,
                        softcap, softcap_t, slab_ptr, v_per_split,
                        KL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, T_DOT_DTYPE: tl.constexpr,
                        T_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Each program owns rows x one vocabulary split and its own fp32 slab [BLOCK_M, H].

    The slab lives in global memory (H is too wide for registers); only this program touches
    it, and a barrier after every vocabulary tile orders its read-modify-writes across threads.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=_IGNORE)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    lse_t = tl.load(lse_t_ptr + offs_m, mask=mask_m, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    g = tl.where(tgt == _IGNORE, 0.0, g)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    slab_rows = slab_ptr + (pid_s * M + offs_m)[:, None] * H

    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_hi
        d = _grad_logit_tile(h_ptr, w_ptr, ht_ptr, wt_ptr, offs_m, mask_m, offs_v, mask_v, tgt, lse, lse_t, g, H, HT,
                             stride_hm, stride_hh, stride_wv, stride_wh, stride_tm, stride_th, stride_tv, stride_tw,
                             softcap, softcap_t, KL, HAS_SOFTCAP, HAS_SOFTCAP_T, DOT_DTYPE, PRECISION, T_DOT_DTYPE,
                             T_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H).to(DOT_DTYPE)
        # The first tile overwrites the slab, so it needs no zeroing (and reruns are idempotent).
        accumulate = mask_m & (tl.zeros((BLOCK_M,), dtype=tl.int32) + v0 > v_lo)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                        mask=mask_v[:, None] & mask_h[None, :], other=0.0).to(DOT_DTYPE)
            prev = tl.load(slab_rows + offs_h[None, :], mask=accumulate[:, None] & mask_h[None, :], other=0.0)
            tl.store(slab_rows + offs_h[None, :], tl.dot(d, w, prev, input_precision=PRECISION),
                     mask=mask_m[:, None] & mask_h[None, :])
        tl.debug_barrier()


@triton.jit
def _grad_weight_kernel(h_ptr, w_ptr, ht_ptr, wt_ptr, t_ptr, lse_ptr, lse_t_ptr, g_ptr, M, V, H, HT,
                        stride_hm, stride_hh, stride_wv, stride_wh, stride_tm, stride_th, stride_tv, stride_tw,
                        softcap, softcap_t, slab_ptr, m_per_split,
                        KL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SOFTCAP_T: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, T_DOT_DTYPE: tl.constexpr,
                        T_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Each program owns one vocabulary tile x one row split and its own fp32 slab [BLOCK_V, H].

    The transpose of _grad_hidden_kernel: it streams row tiles and accumulates d^T @ hidden into
    the slab, with the same overwrite-first, barrier-per-tile discipline.
    """
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < V
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    slab_rows = slab_ptr + (pid_s * V + offs_v)[:, None] * H

    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < m_hi
        tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=_IGNORE)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        lse_t = tl.load(lse_t_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        g = tl.where(tgt == _IGNORE, 0.0, g)
        d = _grad_logit_tile(h_ptr, w_ptr, ht_ptr, wt_ptr, offs_m, mask_m, offs_v, mask_v, tgt, lse, lse_t, g, H, HT,
                             stride_hm, stride_hh, stride_wv, stride_wh, stride_tm, stride_th, stride_tv, stride_tw,
                             softcap, softcap_t, KL, HAS_SOFTCAP, HAS_SOFTCAP_T, DOT_DTYPE, PRECISION, T_DOT_DTYPE,
                             T_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
        d_t = tl.trans(d.to(DOT_DTYPE))
        accumulate = mask_v & (tl.zeros((BLOCK_V,), dtype=tl.int32) + m0 > m_lo)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_h[None, :] * stride_hh,
                        mask=mask_m[:, None] & mask_h[None, :], other=0.0).to(DOT_DTYPE)
            prev = tl.load(slab_rows + offs_h[None, :], mask=accumulate[:, None] & mask_h[None, :], other=0.0)
            tl.store(slab_rows + offs_h[None, :], tl.dot(d_t, h, prev, input_precision=PRECISION),
                     mask=mask_v[:, None] & mask_h[None, :])
        tl.debug_barrier()


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(*tensors):
    """Dot operand dtype: native 16-bit on GPU (exact products, fp32 accumulation), else fp32.

    bf16 goes through fp32 under the interpreter, whose bf16 dot is wrong.
    """
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}:
        (dt,) = dtypes
        if not (_INTERPRET and dt == torch.bfloat16):
            return _TL_DTYPE[dt], None
    return tl.float32, "ieee"


def _vocab_splits(m, v, block_m, block_v, device):
    """Split the vocabulary until there are about two programs per SM; returns (splits, cols per split).

    The weight gradient calls it with rows and vocabulary swapped, to split the rows.
    """
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    n_tiles = triton.cdiv(v, block_v)
    want = max(1, min(n_tiles, target // max(1, triton.cdiv(m, block_m))))
    tiles_per_split = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split * block_v


def _check(hidden, weight, targets):
    """Shapes only: depthcut.ops validates everything else once for every backend."""
    if not (hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
            and targets.shape == (hidden.shape[0],)):
        raise ValueError(f"linear_nll: hidden [M,H], weight [V,H], targets [M] expected, got "
                         f"{[tuple(t.shape) for t in (hidden, weight, targets)]}")


def _grad_args(hidden, weight, targets, lse, grad, softcap, teacher):
    """Leading arguments and constexprs of the gradient kernels.

    teacher is None for the NLL, or (ht, wt, lse_t, softcap_t) for the KL; the NLL passes its own
    tensors in the teacher's slots, which its compiled kernel never reads.
    """
    ht, wt, lse_t, softcap_t = (hidden, weight, lse, None) if teacher is None else teacher
    dot_dtype, precision = _dot_dtype(hidden, weight)
    t_dot_dtype, t_precision = _dot_dtype(ht, wt)
    args = (hidden, weight, ht, wt, targets.contiguous(), lse.float().contiguous(), lse_t.float().contiguous(),
            grad.contiguous(), hidden.shape[0], weight.shape[0], hidden.shape[1], ht.shape[1],
            *hidden.stride(), *weight.stride(), *ht.stride(), *wt.stride(), float(softcap or 1.0),
            float(softcap_t or 1.0))
    meta = dict(KL=teacher is not None, HAS_SOFTCAP=softcap is not None, HAS_SOFTCAP_T=softcap_t is not None,
                DOT_DTYPE=dot_dtype, PRECISION=precision, T_DOT_DTYPE=t_dot_dtype, T_PRECISION=t_precision)
    return args, meta


def _grad_hidden(hidden, weight, targets, lse, grad, softcap, teacher=None):
    """d(sum(grad * loss))/d hidden in hidden's dtype; loss is the NLL, or the KL given a teacher."""
    (m, h), v = hidden.shape, weight.shape[0]
    block_m, block_v, block_h, warps, stages = _config(_BWD_CFG, hidden, weight, *(teacher or ())[:2])
    splits, v_per_split = _vocab_splits(m, v, block_m, block_v, hidden.device)
    slab = torch.empty((splits, m, h), dtype=torch.float32, device=hidden.device)
    if m:
        args, meta = _grad_args(hidden, weight, targets, lse, grad, softcap, teacher)
        _grad_hidden_kernel[(triton.cdiv(m, block_m), splits)](
            *args, slab, v_per_split, **meta, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h,
            num_warps=warps, num_stages=stages)
    return (slab[0] if splits == 1 else slab.sum(dim=0)).to(hidden.dtype)


def _grad_weight(hidden, weight, targets, lse, grad, softcap, teacher=None):
    """d(sum(grad * loss))/d weight [V, H] fp32; loss is the NLL, or the KL given a teacher."""
    (m, h), v = hidden.shape, weight.shape[0]
    if not m:
        return torch.zeros((v, h), dtype=torch.float32, device=weight.device)
    block_m, block_v, block_h, warps, stages = _config(_DW_CFG, hidden, weight, *(teacher or ())[:2])
    splits, m_per_split = _vocab_splits(v, m, block_v, block_m, hidden.device)
    slab = torch.empty((splits, v, h), dtype=torch.float32, device=hidden.device)
    args, meta = _grad_args(hidden, weight, targets, lse, grad, softcap, teacher)
    _grad_weight_kernel[(triton.cdiv(v, block_v), splits)](
        *args, slab, m_per_split, **meta, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=warps, num_stages=stages)
    return slab[0] if splits == 1 else slab.sum(dim=0)


def linear_nll_forward(hidden, weight, targets, softcap=None):
    """Triton (nll [M] fp32, lse [M] fp32) for logits = hidden @ weight.T (optionally softcapped)."""
    _check(hidden, weight, targets)
    (m, h), v = hidden.shape, weight.shape[0]
    block_m, block_v, block_h, warps, stages = _config(_FWD_CFG, hidden, weight)
    splits, v_per_split = _vocab_splits(m, v, block_m, block_v, hidden.device)
    parts = torch.empty((3, splits, m), dtype=torch.float32, device=hidden.device)
    targets = targets.contiguous()
    dot_dtype, precision = _dot_dtype(hidden, weight)
    if m:
        _linear_nll_fwd_kernel[(triton.cdiv(m, block_m), splits)](
            hidden, weight, targets, parts[0], parts[1], parts[2], m, v, h,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), v_per_split,
            float(softcap or 1.0), HAS_SOFTCAP=softcap is not None, DOT_DTYPE=dot_dtype, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps, num_stages=stages)
    part_max, part_sum, part_tgt = parts
    run_max = part_max.amax(dim=0)
    lse = run_max + torch.log((part_sum * torch.exp(part_max - run_max)).sum(dim=0))
    # Exactly one split holds each target, the others wrote 0, so this sum is exact.
    nll = torch.where(targets != IGNORE_INDEX, lse - part_tgt.sum(dim=0), 0.0)
    return nll, lse


def linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap=None):
    """Triton d(sum(grad_nll * nll))/d hidden, in hidden's dtype; `lse` from linear_nll_forward."""
    _check(hidden, weight, targets)
    return _grad_hidden(hidden, weight, targets, lse, grad_nll, softcap)


def linear_nll_backward_weight(hidden, weight, targets, lse, grad_nll, softcap=None):
    """Triton d(sum(grad_nll * nll))/d weight [V, H] fp32; `lse` from linear_nll_forward."""
    _check(hidden, weight, targets)
    return _grad_weight(hidden, weight, targets, lse, grad_nll, softcap)
