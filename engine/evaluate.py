"""Perplexity by the paper's protocol (docs/DESIGN.md, "Evaluation and speed protocols"): non-overlapping windows, mean next-token NLL."""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import as_token_ids
from .errors import DepthcutError
from .models import ModelAdapter
from .ops import linear_nll


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


# --------------------------------------------------- log-likelihood of continuations
# docs/DESIGN.md, "Zero-shot evaluation": only continuation tokens reach the head, through the
# fused linear + NLL op; requests sharing a context run that context once.

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@torch.no_grad()
def continuation_logprobs(model, pairs: list[Pair], max_length: int, batch_size: int = 8,
                          progress: str | None = None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding would produce it) per pair.

    Windows are lm-eval's: context + continuation cut to the last max_length + 1 tokens.
    Pairs are grouped by context (the choices of a multiple-choice question share one) and
    the groups sorted by context length. Each forward runs batch_size contexts, left-padded
    so that they all end together; one more forward runs all their continuations from the
    contexts' KV cache. A context runs once however many continuations it has.
    """
    adapter = ModelAdapter(model)
    device = next(model.parameters()).device
    groups: dict[tuple, list[int]] = {}
    conts = []
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise DepthcutError(f"request {i}: empty context or continuation")
        if len(continuation) > max_length:
            raise DepthcutError(f"request {i}: continuation of {len(continuation)} tokens exceeds the model's "
                                f"{max_length}")
        tokens = (context + continuation)[-(max_length + 1):]
        groups.setdefault(tuple(tokens[: len(tokens) - len(continuation)]), []).append(i)
        conts.append(continuation)
    # transformers renamed past_key_values to cache (argument and output field alike)
    cache_name = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    weight, softcap = adapter.lm_head_weight.detach(), adapter.logit_softcap
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    ordered = sorted(groups.items(), key=lambda g: -len(g[0]))
    bar = tqdm(total=len(pairs), desc=progress, disable=progress is None, leave=False)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        ids, mask = _padded([list(prefix) for prefix, _ in chunk], device, left=True)
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                          use_cache=True)
        members = [(g, i) for g, (_, requests) in enumerate(chunk) for i in requests]
        rows = torch.tensor([g for g, _ in members], device=device)
        states = out.last_hidden_state[rows, -1:]  # each context's last position predicts its first tokens
        if any(len(conts[i]) > 1 for _, i in members):
            cache = out[cache_name]
            cache.reorder_cache(rows)
            rest, rest_mask = _padded([conts[i][:-1] for _, i in members], device, left=False)
            positions = mask[rows].sum(1, keepdim=True) + torch.arange(rest.shape[1], device=device)
            hidden = model.model(input_ids=rest, attention_mask=torch.cat([mask[rows], rest_mask], 1),
                                 position_ids=positions, use_cache=True, **{cache_name: cache}).last_hidden_state
            states = torch.cat([states, hidden], 1)
        picked = torch.cat([states[r, :len(conts[i])] for r, (_, i) in enumerate(members)])
        targets = torch.tensor([t for _, i in members for t in conts[i]], device=device)
        nll = linear_nll(picked, weight, targets, softcap).double().cpu()
        greedy = (head_argmax(picked, weight) == targets).cpu()
        at = 0
        for _, i in members:
            n = len(conts[i])
            results[i] = (-nll[at:at + n].sum().item(), bool(greedy[at:at + n].all()))
            at += n
        bar.update(len(members))
    bar.close()
    return results


def _padded(rows: list[list[int]], device, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one width, and the mask of the real tokens."""
    width = max(1, max(len(r) for r in rows))
    pads = [[0] * (width - len(r)) for r in rows]
    ids = [p + r if left else r + p for r, p in zip(rows, pads)]
    mask = [[0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p) for r, p in zip(rows, pads)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def head_argmax(hidden: torch.Tensor, weight: torch.Tensor, tile: int = 4096) -> torch.Tensor:
    """argmax over the vocabulary of hidden @ weight.T ([M] int64), one vocabulary tile at a time.

    Only [M, tile] logits exist at once. A softcap is monotonic, so it cannot move the argmax;
    ties go to the lowest id, as torch.argmax.
    """
    best = torch.full((hidden.shape[0],), -math.inf, device=hidden.device)
    arg = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for v0 in range(0, weight.shape[0], tile):
        top, idx = (hidden @ weight[v0:v0 + tile].T).float().max(1)
        better = top > best
        best = torch.where(better, top, best)
        arg = torch.where(better, idx + v0, arg)
    return arg
