"""Triton Taylor saliency vs its torch reference, and the reference vs the explicit definition."""
import pytest
import torch
from kernel_inputs import DTYPE_TOL, saliency_inputs

from depthcut.kernels.taylor_saliency import taylor_saliency, taylor_saliency_reference

pytestmark = pytest.mark.usefixtures("single_torch_thread")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


SHAPES = [(1, 16, 16), (7, 40, 24), (33, 97, 72), (130, 16, 48), (130, 97, 24)]  # (M, N, K)
FP32 = DTYPE_TOL[torch.float32]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_reference_matches_definition(m, n, k):
    x, dy, w = saliency_inputs(m, n, k, torch.float64, device=DEVICE)
    dw = dy.T @ x
    expected = (w * dw).abs().sum()
    got = taylor_saliency_reference(x, dy, w)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_matches_reference(m, n, k, dtype):
    x, dy, w = saliency_inputs(m, n, k, dtype, seed=m * 1000 + n + k, device=DEVICE)
    got = taylor_saliency(x, dy, w)
    assert got.dtype == torch.float32 and got.dim() == 0
    # 16-bit products are exact in fp32, so only summation order differs from the reference.
    torch.testing.assert_close(got, taylor_saliency_reference(x, dy, w), **FP32)


def test_strided_inputs():
    x, dy, w = saliency_inputs(33, 40, 24, torch.float32, device=DEVICE)
    x_t = x.T.contiguous().T  # column-major view of the same values
    w_t = w.T.contiguous().T
    torch.testing.assert_close(taylor_saliency(x_t, dy, w_t), taylor_saliency_reference(x, dy, w),
                               **FP32)


def test_signed_accumulation_over_all_rows_matters():
    """sum|W*dW| over row halves is not the full-set value; an fp32 dW accumulator restores it."""
    x, dy, w = saliency_inputs(130, 40, 24, torch.float32, device=DEVICE)
    half = 65
    full = taylor_saliency(x, dy, w)
    per_half = taylor_saliency(x[:half], dy[:half], w) + taylor_saliency(x[half:], dy[half:], w)
    assert per_half > full * 1.05  # triangle inequality, strict for random signs

    dw_acc = torch.zeros(w.shape, dtype=torch.float32, device=DEVICE)
    for rows in (slice(0, half), slice(half, None)):
        dw_acc += dy[rows].float().T @ x[rows].float()
    torch.testing.assert_close((w.float() * dw_acc).abs().sum(), full, **FP32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("m,n,k", [(1280, 4096, 4096), (1280, 11008, 4096), (1279, 577, 1531)])
def test_triton_matches_reference_bf16_gpu(m, n, k):
    x, dy, w = saliency_inputs(m, n, k, torch.bfloat16, seed=m + n + k, device=DEVICE)
    torch.testing.assert_close(taylor_saliency(x, dy, w), taylor_saliency_reference(x, dy, w),
                               rtol=1e-4, atol=1e-3)


def test_bad_shapes_raise_value_error():
    """A real exception, not an assert (python -O strips those)."""
    x, dy, w = saliency_inputs(7, 40, 24, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="taylor_saliency: dy \\[M,N\\] and weight \\[N,K\\] expected"):
        taylor_saliency(x, dy, w[:, :8])
