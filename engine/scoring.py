"""``score``: calibration tokens in, per-block scores out, from the fused or reference scorer."""
from __future__ import annotations

import resource
import time
from collections.abc import Iterable

import torch

from . import reference
from .calibration import Calibration, as_token_ids
from .errors import DepthcutError
from .models import ModelAdapter, compute_dtype
from .offload import stream_of
from .scores import ALL_CRITERIA, BlockScores, Protect
from .single_pass import iterative_ppl, score_single_pass

SCORERS = ("fused", "reference")
# "all": the angle averaged over every token; "last": PruneMe's, over each window's last token
# with the final norm on the last block's output (docs/DESIGN.md, "Criteria").
ANGULAR_TOKENS = ("all", "last")


def parse_criteria(criteria: str | Iterable[str]) -> list[str]:
    names = [c.strip().lower() for c in (criteria.split(",") if isinstance(criteria, str) else criteria)]
    names = ["magnitude" if c == "mag" else c for c in names if c]
    unknown = [c for c in names if c not in ALL_CRITERIA]
    if unknown or not names:
        raise DepthcutError(f"unknown criteria {unknown or names}; choose from {', '.join(ALL_CRITERIA)}")
    return names


def score(
    model,
    calibration: Calibration | torch.Tensor,
    criteria: str | Iterable[str] = ("ppl", "taylor", "magnitude"),
    scorer: str = "fused",
    windows: Iterable[int] = (),
    iterative: int = 0,
    protect: Protect | None = None,
    max_memory: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    angular_tokens: str = "all",
    importance: bool = False,
) -> BlockScores:
    """Score every block of ``model`` on the calibration windows.

    ``calibration`` is a :class:`Calibration` or a ready ``[N, T]`` int64 tensor of token ids.
    ``criteria`` from ppl, taylor, magnitude, bi, angular (``windows`` lists the angular
    window sizes, default 1; ``angular_tokens`` one of :data:`ANGULAR_TOKENS`). ``iterative=k`` adds SLEB-style iterative PPL for k removals.
    ``dtype`` is the precision of the fused pass; None chooses by :func:`models.compute_dtype`
    (bf16 only on CPUs with native bf16, the model's own on the GPU); ``meta["compute_dtype"]``
    says which and why. ``importance=True`` has the fused pass also collect the imatrix for
    K-quant exports (``BlockScores.importance``; None when no fused pass ran).
    Returns a :class:`BlockScores`: criterion -> one float per block, lower = pruned first.
    """
    ids = as_token_ids(calibration, model)  # vocabulary and context checked before any work
    names = parse_criteria(criteria)
    if scorer not in SCORERS:
        raise DepthcutError(f"unknown scorer '{scorer}'; choose from {', '.join(SCORERS)}")
    for ok, problem in ((angular_tokens in ANGULAR_TOKENS,
                         f"angular_tokens must be one of {', '.join(ANGULAR_TOKENS)}, got {angular_tokens!r}"),
                        (iterative >= 0, f"iterative must be >= 0, got {iterative}"),
                        (max_memory is None or max_memory >= 1, f"max_memory must be at least 1 byte, got {max_memory}"),
                        (all(int(w) >= 1 for w in windows), f"angular windows must be >= 1, got {list(windows)}")):
        if not ok:
            raise DepthcutError(problem)
    windows = tuple(sorted(set(int(w) for w in windows))) or ((1,) if "angular" in names else ())
    adapter = ModelAdapter(model)
    protect = protect or Protect()
    t0 = time.perf_counter()
    scores: dict[str, list[float]] = {}
    meta: dict = {"scorer": scorer, "criteria": names, "tokens": ids.numel(), "angular_tokens": angular_tokens,
                  "calibration_shape": list(ids.shape)}
    if isinstance(calibration, Calibration):
        meta["calibration"] = calibration.describe()
    data_criteria = {c for c in names if c != "magnitude"}
    imatrix = None
    streamed = stream_of(model) is not None
    if streamed and scorer == "reference" and data_criteria:
        raise DepthcutError("--scorer reference needs the whole model in memory; a streamed model uses the fused pass")
    if (scorer == "fused" and data_criteria) or iterative:
        first = next(model.parameters())
        if streamed and dtype is None:
            dtype, meta["compute_dtype"] = first.dtype, f"{str(first.dtype)[6:]} (streamed: the dtype it was loaded in)"
        else:
            dtype, meta["compute_dtype"] = compute_dtype(first.device, first.dtype, dtype)
    if scorer == "fused" and data_criteria:
        fused, facts, imatrix = score_single_pass(model, ids, data_criteria, windows, max_memory, dtype, progress,
                                                  angular_tokens, importance)
        scores.update(fused)
        meta.update(facts)
    elif data_criteria:
        if "ppl" in names:
            scores["ppl"] = reference.ppl_scores(model, ids)
        if "taylor" in names:
            scores["taylor"] = reference.taylor_scores(model, ids)
        if {"bi", "angular"} & data_criteria:
            stream = reference.stream_scores(model, ids, windows, angular_tokens=angular_tokens)
            wanted = lambda key: key.rstrip("0123456789") in names  # noqa: E731 ("angular3" -> "angular")
            scores.update({k: v for k, v in stream.items() if wanted(k)})
    if "magnitude" in names:
        scores["magnitude"] = reference.magnitude_scores(model)
    if iterative:
        order, ppls = iterative_ppl(model, ids, iterative, protect.allowed(adapter.num_blocks), max_memory, dtype,
                                    progress)
        rank = {b: step for step, b in enumerate(order)}
        scores["ppl_iterative"] = [float(rank[b]) if b in rank else float("nan") for b in range(adapter.num_blocks)]
        meta["iterative"] = {"order": order, "ppl_after_each": ppls}
    if "ppl" in scores and "taylor_ppl_estimate" in scores:
        meta["taylor_ppl_estimate_spearman"] = spearman(scores["ppl"], scores["taylor_ppl_estimate"])
    meta["seconds"] = time.perf_counter() - t0
    meta["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark
    return BlockScores(scores, adapter.num_blocks, meta, importance=imatrix)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected between float scores)."""
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
