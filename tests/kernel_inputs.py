"""Random inputs of the kernel tests and their tolerances, one definition for every test file.

The tolerance of a kernel-vs-reference comparison travels with the dtype in the test's
parametrisation (`dtype_params`): fp32 is exact up to summation order; 16-bit inputs are
rounded once or twice somewhere in the kernel (a logit or gradient tile, a product operand,
the output), so the error is one or two unit roundoffs of that dtype relative to the values:
2**-8 for bf16, 2**-10 for fp16, with Triton's approximate exp2/rsqrt on the GPU adding well
below that. Where the rounded values are larger than the result (logits) or are summed (a
weight gradient over M rows), `scaled_tol` widens the absolute part accordingly.
"""
from __future__ import annotations

import pytest
import torch

from depthcut.train_data import IGNORE_INDEX

DTYPE_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2 ** -10, atol=2 ** -10),
    torch.bfloat16: dict(rtol=2 ** -8, atol=2 ** -8),
}


def scaled_tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """DTYPE_TOL[dtype], for a 16-bit dtype with atol times `scale`: the magnitude of the
    intermediates it rounds (logits, say), whose rounding error is absolute in the result.
    fp32 rounding of such intermediates stays below its summation-order tolerance."""
    tol = DTYPE_TOL[dtype]
    return tol if dtype == torch.float32 else dict(rtol=tol["rtol"], atol=tol["atol"] * scale)


def dtype_params(*dtypes: torch.dtype, scale: float = 1.0) -> list:
    """pytest params (dtype, scaled_tol(dtype, scale)) with readable ids, for
    `@pytest.mark.parametrize("dtype,tol", dtype_params(...))`."""
    return [pytest.param(dt, scaled_tol(dt, scale), id=str(dt).removeprefix("torch.")) for dt in dtypes]


def _head(m: int, v: int, h: int, dtype: torch.dtype, gen: torch.Generator, device: str):
    """hidden [m, h] ~ N(0, 1) and weight [v, h] scaled so that logits have std 3 (a trained head's range)."""
    hidden = torch.randn(m, h, generator=gen).to(device, dtype)
    weight = (3 * torch.randn(v, h, generator=gen) / h ** 0.5).to(device, dtype)
    return hidden, weight


def _targets_and_grad(m: int, v: int, gen: torch.Generator, device: str):
    """Target ids with about a quarter ignored (row 0 always, when there are two rows or more)
    and an upstream gradient in [0.5, 1.5) per row."""
    targets = torch.randint(0, v, (m,), generator=gen)
    targets[torch.rand(m, generator=gen) < 0.25] = IGNORE_INDEX
    if m > 1:
        targets[0] = IGNORE_INDEX
    grad = torch.rand(m, generator=gen) + 0.5
    return targets.to(device), grad.to(device)


def head_inputs(m: int, v: int, h: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """(hidden, weight, targets, grad) of the LM-head NLL ops."""
    gen = torch.Generator().manual_seed(seed)
    hidden, weight = _head(m, v, h, dtype, gen, device)
    return (hidden, weight, *_targets_and_grad(m, v, gen, device))


def kl_inputs(m: int, v: int, h: int, h_teacher: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu",
              teacher_dtype: torch.dtype | None = None):
    """(hs, ws, ht, wt, targets, grad) of the distillation KL ops: a student and a teacher head
    over one vocabulary, with hidden sizes h and h_teacher."""
    gen = torch.Generator().manual_seed(seed)
    hs, ws = _head(m, v, h, dtype, gen, device)
    ht, wt = _head(m, v, h_teacher, teacher_dtype or dtype, gen, device)
    return (hs, ws, ht, wt, *_targets_and_grad(m, v, gen, device))


def saliency_inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """(x [m, k], dy [m, n], weight [n, k]) of the Taylor saliency ops."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    return x, dy, weight
