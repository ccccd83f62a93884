"""Calibration and evaluation text: loading, tokenising, and deterministic windows (docs/DESIGN.md, "Calibration and evaluation text").

The text is tokenised as one stream and cut into non-overlapping windows of T tokens.
Calibration draws N of them with a seeded generator; evaluation uses the windows that
calibration did not draw ("held apart"), so scoring never sees the evaluation text.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DepthcutError


def default_text() -> str:
    """CPython's documentation topics: present in every CPython install, ~113k SmolLM2 tokens."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_utf8(path: str | Path, what: str = "text file") -> str:
    """A file's whole text. Refused rather than silently corrupted: a missing or empty file,
    bytes that are not UTF-8, and NUL bytes (a binary file). A leading BOM is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DepthcutError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DepthcutError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    if "\0" in text:
        raise DepthcutError(f"{path} looks binary (NUL byte at offset {raw.index(0)})")
    if not text.strip():
        raise DepthcutError(f"{path} is empty")
    return text


def json_lines(path: str | Path, text: str) -> Iterator[tuple[str, object]]:
    """("file:line", value) for each non-blank line of a JSON lines text. Split on "\\n" only:
    JSON strings may hold U+2028 and other characters that ``str.splitlines`` breaks at."""
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError:
                raise DepthcutError(f"{path}:{n}: not valid JSON") from None


def read_text(path: str | Path) -> str:
    """Plain text, or JSON lines with a ``text`` string, joined with blank lines."""
    text = read_utf8(path)
    if Path(path).suffix != ".jsonl":
        return text
    rows = []
    for where, row in json_lines(path, text):
        if not (isinstance(row, dict) and isinstance(row.get("text"), str)):
            raise DepthcutError(f"{where}: not a JSON object with a 'text' string")
        rows.append(row["text"])
    return "\n\n".join(rows)


def tokenize_windows(text: str, tokenizer, seq_len: int) -> torch.Tensor:
    """All non-overlapping seq_len-token windows of the text, as an [n, seq_len] tensor."""
    _check_window(seq_len)
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
        if n_samples < 1:
            raise DepthcutError(f"need at least 1 calibration sample, got {n_samples}")
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


def as_token_ids(calibration, model=None) -> torch.Tensor:
    """The [N, T] token ids of a Calibration or a ready tensor (what embedding tools pass);
    with ``model``, also checked against its vocabulary and context (:func:`check_token_ids`)."""
    ids = calibration.input_ids if isinstance(calibration, Calibration) else calibration
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise DepthcutError("token ids must be a Calibration or an [N, T] int64 tensor")
    _check_window(ids.shape[1])
    return check_token_ids(ids, **(model_limits(model) if model is not None else {}))


def check_token_ids(ids: torch.Tensor, vocab_size: int | None = None, context: int | None = None) -> torch.Tensor:
    """Refuse ids a model would fail on deep inside, with an index error or a shape error, or
    silently misread: none at all (an [0, T] tensor), ids outside the vocabulary, windows
    longer than the context it was trained for."""
    if ids.numel() == 0:
        raise DepthcutError(f"no token windows: the ids are an empty {list(ids.shape)} tensor (too little text?)")
    if vocab_size is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise DepthcutError(f"token id {low if low < 0 else high} is outside the model's vocabulary "
                                f"(0..{vocab_size - 1})")
    if context is not None and ids.shape[-1] > context:
        raise DepthcutError(f"{ids.shape[-1]}-token windows are longer than the model's context of {context} "
                            f"tokens (max_position_embeddings); use a smaller --seq-len")
    return ids


def _check_window(seq_len: int) -> None:
    if seq_len < 2:
        raise DepthcutError(f"windows need at least 2 tokens (one to predict from, one to predict), got {seq_len}")


def model_limits(model) -> dict:
    """What a Hugging Face model accepts, as :func:`check_token_ids` takes it."""
    return {"vocab_size": model.get_input_embeddings().num_embeddings,
            "context": getattr(model.config, "max_position_embeddings", None)}
