"""Fused KL(teacher || student) between two LM heads' softmaxes, for distillation.

KL_m = sum_v p_t(v) (z_t(v) - z_s(v)) - lse_t + lse_s, with z = cap(hidden @ weight.T). Both
heads share the vocabulary but not the hidden size. As in linear_nll.py, neither [M, V] logit
matrix is ever held: the forward streams vocabulary tiles with two online logsumexps and an
online p_t-weighted sum of z_t - z_s, and the backward reuses linear_nll's gradient kernels in
their KL mode (d KL / d z_s = p_s - p_t, recomputed per tile). The teacher is a constant.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import IGNORE_INDEX
from .linear_nll import (
    _config,
    _dot_dtype,
    _grad_chunks,
    _grad_hidden,
    _grad_weight,
    _logit_tile,
    _lse_update,
    _online_lse,
    _softcap,
    _tanh,
    _vocab_splits,
)

# As linear_nll's configurations (interpreter, 16-bit GPU, fp32 GPU; the GPU ones spill-free for
# sm_90 but not yet timed on a GPU). Two fp32 logit tiles are live at once, hence the smaller row
# block than linear_nll's 16-bit forward.
_FWD_CFG = ((64, 128, 64, 4, 1), (64, 128, 64, 8, 3), (64, 64, 64, 8, 3))


# ----------------------------------------------------------------------------- reference


def linear_kl_reference(hs, ws, ht, wt, targets, softcap_s=None, softcap_t=None, chunk_size=4096):
    """Plain-torch KL(softmax(z_t) || softmax(z_s)) per row, one pass chunked over the vocabulary.

    Returns (kl [M] fp32, lse_s [M] fp32, lse_t [M] fp32); rows whose target is -100 get kl 0.
    """
    m = hs.shape[0]
    hs32, ht32 = hs.float(), ht.float()
    max_s = torch.full((m,), -math.inf, device=hs.device)
    max_t = torch.full((m,), -math.inf, device=hs.device)
    sum_s, sum_t, cross = (torch.zeros(m, device=hs.device) for _ in range(3))
    for v0 in range(0, ws.shape[0], chunk_size):
        zs = _softcap(hs32 @ ws[v0:v0 + chunk_size].float().T, softcap_s)
        zt = _softcap(ht32 @ wt[v0:v0 + chunk_size].float().T, softcap_t)
        max_s, sum_s, _ = _lse_update(max_s, sum_s, zs)
        max_t, sum_t, scale = _lse_update(max_t, sum_t, zt)
        cross = cross * scale + (torch.exp(zt - max_t[:, None]) * (zt - zs)).sum(1)
    lse_s, lse_t = max_s + torch.log(sum_s), max_t + torch.log(sum_t)
    kl = torch.where(targets != IGNORE_INDEX, cross / sum_t - lse_t + lse_s, 0.0)
    return kl, lse_s, lse_t


def linear_kl_backward_reference(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, softcap_s=None, softcap_t=None,
                                 need_weight_grad=False, chunk_size=4096):
    """Plain-torch (d/d hs in hs's dtype, d/d ws [V, H] fp32 or None) of sum(grad_kl * kl)."""
    ht32 = ht.float()

    def teacher_probs(v0, v1):
        return torch.exp(_softcap(ht32 @ wt[v0:v1].float().T, softcap_t) - lse_t[:, None])

    hs32 = hs.float()
    grad_h = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device)
    grad_w = torch.empty(ws.shape, dtype=torch.float32, device=ws.device) if need_weight_grad else None
    for v0, w, d in _grad_chunks(hs, ws, targets, lse_s, grad_kl, softcap_s, chunk_size, teacher_probs):
        grad_h += d @ w
        if need_weight_grad:
            grad_w[v0:v0 + w.shape[0]] = d.T @ hs32
    return grad_h.to(hs.dtype), grad_w


# ----------------------------------------------------------------------------- triton


@triton.jit
def _linear_kl_fwd_kernel(hs_ptr, ws_ptr, ht_ptr, wt_ptr, part_ptr, M, V, H, HT,
                          stride_hm, stride_hh, stride_wv, stride_wh, stride_tm, stride_th, stride_tv, stride_tw,
                          v_per_split, softcap_s, softcap_t, HAS_SOFTCAP_S: tl.constexpr,
                          HAS_SOFTCAP_T: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                          T_DOT_DTYPE: tl.constexpr, T_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per rows x vocabulary split: student max / sum-exp, teacher max / sum-exp and the teacher's
    sum of exp(z_t - max_t) * (z_t - z_s), written to five [splits, M] planes of part_ptr."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    max_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    max_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    sum_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_hi
        zs = _logit_tile(hs_ptr, ws_ptr, offs_m, mask_m, offs_v, mask_v, H, stride_hm, stride_hh, stride_wv,
                         stride_wh, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
        if HAS_SOFTCAP_S:
            zs = softcap_s * _tanh(zs / softcap_s)
        zt = _logit_tile(ht_ptr, wt_ptr, offs_m, mask_m, offs_v, mask_v, HT, stride_tm, stride_th, stride_tv,
                         stride_tw, T_DOT_DTYPE, T_PRECISION, BLOCK_M, BLOCK_V, BLOCK_H)
        if HAS_SOFTCAP_T:
            zt = softcap_t * _tanh(zt / softcap_t)
        max_s, sum_s, _ = _online_lse(max_s, sum_s, tl.where(mask_v[None, :], zs, float("-inf")))
        max_t, sum_t, scale = _online_lse(max_t, sum_t, tl.where(mask_v[None, :], zt, float("-inf")))
        e = tl.where(mask_v[None, :], tl.exp(zt - max_t[:, None]), 0.0)
        cross = cross * scale + tl.sum(e * (zt - zs), axis=1)

    out = part_ptr + pid_s * M + offs_m
    plane = tl.num_programs(1) * M
    tl.store(out, max_s, mask=mask_m)
    tl.store(out + plane, sum_s, mask=mask_m)
    tl.store(out + 2 * plane, max_t, mask=mask_m)
    tl.store(out + 3 * plane, sum_t, mask=mask_m)
    tl.store(out + 4 * plane, cross, mask=mask_m)


def _check(hs, ws, ht, wt, targets):
    """Shapes only: depthcut.ops validates everything else once for every backend."""
    if not (hs.dim() == ws.dim() == ht.dim() == wt.dim() == 2 and hs.shape[1] == ws.shape[1]
            and ht.shape[1] == wt.shape[1] and ws.shape[0] == wt.shape[0] and hs.shape[0] == ht.shape[0]
            and targets.shape == (hs.shape[0],)):
        raise ValueError(f"linear_kl: hs [M,H], ws [V,H], ht [M,Ht], wt [V,Ht], targets [M] expected, got "
                         f"{[tuple(t.shape) for t in (hs, ws, ht, wt, targets)]}")


def linear_kl_forward(hs, ws, ht, wt, targets, softcap_s=None, softcap_t=None):
    """Triton (kl [M] fp32, lse_s [M] fp32, lse_t [M] fp32) of KL(softmax(z_t) || softmax(z_s))."""
    _check(hs, ws, ht, wt, targets)
    (m, h), v = hs.shape, ws.shape[0]
    block_m, block_v, block_h, warps, stages = _config(_FWD_CFG, hs, ws, ht, wt)
    splits, v_per_split = _vocab_splits(m, v, block_m, block_v, hs.device)
    parts = torch.empty((5, splits, m), dtype=torch.float32, device=hs.device)
    dot_dtype, precision = _dot_dtype(hs, ws)
    t_dot_dtype, t_precision = _dot_dtype(ht, wt)
    if m:
        _linear_kl_fwd_kernel[(triton.cdiv(m, block_m), splits)](
            hs, ws, ht, wt, parts, m, v, h, ht.shape[1], *hs.stride(), *ws.stride(), *ht.stride(), *wt.stride(),
            v_per_split, float(softcap_s or 1.0), float(softcap_t or 1.0), HAS_SOFTCAP_S=softcap_s is not None,
            HAS_SOFTCAP_T=softcap_t is not None, DOT_DTYPE=dot_dtype, PRECISION=precision, T_DOT_DTYPE=t_dot_dtype,
            T_PRECISION=t_precision, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps,
            num_stages=stages)
    part_max_s, part_sum_s, part_max_t, part_sum_t, part_cross = parts
    max_s, max_t = part_max_s.amax(dim=0), part_max_t.amax(dim=0)
    lse_s = max_s + torch.log((part_sum_s * torch.exp(part_max_s - max_s)).sum(dim=0))
    scale_t = torch.exp(part_max_t - max_t)
    sum_t = (part_sum_t * scale_t).sum(dim=0)
    lse_t = max_t + torch.log(sum_t)
    kl = torch.where(targets != IGNORE_INDEX, (part_cross * scale_t).sum(dim=0) / sum_t - lse_t + lse_s, 0.0)
    return kl, lse_s, lse_t


def linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, softcap_s=None, softcap_t=None,
                       need_weight_grad=False):
    """Triton (d/d hs in hs's dtype, d/d ws [V, H] fp32 or None) of sum(grad_kl * kl).

    lse_s and lse_t come from linear_kl_forward; the weight gradient is a second pass.
    """
    _check(hs, ws, ht, wt, targets)
    teacher = (ht, wt, lse_t, softcap_t)
    grad_h = _grad_hidden(hs, ws, targets, lse_s, grad_kl, softcap_s, teacher)
    grad_w = _grad_weight(hs, ws, targets, lse_s, grad_kl, softcap_s, teacher) if need_weight_grad else None
    return grad_h, grad_w
