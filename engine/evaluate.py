"""Perplexity by the paper's protocol (docs/DESIGN.md, "Evaluation and speed protocols"): non-overlapping windows, mean next-token NLL."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import as_token_ids


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, batch_size: int = 8, progress: str | None = None) -> torch.Tensor:
    """Summed next-token NLL per window ([N] fp64), through the model's own forward and logits."""
    device = next(model.parameters()).device
    sums = []
    for start in tqdm(range(0, len(input_ids), batch_size), desc=progress, disable=progress is None, leave=False):
        ids = input_ids[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        sums.append(nll.view(len(ids), -1).sum(1).double().cpu())
    return torch.cat(sums)


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8, progress: str | None = None) -> float:
    """exp(mean NLL over all N×(T−1) predictions of the [N, T] windows)."""
    as_token_ids(input_ids, model)
    total = window_nll(model, input_ids, batch_size, progress).sum().item()
    return math.exp(total / (input_ids.shape[0] * (input_ids.shape[1] - 1)))
