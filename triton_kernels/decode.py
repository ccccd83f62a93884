"""Fused decode-step kernels, each beside the plain PyTorch reference it must equal.

One decode step of a Llama-style block is launch-bound at small batch: the fusions
below cut each block to ~7 launches (norm, QKV GEMM, RoPE+cache write, attention,
O GEMM, norm, gate/up GEMM, SwiGLU, down GEMM). Rounding follows Hugging Face's
eager code (cast points included) so bf16 tokens match it except at near-ties. The other
families ride on the same kernels: per-head q/k norms inside the RoPE kernel (Qwen3,
Gemma3), an attention logit softcap (Gemma2), GeGLU in place of SwiGLU (Gemma) and a
cos/sin table per layer (Gemma3's local and global RoPE). Their fp32 C++ twins for the
CPU step are in csrc/cpu_decode.cpp, tested against the same references.

Shapes: hidden rows are [M, N] contiguous; caches are [B, Hkv, S, D]; ``cache_pos``
is a 1-element int tensor on the device holding the index being written this
step, so a captured CUDA graph replays without host-side arguments changing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _tanh(x):
    """tanh from one exp (libdevice's tanh does not run in the interpreter); exp(-2|x|)
    never overflows."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# ---------------------------------------------------------------- RMSNorm (+ residual add)

def add_rmsnorm_ref(x, residual, weight, eps):
    """h = x + residual (or x); return (RMSNorm(h) * weight, h) with HF's cast points."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * y, h


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, N, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * N + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row * N + cols, x, mask=m)
    hf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
    y = (hf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (w * y).to(x.dtype), mask=m)


def add_rmsnorm(x, residual, weight, eps):
    """Fused residual add + RMSNorm: one read of x and residual, writes y and h."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()  # kernels index rows with stride N
    y = torch.empty_like(x2)
    if residual is None:
        h, r = x, x2
    else:
        r = residual.reshape(-1, N).contiguous()
        h = torch.empty_like(x2)
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, r, weight, y, h if residual is not None else y, N, eps,
                                        HAS_RES=residual is not None, BLOCK=_next_pow2(N))
    return y.view(x.shape), h.view(x.shape)


# ---------------------------------------------------------------- RoPE + KV-cache write

def rope_cache_write_ref(qkv, cos, sin, pos, k_cache, v_cache, cache_pos, n_q, n_kv,
                         q_norm=None, k_norm=None, eps=1e-6):
    """Split merged QKV [B, (Hq+2Hkv)*D], optional per-head q/k RMSNorm (Qwen3), rotate
    q and k by the tables' rows ``pos`` [B], write k, v into the caches at ``cache_pos``;
    return q [B, Hq, D]."""
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    q, k, v = qkv.view(B, n_q + 2 * n_kv, D).split([n_q, n_kv, n_kv], dim=1)
    if q_norm is not None:
        q = add_rmsnorm_ref(q, None, q_norm, eps)[0]
        k = add_rmsnorm_ref(k, None, k_norm, eps)[0]
    c = cos[pos].to(qkv.dtype)[:, None]
    s = sin[pos].to(qkv.dtype)[:, None]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    p = int(cache_pos.reshape(-1)[0])
    k_cache[:, :, p] = k
    v_cache[:, :, p] = v
    return q


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, cp_ptr, q_ptr,
                       qn_ptr, kn_ptr, eps, S,
                       NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
                       HALF_BLOCK: tl.constexpr, HAS_NORM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF_BLOCK)
    m = i < HALF
    row = qkv_ptr + b * (NQ + 2 * NKV) * D + h * D
    x1 = tl.load(row + i, mask=m, other=0.0)
    x2 = tl.load(row + HALF + i, mask=m, other=0.0)
    dt = x1.dtype
    cp = tl.load(cp_ptr).to(tl.int64)
    if h < NQ + NKV:
        if HAS_NORM:
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            rstd = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / D + eps)
            if h < NQ:
                w1 = tl.load(qn_ptr + i, mask=m, other=0.0).to(tl.float32)
                w2 = tl.load(qn_ptr + HALF + i, mask=m, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(kn_ptr + i, mask=m, other=0.0).to(tl.float32)
                w2 = tl.load(kn_ptr + HALF + i, mask=m, other=0.0).to(tl.float32)
            x1 = (w1 * (f1 * rstd).to(dt).to(tl.float32)).to(dt)
            x2 = (w2 * (f2 * rstd).to(dt).to(tl.float32)).to(dt)
        p = tl.load(pos_ptr + b).to(tl.int64)
        c = tl.load(cos_ptr + p * D + i, mask=m, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + p * D + i, mask=m, other=0.0).to(dt).to(tl.float32)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # HF rounds each product and the sum separately in the model dtype.
        o1 = ((a1 * c).to(dt).to(tl.float32) - (a2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
        if h < NQ:
            qrow = q_ptr + (b * NQ + h) * D
            tl.store(qrow + i, o1, mask=m)
            tl.store(qrow + HALF + i, o2, mask=m)
        else:
            krow = kc_ptr + ((b * NKV + (h - NQ)) * S + cp) * D
            tl.store(krow + i, o1, mask=m)
            tl.store(krow + HALF + i, o2, mask=m)
    else:
        vrow = vc_ptr + ((b * NKV + (h - NQ - NKV)) * S + cp) * D
        tl.store(vrow + i, x1, mask=m)
        tl.store(vrow + HALF + i, x2, mask=m)


def _check_caches(k_cache, v_cache):
    """The kernels write and read the caches as dense [B, Hkv, S, D] blocks."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")


def rope_cache_write(qkv, cos, sin, pos, k_cache, v_cache, cache_pos, n_q, n_kv,
                     q_norm=None, k_norm=None, eps=1e-6):
    """Fused form of :func:`rope_cache_write_ref`: one program per (row, head)."""
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    S = k_cache.shape[2]
    qkv = qkv.contiguous()
    _check_caches(k_cache, v_cache)
    q = torch.empty(B, n_q, D, dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm is not None
    _rope_cache_kernel[(B, n_q + 2 * n_kv)](
        qkv, cos, sin, pos, k_cache, v_cache, cache_pos, q,
        q_norm if has_norm else qkv, k_norm if has_norm else qkv, eps, S,
        NQ=n_q, NKV=n_kv, D=D, HALF_BLOCK=_next_pow2(D // 2), HAS_NORM=has_norm)
    return q


# ---------------------------------------------------------------- GQA decode attention

def decode_attention_ref(q, k_cache, v_cache, start, cache_pos, window, scale, softcap=None):
    """One query per row, q [B, Hq, D]; keys j with start[b] <= j <= cache_pos (and
    j > cache_pos - window when window). Queries are grouped by KV head so each KV head
    is read once for its group. ``softcap`` caps the scaled logits to softcap *
    tanh(s / softcap) (Gemma2). Returns [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    end = int(cache_pos.reshape(-1)[0]) + 1
    k = k_cache[:, :, :end]
    v = v_cache[:, :, :end]
    s = torch.matmul(q.view(B, Hkv, Hq // Hkv, D), k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    j = torch.arange(end, device=q.device)
    bad = j[None, :] < start.view(B, 1).to(j.dtype)
    if window:
        bad = bad | (j[None, :] <= end - 1 - window)
    s = s.masked_fill(bad[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).view(B, Hq, D)


@triton.jit
def _attn_split_kernel(q_ptr, kc_ptr, vc_ptr, start_ptr, cp_ptr, o_ptr, ml_ptr, S, scale, window, softcap,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       IEEE: tl.constexpr, SINGLE: tl.constexpr, SOFTCAP: tl.constexpr):
    G: tl.constexpr = HQ // HKV
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    gm = g < G
    dm = d < D
    qrows = (b * HQ + hk * G + g)
    q = tl.load(q_ptr + qrows[:, None] * D + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    last = tl.load(cp_ptr).to(tl.int32)
    lo = tl.load(start_ptr + b).to(tl.int32)
    if window > 0:
        lo = tl.maximum(lo, last - window + 1)
    # Split the live range [lo, last] (not the whole cache) evenly over the programs.
    chunk = tl.cdiv(tl.cdiv(last + 1 - lo, SPLITS), BLOCK_N) * BLOCK_N
    s_lo = lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, last + 1)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    base = (b * HKV + hk) * S * D
    for j0 in range(s_lo, s_hi, BLOCK_N):
        j = j0 + n
        jm = j < s_hi
        kv_off = base + j[:, None].to(tl.int64) * D + d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=jm[:, None] & dm[None, :], other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=jm[:, None] & dm[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if SOFTCAP:
            s = _tanh(s / softcap) * softcap
        s = tl.where(jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    prow = (b * HQ + hk * G + g) * SPLITS + split
    if SINGLE:  # one split: normalise and write the output directly, no combine launch
        out = acc / l_i[:, None]
        tl.store(o_ptr + prow[:, None] * D + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])
    else:
        tl.store(o_ptr + prow[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
        tl.store(ml_ptr + prow * 2, m_i, mask=gm)
        tl.store(ml_ptr + prow * 2 + 1, l_i, mask=gm)


@triton.jit
def _attn_combine_kernel(o_ptr, ml_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = sp < SPLITS
    m = tl.load(ml_ptr + (row * SPLITS + sp) * 2, mask=sm, other=float("-inf"))
    l = tl.load(ml_ptr + (row * SPLITS + sp) * 2 + 1, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
    o = tl.load(o_ptr + (row * SPLITS + sp)[:, None] * D + d[None, :],
                mask=sm[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _attn_block_n(dtype, D):
    """Key/value rows per step of the split kernel (Triton's default 4 warps, 3 stages).

    The tile shrinks as the head grows, and fp32 K/V tiles, twice the registers of 16-bit ones,
    get half the rows; all compile without register spills for sm_90 (ptxas -v,
    tests/test_triton_aot.py) but are not yet timed on a GPU.
    """
    block_n = 64 if D <= 128 else 32
    return block_n // 2 if dtype == torch.float32 else block_n


def decode_attention(q, k_cache, v_cache, start, cache_pos, window, scale, softcap=None, splits=None):
    """Flash-decoding: (row, KV head, split) programs each read a slice of one KV head
    once for its whole query group, then a combine kernel merges the splits."""
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    q = q.contiguous()
    _check_caches(k_cache, v_cache)
    if splits is None:
        # Enough programs to fill a GPU at batch 1; fewer when the batch already does.
        splits = max(1, min(32, 256 // max(B * Hkv, 1), triton.cdiv(S, 128)))
    out = torch.empty_like(q)
    single = splits == 1
    part = out if single else torch.empty(B * Hq * splits, D, dtype=torch.float32, device=q.device)
    ml = part if single else torch.empty(B * Hq * splits, 2, dtype=torch.float32, device=q.device)
    _attn_split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, start, cache_pos, part, ml, S, scale, int(window or 0), float(softcap or 1.0),
        HQ=Hq, HKV=Hkv, D=D, SPLITS=splits, BLOCK_G=max(16, _next_pow2(Hq // Hkv)),
        BLOCK_N=_attn_block_n(q.dtype, D), BLOCK_D=max(16, _next_pow2(D)),
        IEEE=q.dtype == torch.float32, SINGLE=single, SOFTCAP=bool(softcap))
    if single:
        return out
    _attn_combine_kernel[(B * Hq,)](part, ml, out, D=D, SPLITS=splits,
                                    BLOCK_S=_next_pow2(splits), BLOCK_D=_next_pow2(D))
    return out


# ---------------------------------------------------------------- SwiGLU / GeGLU on merged gate/up

def swiglu_ref(gu, gelu=False):
    """gu = [gate | up] along the last dim (merged GEMM output); act(gate) * up with act
    silu (SwiGLU) or, with ``gelu``, the tanh-approximated gelu (GeGLU, Gemma)."""
    g, u = gu.chunk(2, dim=-1)
    return (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(gu_ptr + row * 2 * I + cols, mask=m, other=0.0)
    u = tl.load(gu_ptr + row * 2 * I + I + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    if GELU:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        a = 0.5 * gf * (1.0 + _tanh(0.7978845608028654 * (gf + 0.044715 * gf * gf * gf)))
    else:
        a = gf / (1.0 + tl.exp(-gf))
    a = a.to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (a * u.to(tl.float32)).to(g.dtype), mask=m)


def swiglu(gu, gelu=False):
    I = gu.shape[-1] // 2
    gu2 = gu.reshape(-1, 2 * I).contiguous()
    out = torch.empty(gu2.shape[0], I, dtype=gu.dtype, device=gu.device)
    BLOCK = min(1024, _next_pow2(I))
    _swiglu_kernel[(gu2.shape[0], triton.cdiv(I, BLOCK))](gu2, out, I, BLOCK=BLOCK, GELU=gelu)
    return out.view(*gu.shape[:-1], I)
