"""The reference criteria (docs/DESIGN.md, "Criteria") computed the straightforward way, on the whole model.

This is the yardstick the single-pass scorer is tested against (``--scorer reference``):
PPL skips each block in place and runs the whole model; Taylor takes autograd weight
gradients of the mean NLL over the whole calibration set, signed, then sums |W ⊙ ∂L/∂W|.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .evaluate import window_nll
from .models import ModelAdapter, block_input, block_output
from .offload import loaded


class _SkippedBlock(nn.Module):
    """Stands in for a deleted block: the residual stream passes through unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if hasattr(block, "attention_type"):  # families with per-layer mask types look it up
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def skipped_block(adapter: ModelAdapter, i: int):
    block = adapter.layers[i]
    adapter.layers[i] = _SkippedBlock(block)
    try:
        yield
    finally:
        adapter.layers[i] = block


def ppl_scores(model, input_ids: torch.Tensor, batch_size: int = 10) -> list[float]:
    """Perplexity of the model with each block removed in turn."""
    adapter = ModelAdapter(model)
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    scores = []
    for i in tqdm(range(adapter.num_blocks), desc="PPL (reference)", leave=False):
        with skipped_block(adapter, i):
            scores.append(math.exp(window_nll(model, input_ids, batch_size).sum().item() / count))
    return scores


def taylor_scores(model, input_ids: torch.Tensor, batch_size: int = 10) -> list[float]:
    """Σ|W ⊙ ∂L/∂W| per block, L the mean NLL of the full model over all windows."""
    adapter = ModelAdapter(model)
    device = next(model.parameters()).device
    count = input_ids.shape[0] * (input_ids.shape[1] - 1)
    flags = {p: p.requires_grad for p in model.parameters()}
    block_params = [list(adapter.block_parameters(i).values()) for i in range(adapter.num_blocks)]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for params in block_params:
            for p in params:
                p.requires_grad_(True)
        for start in tqdm(range(0, len(input_ids), batch_size), desc="Taylor (reference)", leave=False):
            ids = input_ids[start:start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / count
            loss.backward()  # .grad accumulates the signed gradient across batches
        return [sum((p.detach().float() * p.grad.float()).abs().sum().item() for p in params)
                for params in block_params]
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


def magnitude_scores(model) -> list[float]:
    """Σ|W| over each block's weight tensors (no data); a streamed model's blocks one at a time."""
    adapter = ModelAdapter(model)
    n = adapter.num_blocks
    out = []
    for i in range(n):
        with loaded(model, i, i + 1 if i + 1 < n else None):
            out.append(sum(p.detach().float().abs().sum().item() for p in adapter.block_parameters(i).values()))
    return out


@torch.no_grad()
def stream_scores(model, input_ids: torch.Tensor, windows=(1,), batch_size: int = 10,
                  angular_tokens: str = "all") -> dict[str, list[float]]:
    """Block Influence and angular distances from the full model's residual stream.

    BI_i = 1 − mean cos(h_i, h_{i+1}); angular<n>_i = mean arccos(cos(h_i, h_{i+n}))/π, the
    mean over all tokens, h_i the stream entering block i (h_L leaving the last block).
    ``angular_tokens="last"``: PruneMe's angular distance, over each window's last token, with
    h_L after the final norm.
    """
    adapter = ModelAdapter(model)
    device = next(model.parameters()).device
    streams: list[list[torch.Tensor]] = []
    hooks = [adapter.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: streams[-1].append(block_input(args, kwargs).float()), with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, args, out: streams[-1].append(block_output(out).float()))
              for layer in adapter.layers]
    try:
        for start in range(0, len(input_ids), batch_size):
            streams.append([])
            model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    per_window = [torch.cat([s[i] for s in streams]) for i in range(adapter.num_blocks + 1)]  # [N, T, H] each
    h = [x.flatten(0, 1) for x in per_window]
    if angular_tokens == "last":
        ends = [x[:, -1] for x in per_window]
        with torch.no_grad():
            ends[-1] = adapter.final_norm(ends[-1].to(next(model.parameters()).dtype)).float()
    else:
        ends = h
    cos = lambda a, b: F.cosine_similarity(a, b, dim=-1)
    out = {"bi": [1 - cos(h[i], h[i + 1]).mean().item() for i in range(adapter.num_blocks)]}
    for n in windows:
        out[f"angular{n}"] = [(torch.arccos(cos(ends[i], ends[i + n]).clamp(-1, 1)) / math.pi).mean().item()
                              for i in range(adapter.num_blocks - n + 1)]
    return out
