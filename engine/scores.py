"""Per-block importance scores, the "+" heuristic, rankings, and their JSON and PNG forms.

Lower score = less important = pruned first, for every criterion (docs/DESIGN.md, "Criteria").
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DepthcutError
from .outputs import WRITTEN_BY, atomic_write, save_chart

# Criteria that have one score per block (angular distance has one per window start).
PER_BLOCK = ("ppl", "taylor", "magnitude", "bi", "taylor_ppl_estimate")
ALL_CRITERIA = ("ppl", "taylor", "magnitude", "bi", "angular")


@dataclass
class Protect:
    """The "+" heuristic: the first and last blocks are never pruned."""

    first: int = 4
    last: int = 2

    def __post_init__(self):
        if self.first < 0 or self.last < 0:
            raise DepthcutError(f"blocks kept by the + heuristic cannot be negative: first {self.first}, "
                                f"last {self.last}")

    @classmethod
    def none(cls) -> "Protect":
        return cls(0, 0)

    def allowed(self, num_blocks: int) -> list[int]:
        return list(range(self.first, max(self.first, num_blocks - self.last)))


@dataclass
class BlockScores(Mapping):
    """Criterion name -> list of floats, one per block (``angular<n>``: one per window start)."""

    scores: dict[str, list[float]]
    num_blocks: int
    meta: dict = field(default_factory=dict)
    # With score(..., importance=True): the imatrix.Imatrix (Σx² per input channel of every block
    # linear) that the same pass collected on the full model's stream. Not written to JSON.
    importance: object | None = field(default=None, compare=False, repr=False)

    def __getitem__(self, key: str) -> list[float]:
        if key not in self.scores:
            raise DepthcutError(f"no '{key}' scores; have: {', '.join(self.scores)}")
        return self.scores[key]

    def __iter__(self):
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def ranking(self, criterion: str, protect: Protect | None = None) -> list[int]:
        """Prunable blocks, least important first (ties broken by block index).

        For ``angular<n>`` the entries are window starts whose whole window is prunable.
        """
        protect = protect or Protect()
        values = self[criterion]
        allowed = set(protect.allowed(self.num_blocks))
        width = window_width(criterion)
        candidates = [i for i in range(len(values)) if all(b in allowed for b in range(i, i + width))]
        return sorted(candidates, key=lambda i: (_sort_key(values[i]), i))

    def select(self, criterion: str, count: int, protect: Protect | None = None) -> list[int]:
        """The blocks to remove: the ``count`` least important, in block order."""
        protect = protect or Protect()
        allowed = protect.allowed(self.num_blocks)
        if count < 1:
            raise DepthcutError("must remove at least 1 block")
        if count > len(allowed):
            raise DepthcutError(
                f"cannot remove {count} blocks: the model has {self.num_blocks}, of which "
                f"{len(allowed)} may be pruned (first {protect.first} and last {protect.last} kept)"
            )
        width = window_width(criterion)
        if width > 1:
            if count != width:
                raise DepthcutError(f"{criterion} removes exactly {width} contiguous blocks, not {count}")
            start = self.ranking(criterion, protect)[0]
            return list(range(start, start + width))
        return sorted(self.ranking(criterion, protect)[:count])

    def to_dict(self, protect: Protect | None = None) -> dict:
        """Plain JSON: a NaN or infinite number (an unscored block, a perplexity that
        overflowed) is null, which ranks last like them (see the "null" note)."""
        protect = protect or Protect()
        return _finite({
            "num_blocks": self.num_blocks,
            "protect": {"first": protect.first, "last": protect.last},
            "meta": self.meta,
            "scores": self.scores,
            "ranking": {c: self.ranking(c, protect) for c in self.scores},
            "null": "not scored (protected, or beyond the iterative removals) or not finite; ranked last",
        })

    def save_json(self, path: str | Path, protect: Protect | None = None, force: bool = False) -> Path:
        """Atomically; an existing file is replaced only when depthcut wrote it, or with ``force``."""
        text = json.dumps({"written_by": WRITTEN_BY, **self.to_dict(protect)}, indent=2, allow_nan=False)
        return atomic_write(path, text.encode(), force=force)

    @classmethod
    def load_json(cls, path: str | Path) -> "BlockScores":
        path = Path(path)
        if not path.is_file():
            raise DepthcutError(f"scores file not found: {path}")
        try:
            data = json.loads(path.read_text())
            num_blocks = int(data["num_blocks"])
            scores = {c: [_score_value(v) for v in vs] for c, vs in data["scores"].items()}
            if num_blocks < 1 or any(len(vs) != num_blocks - window_width(c) + 1 for c, vs in scores.items()):
                raise ValueError("score lists do not match num_blocks")
            meta = data.get("meta", {})
            if not isinstance(meta, dict):
                raise TypeError("meta is not an object")
            return cls(scores, num_blocks, meta)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise DepthcutError(f"not a depthcut scores file: {path}") from None

    def plot(self, path: str | Path, protect: Protect | None = None, force: bool = False) -> Path:
        """One bar chart per criterion; protected blocks grey, the rest by rank."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        protect = protect or Protect()
        names = list(self.scores)
        fig, axes = plt.subplots(len(names), 1, figsize=(max(6, self.num_blocks * 0.3), 2.2 * len(names)),
                                 squeeze=False)
        allowed = set(protect.allowed(self.num_blocks))
        for ax, name in zip(axes[:, 0], names):
            values = [math.nan if v is None else v for v in _finite(self.scores[name])]  # no bar, as in the JSON
            width = window_width(name)
            colors = ["tab:blue" if all(b in allowed for b in range(i, i + width)) else "0.7"
                      for i in range(len(values))]
            ax.bar(range(len(values)), values, color=colors)
            ax.set_ylabel(name)
            if name == "ppl":
                ax.set_yscale("log")
            ax.set_xlim(-0.6, self.num_blocks - 0.4)
        axes[-1, 0].set_xlabel("block (grey: protected by the + heuristic)")
        fig.suptitle("depthcut block scores (lower = pruned first)")
        fig.tight_layout()
        return save_chart(fig, path, force=force)


def window_width(criterion: str) -> int:
    """``angular4`` -> 4; every per-block criterion -> 1."""
    if criterion.startswith("angular"):
        digits = criterion[len("angular"):] or "1"
        if not digits.isdigit():
            raise DepthcutError(f"unknown criterion '{criterion}': angular takes a window size, e.g. angular4")
        return int(digits)
    return 1


def _sort_key(v: float) -> float:
    """Unscored (None, NaN) and non-finite scores rank last: never pruned on their account."""
    return v if v is not None and math.isfinite(v) else math.inf


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _score_value(v) -> float:
    """A score read back from JSON: a number, or null (NaN)."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"not a number: {v!r}")
    return float(v)
