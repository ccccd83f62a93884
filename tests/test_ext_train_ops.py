"""The compiled training ops (NLL with the head weight gradient, distillation KL) against
float64 definitions on the full logits, autograd for the gradients."""
import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DTYPE_TOL, dtype_params, head_inputs, kl_inputs, scaled_tol

from depthcut._ext import HAS_EXT

pytestmark = pytest.mark.skipif(not HAS_EXT, reason="compiled extension depthcut._C not built "
                                "(pip install --no-build-isolation -e .)")
ops = torch.ops.depthcut

# bf16: logit tiles and gradient tiles are rounded to bf16 (like a bf16 F.linear), so
# errors are absolute, about |logit| * 2^-8; head_inputs keeps |logit| below ~16.
LOGIT_SCALE = 16
FP32 = DTYPE_TOL[torch.float32]
SHAPES = [(1, 97, 16), (7, 211, 48), (33, 1000, 72), (130, 97, 48), (300, 1000, 40)]
CHUNKS = [None, 64, 100]  # None: the default (1024)


def _logits(hidden, weight, softcap):
    """float64 leaves (hidden, weight) and their capped logits."""
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    z = h @ w.T
    return h, w, softcap * torch.tanh(z / softcap) if softcap else z


def _close(got, ref, tol):
    torch.testing.assert_close(got.double(), ref.detach(), **tol)


@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.bfloat16, scale=LOGIT_SCALE))
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_nll_backward_full_matches_autograd(dtype, tol, softcap, m, v, h):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, dtype, seed=m * 7 + v + h)
    hr, wr, z = _logits(hidden, weight, softcap)
    (F.cross_entropy(z, targets, reduction="none") * grad_nll).sum().backward()

    for chunk in CHUNKS:
        _, lse = ops.linear_nll_forward(hidden, weight, targets, softcap, chunk)
        grad_h, grad_w = ops.linear_nll_backward_full(hidden, weight, targets, lse, grad_nll, softcap, chunk)
        assert grad_h.dtype == dtype and grad_h.shape == hidden.shape
        assert grad_w.dtype == torch.float32 and grad_w.shape == weight.shape
        _close(grad_h, hr.grad, tol)
        _close(grad_w, wr.grad, tol)
        assert (grad_h[targets == -100] == 0).all()
        # Same gradient as the hidden-only op (which splits the work by rows instead).
        alone = ops.linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap, chunk)
        torch.testing.assert_close(grad_h.float(), alone.float(), **tol)


def _unit_nll_reference(hidden, weight, targets, softcap):
    """float64 hidden leaf (its .grad: d(sum nll)/d hidden), capped logits and nll per row."""
    h, _, z = _logits(hidden, weight, softcap)
    nll = F.cross_entropy(z, targets, reduction="none")
    nll.sum().backward()
    return h, z, nll


@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.bfloat16, scale=LOGIT_SCALE))
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_nll_forward_grad_matches_forward_and_autograd(dtype, tol, softcap, m, v, h):
    hidden, weight, targets, _ = head_inputs(m, v, h, dtype, seed=m * 5 + v + h)
    hr, z, ref = _unit_nll_reference(hidden, weight, targets, softcap)

    for chunk in (None, 64):
        nll, lse, grad_h = ops.linear_nll_forward_grad(hidden, weight, targets, softcap, chunk)
        assert nll.dtype == lse.dtype == torch.float32 and nll.shape == lse.shape == (m,)
        assert grad_h.dtype == dtype and grad_h.shape == hidden.shape
        # The same nll and lse as the forward op, ignored rows included.
        nll_f, lse_f = ops.linear_nll_forward(hidden, weight, targets, softcap, chunk)
        torch.testing.assert_close(nll, nll_f, **tol)
        torch.testing.assert_close(lse, lse_f, **tol)
        _close(nll, ref, tol)
        _close(lse, torch.logsumexp(z, -1), tol)
        _close(grad_h, hr.grad, tol)
        assert (nll[targets == -100] == 0).all() and (grad_h[targets == -100] == 0).all()


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("m", [1, 130, 300])
def test_nll_forward_grad_is_independent_of_the_thread_count(softcap, m):
    """The row blocks follow the thread count (one block of 130 rows on 1 thread, three on 3)."""
    hidden, weight, targets, _ = head_inputs(m, 1000, 40, torch.float32, seed=m)
    hr, _, ref = _unit_nll_reference(hidden, weight, targets, softcap)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(ops.linear_nll_forward_grad(hidden, weight, targets, softcap, 100))
    finally:
        torch.set_num_threads(before)
    (nll, lse, grad_h), (nll_3, lse_3, grad_h_3) = outs
    _close(nll, ref, FP32)
    _close(grad_h, hr.grad, FP32)
    for got, want in [(nll_3, nll), (lse_3, lse), (grad_h_3, grad_h)]:
        torch.testing.assert_close(got, want, **FP32)


def _kl_reference(hs, ws, ht, wt, targets, softcap_s, softcap_t):
    """float64 leaves of the student, and KL(teacher || student) per row (0 where ignored)."""
    h, w, zs = _logits(hs, ws, softcap_s)
    _, _, zt = _logits(ht, wt, softcap_t)
    kl = F.kl_div(zs.log_softmax(-1), zt.detach().log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return h, w, zs, zt, kl.masked_fill(targets == -100, 0.0)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("softcaps", [(None, None), (3.0, None), (None, 3.0)])
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_linear_kl_matches_kl_div(dtypes, softcaps, m, v, h):
    ht_size = h + 24 if m == 33 else h  # teacher and student hidden sizes differ
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(m, v, h, ht_size, dtypes[0], seed=m * 7 + v + h,
                                                 teacher_dtype=dtypes[1])
    hr, wr, zs, zt, ref = _kl_reference(hs, ws, ht, wt, targets, *softcaps)
    (ref * grad_kl).sum().backward()
    tol = scaled_tol(dtypes[0], LOGIT_SCALE)

    for chunk in CHUNKS:
        kl, lse_s, lse_t = ops.linear_kl_forward(hs, ws, ht, wt, targets, *softcaps, chunk)
        for out in (kl, lse_s, lse_t):
            assert out.dtype == torch.float32 and out.shape == (m,)
        _close(kl, ref, tol)
        _close(lse_s, torch.logsumexp(zs, -1), tol)
        _close(lse_t, torch.logsumexp(zt, -1), tol)
        assert (kl[targets == -100] == 0).all()

        grad_h, grad_w = ops.linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, *softcaps, True,
                                                chunk)
        assert grad_h.dtype == hs.dtype and grad_h.shape == hs.shape
        assert grad_w.dtype == torch.float32 and grad_w.shape == ws.shape
        _close(grad_h, hr.grad, tol)
        _close(grad_w, wr.grad, tol)
        assert (grad_h[targets == -100] == 0).all()
        # Without the weight gradient the work is split by rows; the hidden gradient agrees.
        grad_h2, none = ops.linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, *softcaps, False,
                                               chunk)
        assert none.shape == (0,)
        torch.testing.assert_close(grad_h2.float(), grad_h.float(), **tol)


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("m", [1, 130])
def test_any_thread_count_gives_the_same_results(threads, m):
    """Thread counts change how the vocabulary is split (1 to 5 ranges here) and merged."""
    v, h = 1000, 24
    hs, ws, ht, wt, targets, grad = kl_inputs(m, v, h, h, torch.float32, seed=threads + m)
    hr, wr, _, _, ref = _kl_reference(hs, ws, ht, wt, targets, 3.0, None)
    (ref * grad).sum().backward()
    hn, wn, z = _logits(hs, ws, None)
    nll_ref = F.cross_entropy(z, targets, reduction="none")
    (nll_ref * grad).sum().backward()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kl, lse_s, lse_t = ops.linear_kl_forward(hs, ws, ht, wt, targets, 3.0, None, 100)
        kl_h, kl_w = ops.linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad, 3.0, None, True, 100)
        nll, lse = ops.linear_nll_forward(hs, ws, targets, None, 100)
        nll_h, nll_w = ops.linear_nll_backward_full(hs, ws, targets, lse, grad, None, 100)
    finally:
        torch.set_num_threads(before)
    for got, want in [(kl, ref), (kl_h, hr.grad), (kl_w, wr.grad), (nll, nll_ref), (nll_h, hn.grad), (nll_w, wn.grad)]:
        _close(got, want, FP32)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_kl_of_a_model_with_itself_is_zero(softcap):
    hs, ws, _, _, targets, _ = kl_inputs(33, 1000, 72, 72, torch.float32, seed=3)
    kl, lse_s, lse_t = ops.linear_kl_forward(hs, ws, hs, ws, targets, softcap, softcap)
    torch.testing.assert_close(kl, torch.zeros(33), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_s, lse_t, atol=1e-6, rtol=0)
    grad_h, grad_w = ops.linear_kl_backward(hs, ws, hs, ws, targets, lse_s, lse_t, torch.ones(33), softcap, softcap,
                                            True)
    torch.testing.assert_close(grad_h, torch.zeros_like(grad_h), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_w, torch.zeros_like(grad_w), atol=1e-6, rtol=0)


def test_training_ops_reject_bad_input():
    hs, ws, ht, wt, targets, _ = kl_inputs(4, 97, 16, 8, torch.float32)
    lse, grad = torch.zeros(4), torch.ones(4)

    def kl_fwd(hs=hs, ws=ws, ht=ht, wt=wt, targets=targets, softcap_t=None):
        return ops.linear_kl_forward(hs, ws, ht, wt, targets, None, softcap_t)

    def kl_bwd(lse_s=lse, lse_t=lse, grad_kl=grad, chunk=None):
        return ops.linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, None, None, True, chunk)

    def nll_bwd(hidden=hs, weight=ws, targets=targets, lse=lse, grad_nll=grad, softcap=None):
        return ops.linear_nll_backward_full(hidden, weight, targets, lse, grad_nll, softcap)

    def nll_fwd_grad(hidden=hs, weight=ws, targets=targets, chunk=None):
        return ops.linear_nll_forward_grad(hidden, weight, targets, None, chunk)

    bad_targets = targets.clone()
    bad_targets[1] = 97
    cases = [
        (lambda: kl_fwd(hs=hs[0]), "hs \\[M,H\\] and ws \\[V,H\\] must be 2-D"),
        (lambda: kl_fwd(ws=ws[:, :8]), "hs and ws disagree on H \\(16 vs 8\\)"),
        (lambda: kl_fwd(wt=wt[:50]), "ws and wt disagree on V \\(97 vs 50\\)"),
        (lambda: kl_fwd(ht=ht[:3]), "hs and ht disagree on M \\(4 vs 3\\)"),
        (lambda: kl_fwd(wt=wt.bfloat16()), "ht and wt dtypes differ"),
        (lambda: kl_fwd(hs=hs.half(), ws=ws.half()), "float32 or bfloat16 expected, got Half"),
        (lambda: kl_fwd(targets=bad_targets), "1 targets outside \\[0, 97\\) and not -100"),
        (lambda: kl_fwd(targets=targets.int()), "targets must be int64"),
        (lambda: kl_fwd(targets=targets[:3]), "targets must be \\[M\\]"),
        (lambda: kl_fwd(softcap_t=-2.0), "linear_kl_forward: softcap_t must be positive when given, got -2"),
        (lambda: kl_bwd(chunk=-1), "linear_kl_backward: chunk must be positive when given, got -1"),
        (lambda: nll_bwd(softcap=0.0), "linear_nll_backward_full: softcap must be positive when given, got 0"),
        (lambda: nll_fwd_grad(chunk=0), "linear_nll_forward_grad: chunk must be positive when given, got 0"),
        (lambda: kl_bwd(lse_t=lse[:3]), "linear_kl_backward: lse_t must be \\[M\\]"),
        (lambda: kl_bwd(grad_kl=torch.ones(4, 1)), "linear_kl_backward: grad_kl must be \\[M\\]"),
        (lambda: nll_bwd(weight=ws.bfloat16()), "linear_nll_backward_full: hidden and weight dtypes differ"),
        (lambda: nll_bwd(targets=bad_targets), "targets outside"),
        (lambda: nll_bwd(lse=lse[:2]), "linear_nll_backward_full: lse must be \\[M\\]"),
        (lambda: nll_bwd(grad_nll=torch.ones(5)), "linear_nll_backward_full: grad_nll must be \\[M\\]"),
        (lambda: nll_fwd_grad(hidden=hs[0]), "linear_nll_forward_grad: hidden \\[M,H\\] and weight \\[V,H\\]"),
        (lambda: nll_fwd_grad(weight=ws[:, :8]), "linear_nll_forward_grad: hidden and weight disagree on H"),
        (lambda: nll_fwd_grad(weight=ws.bfloat16()), "linear_nll_forward_grad: hidden and weight dtypes differ"),
        (lambda: nll_fwd_grad(hidden=hs.half(), weight=ws.half()), "float32 or bfloat16 expected, got Half"),
        (lambda: nll_fwd_grad(targets=bad_targets), "linear_nll_forward_grad: 1 targets outside \\[0, 97\\)"),
        (lambda: nll_fwd_grad(targets=torch.full((4,), -1)), "4 targets outside"),
        (lambda: nll_fwd_grad(targets=targets.int()), "linear_nll_forward_grad: targets must be int64"),
        (lambda: nll_fwd_grad(targets=targets[:3]), "linear_nll_forward_grad: targets must be \\[M\\]"),
        (lambda: nll_fwd_grad(weight=ws[:0], targets=torch.full((4,), -100)), "weight has no rows"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
