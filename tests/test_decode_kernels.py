"""Each fused decode kernel equals its PyTorch reference on fresh random inputs.

Without CUDA the kernels run in Triton's interpreter (fp32/fp16; the interpreter's
bf16 arithmetic is unreliable), with odd sizes to exercise every mask.
"""
import pytest
import torch
from kernel_inputs import dtype_params

from depthcut.kernels import decode as K

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = dtype_params(torch.float32, torch.float16)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check_add_rmsnorm(dev, dtype, tol, M, N, with_res):
    x = torch.randn(M, 2, N, device=dev, dtype=dtype)[:, 1]  # strided rows, as x[:, -1] in prefill
    r = torch.randn(M, N, device=dev, dtype=dtype) if with_res else None
    w = torch.rand(N, device=dev, dtype=dtype) + 0.5
    y, h = K.add_rmsnorm(x, r, w, 1e-6)
    y_ref, h_ref = K.add_rmsnorm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, **tol)


def _check_rope(dev, dtype, tol, B, n_q, n_kv, D, S, cp, qk_norm, table=0):
    """``table`` picks one of a stack of cos/sin tables (per-layer-type RoPE, Gemma3): the
    kernel gets a view that starts inside the stack."""
    qkv = torch.randn(B, (n_q + 2 * n_kv) * D, device=dev, dtype=dtype)
    theta = torch.tensor([10000.0, 1e6], device=dev)[:, None]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=dev).float() / D))
    f = torch.arange(S, device=dev).float()[None, :, None] * inv[:, None]
    cos, sin = torch.cat((f, f), -1).cos()[table], torch.cat((f, f), -1).sin()[table]
    pos = torch.randint(0, S, (B,), device=dev)
    cache_pos = torch.tensor([cp], device=dev, dtype=torch.int32)
    qn = torch.rand(D, device=dev, dtype=dtype) + 0.5 if qk_norm else None
    kn = torch.rand(D, device=dev, dtype=dtype) + 0.5 if qk_norm else None
    cache = torch.randn(2, B, n_kv, S, D, device=dev, dtype=dtype)
    ref_c = cache.clone()
    q = K.rope_cache_write(qkv, cos, sin, pos, cache[0], cache[1], cache_pos, n_q, n_kv, qn, kn)
    q_ref = K.rope_cache_write_ref(qkv, cos, sin, pos, ref_c[0], ref_c[1], cache_pos, n_q, n_kv, qn, kn)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(cache, ref_c, **tol)


def _check_attention(dev, dtype, tol, B, n_q, n_kv, D, S, cp, window, splits, softcap=None):
    q = torch.randn(B, n_q, D, device=dev, dtype=dtype)
    kc = torch.randn(B, n_kv, S, D, device=dev, dtype=dtype)
    vc = torch.randn(B, n_kv, S, D, device=dev, dtype=dtype)
    start = torch.randint(0, cp + 1, (B,), device=dev, dtype=torch.int32)
    cache_pos = torch.tensor([cp], device=dev, dtype=torch.int32)
    out = K.decode_attention(q, kc, vc, start, cache_pos, window, D ** -0.5, softcap, splits=splits)
    ref = K.decode_attention_ref(q.float(), kc.float(), vc.float(), start, cache_pos, window, D ** -0.5, softcap)
    torch.testing.assert_close(out.float(), ref, **tol)


def _check_swiglu(dev, dtype, tol, M, I, gelu=False):
    gu = torch.randn(M, 2 * I, device=dev, dtype=dtype) * 3
    torch.testing.assert_close(K.swiglu(gu, gelu), K.swiglu_ref(gu, gelu), **tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("M,N,with_res", [(3, 37, True), (1, 64, False)])
def test_add_rmsnorm(dtype, tol, M, N, with_res):
    _check_add_rmsnorm(DEV, dtype, tol, M, N, with_res)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("B,n_q,n_kv,D,qk_norm,table", [(2, 3, 1, 20, False, 0), (1, 4, 2, 16, True, 1)])
def test_rope_cache_write(dtype, tol, B, n_q, n_kv, D, qk_norm, table):
    _check_rope(DEV, dtype, tol, B, n_q, n_kv, D, 11, 7, qk_norm, table)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("B,n_q,n_kv,D,S,cp,window,splits,softcap", [
    (2, 6, 2, 20, 45, 40, 0, 3, None),    # GQA group 3, odd head dim, ragged starts, splits
    (1, 2, 2, 16, 33, 32, 9, 2, None),    # MHA with a sliding window
    (3, 4, 1, 32, 70, 5, 0, None, None),  # MQA, short live range, default split count
    (2, 4, 2, 16, 20, 19, 0, 1, None),    # one split: normalised in place, no combine
    (2, 4, 2, 16, 40, 37, 0, 2, 0.5),     # Gemma2 softcap, tight enough to change the weights
    (1, 6, 3, 20, 30, 25, 8, 1, 0.5),     # softcap with a sliding window, one split
])
def test_decode_attention(dtype, tol, B, n_q, n_kv, D, S, cp, window, splits, softcap):
    _check_attention(DEV, dtype, tol, B, n_q, n_kv, D, S, cp, window, splits, softcap)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("M,I", [(2, 45), (1, 1536)])
@pytest.mark.parametrize("gelu", [False, True])
def test_swiglu(dtype, tol, M, I, gelu):
    _check_swiglu(DEV, dtype, tol, M, I, gelu)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.bfloat16))
def test_kernels_gpu_llama_shapes(dtype, tol):
    """Real-size shapes (Llama-7B MHA, SmolLM2 GQA, Gemma2-2B softcap and GeGLU) compiled
    on the GPU, bf16 included."""
    _check_add_rmsnorm("cuda", dtype, tol, 4, 4096, True)
    _check_rope("cuda", dtype, tol, 4, 32, 32, 128, 600, 517, False)
    _check_rope("cuda", dtype, tol, 2, 9, 3, 64, 300, 255, True, table=1)
    for B, nq, nkv, D, S, softcap in [(1, 32, 32, 128, 640, None), (8, 9, 3, 64, 640, None),
                                      (2, 8, 4, 256, 640, 50.0)]:
        q = torch.randn(B, nq, D, device="cuda", dtype=dtype)
        kc, vc = (torch.randn(B, nkv, S, D, device="cuda", dtype=dtype) for _ in range(2))
        start = torch.randint(0, 100, (B,), device="cuda", dtype=torch.int32)
        cp = torch.tensor([600], device="cuda", dtype=torch.int32)
        out = K.decode_attention(q, kc, vc, start, cp, 0, D ** -0.5, softcap)
        ref = K.decode_attention_ref(q.float(), kc.float(), vc.float(), start, cp, 0, D ** -0.5, softcap)
        torch.testing.assert_close(out.float(), ref, **tol)
    _check_swiglu("cuda", dtype, tol, 4, 11008)
    _check_swiglu("cuda", dtype, tol, 4, 9216, gelu=True)


def test_non_contiguous_caches_are_refused():
    """A real exception, not an assert (python -O strips those): the kernels index dense caches."""
    kc = torch.zeros(1, 2, 8, 16, device=DEV).transpose(2, 3).contiguous().transpose(2, 3)
    vc = torch.zeros(1, 2, 8, 16, device=DEV)
    q, cp = torch.zeros(1, 4, 16, device=DEV), torch.tensor([3], device=DEV, dtype=torch.int32)
    with pytest.raises(ValueError, match="the KV caches must be contiguous"):
        K.decode_attention(q, kc, vc, torch.zeros(1, device=DEV, dtype=torch.int32), cp, None, 0.25)
    with pytest.raises(ValueError, match="the KV caches must be contiguous"):
        K.rope_cache_write(torch.zeros(1, 8 * 16, device=DEV), torch.ones(8, 16, device=DEV),
                           torch.zeros(8, 16, device=DEV), torch.zeros(1, device=DEV, dtype=torch.long), kc, vc, cp,
                           4, 2)
