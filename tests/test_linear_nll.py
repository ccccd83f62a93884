"""Fused linear + log-softmax + NLL: Triton vs torch reference, and the reference vs full logits."""
import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DTYPE_TOL, dtype_params, head_inputs, scaled_tol

from depthcut.kernels.linear_nll import (
    linear_nll_backward,
    linear_nll_backward_reference,
    linear_nll_backward_weight,
    linear_nll_backward_weight_reference,
    linear_nll_forward,
    linear_nll_reference,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


SHAPES = [(1, 97, 16), (7, 211, 48), (33, 1000, 72), (130, 97, 48), (130, 1000, 16), (33, 211, 72)]  # (M, V, H)
SOFTCAPS = [None, 3.0]
FP32 = DTYPE_TOL[torch.float32]


def _full_logits(hidden, weight, softcap):
    z = hidden @ weight.T
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_reference_matches_full_logits(m, v, h, softcap):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, torch.float64, device=DEVICE)
    hidden.requires_grad_(True)
    z = _full_logits(hidden, weight, softcap)
    expected_nll = F.cross_entropy(z, targets, reduction="none", ignore_index=-100)
    (expected_grad,) = torch.autograd.grad((grad_nll * expected_nll).sum(), hidden)

    h32, w32 = hidden.detach().float(), weight.float()
    nll, lse = linear_nll_reference(h32, w32, targets, softcap, chunk_size=64)
    assert nll.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(nll.double(), expected_nll.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.detach(), dim=1), rtol=1e-5, atol=1e-5)
    assert (nll[targets == -100] == 0).all()

    grad = linear_nll_backward_reference(h32, w32, targets, lse, grad_nll.float(), softcap, chunk_size=64)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)
    assert (grad[targets == -100] == 0).all()


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_weight_grad_reference_matches_full_logits(m, v, h, softcap):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, torch.float64, seed=1, device=DEVICE)
    weight.requires_grad_(True)
    expected_nll = F.cross_entropy(_full_logits(hidden, weight, softcap), targets, reduction="none",
                                   ignore_index=-100)
    (expected_grad,) = torch.autograd.grad((grad_nll * expected_nll).sum(), weight)

    h32, w32 = hidden.float(), weight.detach().float()
    _, lse = linear_nll_reference(h32, w32, targets, softcap)
    grad = linear_nll_backward_weight_reference(h32, w32, targets, lse, grad_nll.float(), softcap, chunk_size=64)
    assert grad.dtype == torch.float32 and grad.shape == weight.shape
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_triton_matches_reference(m, v, h, softcap, dtype, tol):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, dtype, seed=m * 10000 + v + h, device=DEVICE)
    nll, lse = linear_nll_forward(hidden, weight, targets, softcap)
    ref_nll, ref_lse = linear_nll_reference(hidden, weight, targets, softcap)
    assert nll.dtype == lse.dtype == torch.float32
    # Logits accumulate in fp32 from exact 16-bit products on both sides: forward is tight.
    torch.testing.assert_close(nll, ref_nll, **FP32)
    torch.testing.assert_close(lse, ref_lse, **FP32)
    assert (nll[targets == -100] == 0).all()

    grad = linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap)
    ref_grad = linear_nll_backward_reference(hidden, weight, targets, ref_lse, grad_nll, softcap)
    assert grad.dtype == hidden.dtype and grad.shape == hidden.shape
    # On 16-bit inputs (p - onehot) is rounded to the dot dtype before the W product.
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)
    assert (grad[targets == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("m,v,h", SHAPES)
def test_triton_weight_grad_matches_reference(m, v, h, softcap, dtype):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, dtype, seed=m * 10000 + v + h + 1, device=DEVICE)
    _, lse = linear_nll_reference(hidden, weight, targets, softcap)
    grad = linear_nll_backward_weight(hidden, weight, targets, lse, grad_nll, softcap)
    ref = linear_nll_backward_weight_reference(hidden, weight, targets, lse, grad_nll, softcap)
    assert grad.dtype == torch.float32 and grad.shape == weight.shape
    # On 16-bit inputs (p - onehot) is rounded to the dot dtype before the hidden product, and
    # the M rounded products add up like a random walk: absolute error ~ sqrt(M) roundings.
    torch.testing.assert_close(grad, ref, **scaled_tol(dtype, m ** 0.5))


def test_strided_inputs():
    hidden, weight, targets, grad_nll = head_inputs(33, 211, 48, torch.float32, device=DEVICE)
    hidden_t, weight_t = hidden.T.contiguous().T, weight.T.contiguous().T  # column-major views
    nll, lse = linear_nll_forward(hidden_t, weight_t, targets)
    ref_nll, ref_lse = linear_nll_reference(hidden, weight, targets)
    torch.testing.assert_close(nll, ref_nll, **FP32)
    grad = linear_nll_backward(hidden_t, weight_t, targets, lse, grad_nll)
    torch.testing.assert_close(grad, linear_nll_backward_reference(hidden, weight, targets, ref_lse, grad_nll),
                               **FP32)
    grad_w = linear_nll_backward_weight(hidden_t, weight_t, targets, lse, grad_nll)
    torch.testing.assert_close(grad_w, linear_nll_backward_weight_reference(hidden, weight, targets, ref_lse,
                                                                            grad_nll), **FP32)


def test_no_rows():
    hidden, weight, targets, grad_nll = head_inputs(7, 97, 16, torch.float32, device=DEVICE)
    nll, lse = linear_nll_forward(hidden[:0], weight, targets[:0])
    assert nll.shape == lse.shape == (0,)
    assert linear_nll_backward(hidden[:0], weight, targets[:0], lse, grad_nll[:0]).shape == (0, 16)
    grad_w = linear_nll_backward_weight(hidden[:0], weight, targets[:0], lse, grad_nll[:0])
    assert grad_w.shape == weight.shape and not grad_w.any()


def test_extreme_logits_stay_finite():
    """Large logits must not overflow the online logsumexp (nor the softcap's tanh)."""
    hidden, weight, targets, grad_nll = head_inputs(7, 211, 16, torch.float32, device=DEVICE)
    hidden = hidden * 200
    for softcap in SOFTCAPS:
        nll, lse = linear_nll_forward(hidden, weight, targets, softcap)
        ref_nll, ref_lse = linear_nll_reference(hidden, weight, targets, softcap)
        assert torch.isfinite(nll).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-3)
        grad = linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap)
        assert torch.isfinite(grad).all()
        assert torch.isfinite(linear_nll_backward_weight(hidden, weight, targets, lse, grad_nll, softcap)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("m,v,h", [(1280, 32000, 4096), (1279, 49152, 576), (4097, 151_937, 896)])
def test_triton_matches_reference_bf16_gpu(m, v, h, softcap):
    hidden, weight, targets, grad_nll = head_inputs(m, v, h, torch.bfloat16, seed=m + v + h, device=DEVICE)
    nll, lse = linear_nll_forward(hidden, weight, targets, softcap)
    ref_nll, ref_lse = linear_nll_reference(hidden, weight, targets, softcap)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    grad = linear_nll_backward(hidden, weight, targets, lse, grad_nll, softcap)
    ref_grad = linear_nll_backward_reference(hidden, weight, targets, ref_lse, grad_nll, softcap)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **DTYPE_TOL[torch.bfloat16])
    grad_w = linear_nll_backward_weight(hidden, weight, targets, lse, grad_nll, softcap)
    ref_grad_w = linear_nll_backward_weight_reference(hidden, weight, targets, ref_lse, grad_nll, softcap)
    torch.testing.assert_close(grad_w, ref_grad_w, **scaled_tol(torch.bfloat16, m ** 0.5))


def test_bad_shapes_raise_value_error():
    """A real exception, not an assert (python -O strips those)."""
    hidden, weight, targets, grad_nll = head_inputs(7, 97, 16, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="linear_nll: hidden \\[M,H\\], weight \\[V,H\\], targets \\[M\\]"):
        linear_nll_forward(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="targets \\[M\\] expected"):
        linear_nll_backward_weight(hidden, weight, targets[:3], torch.zeros(7, device=DEVICE), grad_nll)
