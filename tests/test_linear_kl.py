"""Fused two-head KL for distillation: Triton vs torch reference, and the reference vs full logits."""
import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DTYPE_TOL, dtype_params, kl_inputs, scaled_tol

from depthcut.kernels.linear_kl import (
    linear_kl_backward,
    linear_kl_backward_reference,
    linear_kl_forward,
    linear_kl_reference,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


SHAPES = [(1, 97, 16, 16), (7, 211, 48, 32), (33, 1000, 72, 72), (130, 97, 48, 80)]  # (M, V, H, Ht)
SOFTCAPS = [(None, None), (3.0, 3.0), (None, 3.0)]  # (student, teacher)
FP32 = DTYPE_TOL[torch.float32]


def _full_logits(hidden, weight, softcap):
    z = hidden @ weight.T
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("softcap_s,softcap_t", SOFTCAPS)
@pytest.mark.parametrize("m,v,h,ht_dim", SHAPES)
def test_reference_matches_full_logits(m, v, h, ht_dim, softcap_s, softcap_t):
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(m, v, h, ht_dim, torch.float64, device=DEVICE)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    log_ps = F.log_softmax(_full_logits(hs, ws, softcap_s), dim=1)
    log_pt = F.log_softmax(_full_logits(ht, wt, softcap_t), dim=1)
    expected = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    expected = torch.where(targets != -100, expected, 0.0)
    grad_hs, grad_ws = torch.autograd.grad((grad_kl * expected).sum(), (hs, ws))

    args = hs.detach().float(), ws.detach().float(), ht.float(), wt.float(), targets
    kl, lse_s, lse_t = linear_kl_reference(*args, softcap_s, softcap_t, chunk_size=64)
    assert kl.dtype == lse_s.dtype == lse_t.dtype == torch.float32
    torch.testing.assert_close(kl.double(), expected.detach(), **FP32)
    torch.testing.assert_close(lse_t.double(), torch.logsumexp(_full_logits(ht, wt, softcap_t), dim=1),
                               **FP32)
    assert (kl[targets == -100] == 0).all()

    gh, gw = linear_kl_backward_reference(*args, lse_s, lse_t, grad_kl.float(), softcap_s, softcap_t,
                                          need_weight_grad=True, chunk_size=64)
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gh.double(), grad_hs, **FP32)
    torch.testing.assert_close(gw.double(), grad_ws, **FP32)
    assert (gh[targets == -100] == 0).all()
    assert linear_kl_backward_reference(*args, lse_s, lse_t, grad_kl.float(), softcap_s, softcap_t)[1] is None


@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("softcap_s,softcap_t", SOFTCAPS)
@pytest.mark.parametrize("m,v,h,ht_dim", SHAPES)
def test_triton_matches_reference(m, v, h, ht_dim, softcap_s, softcap_t, dtype, tol):
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(m, v, h, ht_dim, dtype, seed=m * 10000 + v + h, device=DEVICE)
    caps = softcap_s, softcap_t
    kl, lse_s, lse_t = linear_kl_forward(hs, ws, ht, wt, targets, *caps)
    ref_kl, ref_lse_s, ref_lse_t = linear_kl_reference(hs, ws, ht, wt, targets, *caps)
    assert kl.dtype == lse_s.dtype == lse_t.dtype == torch.float32
    # Logits accumulate in fp32 from exact 16-bit products on both sides: forward is tight.
    torch.testing.assert_close(kl, ref_kl, **FP32)
    torch.testing.assert_close(lse_s, ref_lse_s, **FP32)
    torch.testing.assert_close(lse_t, ref_lse_t, **FP32)
    assert (kl[targets == -100] == 0).all()

    grad_h, grad_w = linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, *caps,
                                        need_weight_grad=True)
    ref_h, ref_w = linear_kl_backward_reference(hs, ws, ht, wt, targets, ref_lse_s, ref_lse_t, grad_kl, *caps,
                                                need_weight_grad=True)
    assert grad_h.dtype == hs.dtype and grad_h.shape == hs.shape
    assert grad_w.dtype == torch.float32 and grad_w.shape == ws.shape
    # On 16-bit inputs (p_s - p_t) is rounded to the dot dtype before the weight / hidden product;
    # the weight gradient adds M such products (absolute error ~ sqrt(M) roundings).
    torch.testing.assert_close(grad_h.float(), ref_h.float(), **tol)
    torch.testing.assert_close(grad_w, ref_w, **scaled_tol(dtype, m ** 0.5))
    assert (grad_h[targets == -100] == 0).all()
    assert linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, *caps)[1] is None


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_teacher_equal_to_student_gives_zero(softcap):
    hs, ws, _, _, targets, grad_kl = kl_inputs(33, 211, 48, 48, torch.float32, device=DEVICE)
    for fwd, bwd in ((linear_kl_forward, linear_kl_backward), (linear_kl_reference, linear_kl_backward_reference)):
        kl, lse_s, lse_t = fwd(hs, ws, hs, ws, targets, softcap, softcap)
        torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0, atol=1e-6)
        torch.testing.assert_close(lse_s, lse_t)
        grad_h, grad_w = bwd(hs, ws, hs, ws, targets, lse_s, lse_t, grad_kl, softcap, softcap, need_weight_grad=True)
        torch.testing.assert_close(grad_h, torch.zeros_like(grad_h), rtol=0, atol=1e-6)
        torch.testing.assert_close(grad_w, torch.zeros_like(grad_w), rtol=0, atol=1e-6)


def test_strided_inputs():
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(33, 211, 48, 32, torch.float32, device=DEVICE)
    col_major = [x.T.contiguous().T for x in (hs, ws, ht, wt)]
    kl, lse_s, lse_t = linear_kl_forward(*col_major, targets)
    ref_kl, ref_lse_s, ref_lse_t = linear_kl_reference(hs, ws, ht, wt, targets)
    torch.testing.assert_close(kl, ref_kl, **FP32)
    got = linear_kl_backward(*col_major, targets, lse_s, lse_t, grad_kl, need_weight_grad=True)
    ref = linear_kl_backward_reference(hs, ws, ht, wt, targets, ref_lse_s, ref_lse_t, grad_kl, need_weight_grad=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **FP32)


def test_no_rows():
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(7, 97, 16, 24, torch.float32, device=DEVICE)
    kl, lse_s, lse_t = linear_kl_forward(hs[:0], ws, ht[:0], wt, targets[:0])
    assert kl.shape == lse_s.shape == lse_t.shape == (0,)
    grad_h, grad_w = linear_kl_backward(hs[:0], ws, ht[:0], wt, targets[:0], lse_s, lse_t, grad_kl[:0],
                                        need_weight_grad=True)
    assert grad_h.shape == (0, 16) and grad_w.shape == ws.shape and not grad_w.any()


def test_extreme_logits_stay_finite():
    """Large logits on either side must not overflow the online sums (nor the softcap's tanh)."""
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(7, 211, 16, 24, torch.float32, device=DEVICE)
    hs, ht = hs * 200, ht * 200
    for caps in SOFTCAPS:
        kl, lse_s, lse_t = linear_kl_forward(hs, ws, ht, wt, targets, *caps)
        ref_kl, _, _ = linear_kl_reference(hs, ws, ht, wt, targets, *caps)
        assert torch.isfinite(kl).all() and torch.isfinite(lse_s).all() and torch.isfinite(lse_t).all()
        torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-2)
        grads = linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, *caps, need_weight_grad=True)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("softcap_s,softcap_t", [(None, None), (30.0, 30.0)])
@pytest.mark.parametrize("m,v,h,ht_dim", [(1280, 32000, 2048, 4096), (1279, 49152, 576, 576)])
def test_triton_matches_reference_bf16_gpu(m, v, h, ht_dim, softcap_s, softcap_t):
    hs, ws, ht, wt, targets, grad_kl = kl_inputs(m, v, h, ht_dim, torch.bfloat16, seed=m + v + h,
                                                 device=DEVICE)
    caps = softcap_s, softcap_t
    kl, lse_s, lse_t = linear_kl_forward(hs, ws, ht, wt, targets, *caps)
    ref_kl, ref_lse_s, ref_lse_t = linear_kl_reference(hs, ws, ht, wt, targets, *caps)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse_t, ref_lse_t, rtol=1e-4, atol=1e-4)
    got = linear_kl_backward(hs, ws, ht, wt, targets, lse_s, lse_t, grad_kl, *caps, need_weight_grad=True)
    ref = linear_kl_backward_reference(hs, ws, ht, wt, targets, ref_lse_s, ref_lse_t, grad_kl, *caps,
                                       need_weight_grad=True)
    torch.testing.assert_close(got[0].float(), ref[0].float(), **DTYPE_TOL[torch.bfloat16])
    torch.testing.assert_close(got[1], ref[1], **scaled_tol(torch.bfloat16, m ** 0.5))


def test_bad_shapes_raise_value_error():
    """A real exception, not an assert (python -O strips those)."""
    hs, ws, ht, wt, targets, _ = kl_inputs(7, 97, 16, 24, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="linear_kl: hs \\[M,H\\], ws \\[V,H\\], ht \\[M,Ht\\]"):
        linear_kl_forward(hs, ws, ht[:3], wt, targets)
