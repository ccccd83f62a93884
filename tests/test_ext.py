"""The compiled CPU ops (torch.ops.depthcut.*) against direct torch definitions."""
import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import dtype_params, head_inputs

from depthcut._ext import HAS_EXT

pytestmark = pytest.mark.skipif(not HAS_EXT, reason="compiled extension depthcut._C not built "
                                "(pip install --no-build-isolation -e .)")

# bf16: the logit tile is rounded to bf16 before the fp32 reduction (like a bf16 F.linear),
# so errors are absolute, about |logit| * 2^-8; head_inputs keeps |logit| below ~16.
LOGIT_SCALE = 16


def _direct(hidden, weight, targets, softcap):
    h = hidden.float().clone().requires_grad_()
    z = h @ weight.float().T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    nll = F.cross_entropy(z, targets, reduction="none")
    return h, z, nll


@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.bfloat16, scale=LOGIT_SCALE))
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("m,v,h", [(1, 97, 16), (7, 1000, 72), (129, 5003, 16), (129, 97, 72)])
@pytest.mark.parametrize("chunk", [None, 300])
def test_linear_nll_matches_cross_entropy(dtype, tol, softcap, m, v, h, chunk):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, dtype, seed=m * 7 + v + h)
    nll, lse = torch.ops.depthcut.linear_nll_forward(hidden, weight, targets, softcap, chunk)
    hr, z, ref = _direct(hidden, weight, targets, softcap)
    assert nll.dtype == lse.dtype == torch.float32 and nll.shape == lse.shape == (m,)
    torch.testing.assert_close(nll, ref.detach(), **tol)
    torch.testing.assert_close(lse, torch.logsumexp(z.detach(), 1), **tol)
    assert (nll[targets == -100] == 0).all()

    (ref * grad_nll).sum().backward()
    grad = torch.ops.depthcut.linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap, chunk)
    assert grad.dtype == dtype and grad.shape == hidden.shape
    torch.testing.assert_close(grad.float(), hr.grad, **tol)
    assert (grad[targets == -100] == 0).all()


def test_linear_nll_rejects_bad_arguments():
    hidden, weight, targets, _ = head_inputs(4, 97, 16, torch.float32)
    bad = targets.clone()
    bad[0] = 97
    with pytest.raises(RuntimeError, match="targets outside"):
        torch.ops.depthcut.linear_nll_forward(hidden, weight, bad)
    with pytest.raises(RuntimeError, match="softcap must be positive when given, got 0"):
        torch.ops.depthcut.linear_nll_forward(hidden, weight, targets, 0.0)
    with pytest.raises(RuntimeError, match="chunk must be positive when given, got 0"):
        torch.ops.depthcut.linear_nll_forward(hidden, weight, targets, None, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 7, 16), (129, 97, 72), (64, 200, 33)])
def test_taylor_saliency_matches_explicit_dw(dtype, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    got = torch.ops.depthcut.taylor_saliency(x, dy, w)
    dw = dy.double().T @ x.double()
    ref = (w.double() * dw).abs().sum()
    assert got.dtype == torch.float32 and got.dim() == 0
    # bf16: dW is rounded to bf16 before |.|; the sum of |.| averages that out.
    rtol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 7, 16), (1, 97, 45), (2, 33, 576), (3, 130, 31), (5, 64, 100),
                                   (7, 9, 1), (9, 13, 37), (16, 50, 72),  # from 8 rows: 4 x 4 tiles
                                   (17, 40, 24)])  # 17 rows: the GEMM path
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_is_fp32_arithmetic_on_the_weights(wdtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g).to(wdtype)
    b = torch.randn(n, generator=g).to(wdtype) if bias else None
    got = torch.ops.depthcut.decode_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # Only the fp32 summation order differs from the float64 definition.
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * k ** 0.5, rtol=1e-5)


def test_decode_linear_keeps_leading_dims_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g)[:, :, :33]  # non-contiguous rows
    w = torch.randn(33, 21, generator=g).T.half()  # [21, 33], transposed storage
    got = torch.ops.depthcut.decode_linear(x, w, None)
    assert got.shape == (2, 3, 21)
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, atol=1e-5, rtol=1e-5)


def test_decode_linear_propagates_non_finite_weights():
    x = torch.ones(1, 20)
    w = torch.zeros(3, 20, dtype=torch.float16)
    w[1, 17], w[2, 3] = float("inf"), float("nan")
    out = torch.ops.depthcut.decode_linear(x, w, None)
    assert out[0, 0] == 0 and out[0, 1] == float("inf") and out[0, 2].isnan()


def test_decode_linear_rejects_bad_input():
    with pytest.raises(RuntimeError, match="x must be fp32"):
        torch.ops.depthcut.decode_linear(torch.ones(1, 4, dtype=torch.float16), torch.ones(2, 4), None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.depthcut.decode_linear(torch.ones(1, 5), torch.ones(2, 4), None)
    with pytest.raises(RuntimeError, match="bias has 1 elements for 2 outputs"):
        torch.ops.depthcut.decode_linear(torch.ones(1, 4), torch.ones(2, 4), torch.ones(1))


# ---------------------------------------------------------------- decode-step ops vs triton_kernels/decode.py references

def _decode_inputs(B, nq, nkv, D, S, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (nq + 2 * nkv) * D, generator=g)
    table = torch.randn(S, D, generator=g)
    kc, vc = torch.randn(B, nkv, S, D, generator=g), torch.randn(B, nkv, S, D, generator=g)
    return g, qkv, table.cos(), table.sin(), kc, vc


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (2, 5, 129)])
def test_add_rmsnorm_op(residual, shape):
    from depthcut.kernels.decode import add_rmsnorm_ref

    g = torch.Generator().manual_seed(sum(shape))
    x, r, w = torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.rand(shape[-1], generator=g)
    y, h = torch.ops.depthcut.add_rmsnorm(x, r if residual else None, w, 1e-6)
    ry, rh = add_rmsnorm_ref(x, r if residual else None, w, 1e-6)
    torch.testing.assert_close(h, rh, atol=0, rtol=0)
    torch.testing.assert_close(y, ry, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("B,nq,nkv,D", [(1, 9, 3, 64), (3, 4, 4, 24), (2, 6, 2, 10)])
@pytest.mark.parametrize("norm", [False, True])
def test_rope_cache_write_op(B, nq, nkv, D, norm):
    from depthcut.kernels.decode import rope_cache_write_ref

    S = 37
    g, qkv, cos, sin, kc, vc = _decode_inputs(B, nq, nkv, D, S, seed=B + nq + D)
    pos = torch.randint(0, S, (B,), generator=g)
    cache_pos = torch.tensor([S - 5], dtype=torch.int32)
    qn, kn = (torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5) if norm else (None, None)
    k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    q = torch.ops.depthcut.rope_cache_write(qkv, cos, sin, pos, k1, v1, cache_pos, nq, nkv, qn, kn, 1e-6)
    ref = rope_cache_write_ref(qkv, cos, sin, pos, k2, v2, cache_pos, nq, nkv, qn, kn, 1e-6)
    torch.testing.assert_close(q, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
    assert torch.equal(v1, v2)


@pytest.mark.parametrize("B,nq,nkv,D", [(1, 9, 3, 64), (3, 4, 4, 24), (2, 6, 2, 10)])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 20.0), (7, 2.0)])
def test_decode_attention_op(B, nq, nkv, D, window, softcap):
    from depthcut.kernels.decode import decode_attention_ref

    S = 41
    g, _, _, _, kc, vc = _decode_inputs(B, nq, nkv, D, S, seed=B * nq + D + (window or 0))
    q = torch.randn(B, nq, D, generator=g) * 2
    start = torch.randint(0, 10, (B,), generator=g).int()
    cache_pos = torch.tensor([29], dtype=torch.int32)
    got = torch.ops.depthcut.decode_attention(q, kc, vc, start, cache_pos, window, D ** -0.5, softcap)
    ref = decode_attention_ref(q, kc, vc, start, cache_pos, window, D ** -0.5, softcap)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(1, 2), (3, 2 * 97), (2, 3, 64)])
def test_swiglu_op(gelu, shape):
    from depthcut.kernels.decode import swiglu_ref

    gu = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])) * 3
    torch.testing.assert_close(torch.ops.depthcut.swiglu(gu, gelu), swiglu_ref(gu, gelu), atol=1e-6, rtol=1e-5)


def test_decode_ops_reject_bad_input():
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.depthcut.swiglu(torch.ones(2, 4, dtype=torch.bfloat16), False)
    _, qkv, cos, sin, kc, vc = _decode_inputs(1, 2, 1, 8, 5, seed=0)
    args = (qkv, cos, sin, torch.zeros(1, dtype=torch.long), kc, vc, torch.tensor([1]), 2, 1)
    with pytest.raises(RuntimeError, match="both q_norm and k_norm"):
        torch.ops.depthcut.rope_cache_write(*args, torch.ones(8), None, 1e-6)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.depthcut.rope_cache_write(*args[:6], torch.tensor([5]), 2, 1, None, None, 1e-6)
    q = torch.ones(1, 2, 8)
    attn = (q, kc, vc, torch.zeros(1, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="window must be positive when given"):
        torch.ops.depthcut.decode_attention(*attn, 0, 1.0)
    with pytest.raises(RuntimeError, match="softcap must be positive when given, got -1"):
        torch.ops.depthcut.decode_attention(*attn, None, 1.0, -1.0)


def _opcheck_cases():
    """(op name, arguments) of every compiled op, optional arguments both given and absent."""
    hidden, weight, targets, grad = head_inputs(6, 37, 8, torch.float32, seed=1)
    _, lse = torch.ops.depthcut.linear_nll_forward(hidden, weight, targets)
    teacher = hidden * 2
    g, qkv, cos, sin, kc, vc = _decode_inputs(2, 4, 2, 8, 9, seed=1)
    pos, cache_pos = torch.tensor([1, 3]), torch.tensor([5])
    return [
        ("linear_nll_forward", (hidden, weight, targets, 3.0, 16)),
        ("linear_nll_forward", (hidden, weight, targets, None, None)),
        ("linear_nll_backward", (hidden, weight, targets, lse, grad, 3.0, None)),
        ("linear_nll_forward_grad", (hidden.bfloat16(), weight.bfloat16(), targets, None, 16)),
        ("linear_nll_backward_full", (hidden, weight, targets, lse, grad, None, 16)),
        ("linear_kl_forward", (hidden, weight, teacher, weight, targets, 3.0, None, 16)),
        ("linear_kl_backward", (hidden, weight, teacher, weight, targets, lse, lse, grad, None, 2.0, True, None)),
        ("linear_kl_backward", (hidden, weight, teacher, weight, targets, lse, lse, grad, 2.0, None, False, 16)),
        ("taylor_saliency", (hidden, torch.randn(6, 37, generator=g), weight)),
        ("decode_linear", (hidden[:2], weight.half(), torch.randn(37, generator=g))),
        ("decode_linear", (hidden, weight.bfloat16(), None)),
        ("add_rmsnorm", (hidden, None, torch.rand(8, generator=g), 1e-6)),  # h must not alias x
        ("add_rmsnorm", (hidden, teacher, torch.rand(8, generator=g), 1e-6)),
        ("rope_cache_write", (qkv, cos, sin, pos, kc, vc, cache_pos, 4, 2, None, None, 1e-6)),
        ("rope_cache_write", (qkv, cos, sin, pos, kc, vc, cache_pos, 4, 2, torch.ones(8), torch.ones(8), 1e-6)),
        ("decode_attention", (torch.randn(2, 4, 8, generator=g), kc, vc, torch.tensor([0, 2]), cache_pos, None, 0.3)),
        ("decode_attention", (torch.randn(2, 4, 8, generator=g), kc, vc, torch.tensor([0, 2]), cache_pos, 3, 0.3, 2.0)),
        ("swiglu", (torch.randn(3, 8, generator=g), True)),
        ("quantize_kquant", (torch.randn(3, 256, generator=g), "q5_k", torch.rand(256, generator=g))),
        ("quantize_kquant", (torch.randn(2, 512, generator=g), "q2_k", None)),
        ("quantize_iquant", (torch.randn(3, 256, generator=g), "iq4_xs", torch.rand(256, generator=g))),
        ("quantize_iquant", (torch.randn(2, 96, generator=g), "iq4_nl", None)),
        ("quantize_legacy", (torch.randn(3, 96, generator=g), "q5_1", torch.rand(96, generator=g))),
        ("quantize_legacy", (torch.randn(2, 64, generator=g), "q8_0", None)),
    ]


OPCHECK_CASES = _opcheck_cases() if HAS_EXT else []


@pytest.mark.parametrize("name,args", OPCHECK_CASES, ids=[name for name, _ in OPCHECK_CASES])
def test_opcheck(name, args):
    """Schema (mutation and aliasing), fake kernel and tracing of every op: torch.compile can use them."""
    torch.library.opcheck(getattr(torch.ops.depthcut, name).default, args)


def test_every_op_is_opchecked():
    ops = {n.removeprefix("depthcut::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("depthcut::")}
    assert ops == {name for name, _ in OPCHECK_CASES}


ISA_SCRIPT = """
import hashlib, sys, torch, depthcut._C
import torch.nn.functional as F
digest = hashlib.sha256()
for m, n, k in [(1, 97, 45), (3, 130, 576), (5, 64, 100), (11, 30, 83)]:
    for wdtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(m + n + k)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).to(wdtype)
        got = torch.ops.depthcut.decode_linear(x, w, None)
        ref = F.linear(x.double(), w.double())
        torch.testing.assert_close(got.double(), ref, atol=1e-5 * k ** 0.5, rtol=1e-5)
        digest.update(got.numpy().tobytes())
print(digest.hexdigest())
"""


def test_decode_linear_every_build():
    """The AVX2 and portable builds of the GEMV, which this machine would not pick: each is
    checked against the definition in a process with DEPTHCUT_CPU_ISA capping the build,
    and each sums in its own order, so their bits differ from the default build's."""
    import os
    import subprocess
    import sys

    digests = []
    for isa in ("", "avx2", "portable"):
        proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DEPTHCUT_CPU_ISA": isa})
        assert proc.returncode == 0, (isa, proc.stderr[-2000:])
        digests.append(proc.stdout.strip())
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    builds = 1 + ("avx2" in flags) + ("avx512f" in flags)  # the default is the best one available
    assert len(set(digests)) == builds, digests
