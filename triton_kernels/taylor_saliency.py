"""Taylor saliency sum |W * dL/dW| of one linear layer without storing its weight gradient.

docs/DESIGN.md, "Criteria" and "The single pass and its memory model": dW = dy.T @ x is reduced in the GEMM's epilogue. The sign must survive until the
whole M (token) reduction is done, so each program owns a full [BLOCK_N, BLOCK_K] tile of dW,
loops over ALL rows, and only then takes |W * dW|. Per-program partial sums are combined by
torch in fp64: deterministic, no float atomics, no dW in memory.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_N, BLOCK_K, BLOCK_M, num_warps, num_stages). GPU values compile to wgmma without register
# spills for sm_90 (ptxas -v) but are not yet timed on an H100; small tiles keep the interpreter
# quick on test shapes.
_CFG = (32, 32, 32, 4, 1) if _INTERPRET else (128, 128, 64, 8, 3)


def taylor_saliency_reference(x, dy, weight):
    """Plain-torch sum |W * (dy.T @ x)| (0-d fp32): x [M,K], dy [M,N], weight [N,K]."""
    dw = dy.float().T @ x.float()
    return (weight.float() * dw).abs().sum()


@triton.jit
def _taylor_saliency_kernel(x_ptr, dy_ptr, w_ptr, out_ptr, M, N, K,
                            stride_xm, stride_xk, stride_dm, stride_dn, stride_wn, stride_wk,
                            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        dy_t = tl.load(dy_ptr + offs_m[None, :] * stride_dm + offs_n[:, None] * stride_dn,
                       mask=mask_m[None, :] & mask_n[:, None], other=0.0).to(DOT_DTYPE)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        dw = tl.dot(dy_t, x, dw, input_precision=PRECISION)

    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.sum(tl.abs(w * dw)))


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(x, dy):
    """Native 16-bit dot on GPU (exact products, fp32 accumulation); fp32 otherwise.

    bf16 goes through fp32 under the interpreter, whose bf16 dot is wrong.
    """
    if x.dtype == dy.dtype and x.dtype in _TL_DTYPE and not (_INTERPRET and x.dtype == torch.bfloat16):
        return _TL_DTYPE[x.dtype], None
    return tl.float32, "ieee"


def taylor_saliency(x, dy, weight):
    """Triton sum |W * (dy.T @ x)| (0-d fp32): x [M,K] layer input, dy [M,N] output grad, weight [N,K]."""
    (m, k), n = x.shape, weight.shape[0]
    if dy.shape != (m, n) or weight.shape != (n, k):
        raise ValueError(f"taylor_saliency: dy [M,N] and weight [N,K] expected for x [M,K], got "
                         f"{tuple(dy.shape)} and {tuple(weight.shape)} for {tuple(x.shape)}")
    block_n, block_k, block_m, warps, stages = _CFG
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    partial = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=x.device)
    dot_dtype, precision = _dot_dtype(x, dy)
    _taylor_saliency_kernel[grid](
        x, dy, weight, partial, m, n, k, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        weight.stride(0), weight.stride(1), DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    return partial.sum(dtype=torch.float64).float()
