"""Calibration and evaluation text: loading, tokenising, and deterministic windows (SPEC §1).

The text is tokenised as one stream and cut into non-overlapping windows of T tokens.
Calibration draws N of them with a seeded generator; evaluation uses the windows that
calibration did not draw ("held apart"), so scoring never sees the evaluation text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DepthcutError


def default_text() -> str:
    """CPython's documentation topics: present in every CPython install, ~113k SmolLM2 tokens."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path) -> str:
    """Plain text, or JSON lines with a ``text`` field, joined with blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DepthcutError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DepthcutError(f"{path}:{n}: not a JSON object with a 'text' field") from None
    return "\n\n".join(rows)


def tokenize_windows(text: str, tokenizer, seq_len: int) -> torch.Tensor:
    """All non-overlapping seq_len-token windows of the text, as an [n, seq_len] tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class Calibration:
    """N calibration windows drawn from a text, and the windows left over for evaluation."""

    input_ids: torch.Tensor  # [N, T]
    heldout_ids: torch.Tensor  # [M, T], windows not drawn
    source: str
    seed: int

    @classmethod
    def from_text(
        cls,
        text: str,
        tokenizer,
        n_samples: int = 10,
        seq_len: int = 128,
        seed: int = 1234,
        source: str = "text",
    ) -> "Calibration":
        if n_samples < 1 or seq_len < 2:
            raise DepthcutError("need at least 1 calibration sample of at least 2 tokens")
        windows = tokenize_windows(text, tokenizer, seq_len)
        if len(windows) < n_samples:
            have = len(windows) * seq_len
            raise DepthcutError(
                f"calibration text too short: {n_samples}x{seq_len} tokens needed, "
                f"{source} gives {len(windows)} full window(s) ({have} tokens)"
            )
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
        return cls(windows[order[:n_samples]], windows[order[n_samples:].sort().values], source, seed)

    @classmethod
    def load(cls, tokenizer, path: str | Path | None = None, **kwargs) -> "Calibration":
        """From a text/jsonl file, or the default CPython documentation text when path is None."""
        if path is None:
            return cls.from_text(default_text(), tokenizer, source="pydoc_data.topics", **kwargs)
        return cls.from_text(read_text(path), tokenizer, source=str(path), **kwargs)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def describe(self) -> dict:
        n, t = self.input_ids.shape
        return {"source": self.source, "n_samples": n, "seq_len": t, "seed": self.seed}


def as_token_ids(calibration) -> torch.Tensor:
    """The [N, T] token ids of a Calibration or a ready tensor (what embedding tools pass)."""
    ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise DepthcutError("calibration must be a Calibration or an [N, T] int64 tensor of token ids")
    if ids.shape[1] < 2:
        raise DepthcutError("calibration windows need at least 2 tokens")
    return ids
