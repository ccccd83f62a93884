"""Retraining data: documents in, packed fixed-length windows with loss labels out.

Plain text and JSON lines with ``text`` are trained on every token; JSON lines with chat
``messages`` go through the tokenizer's chat template and are trained on the assistant's
tokens only (the other labels are -100). Documents are joined with EOS into one stream
and cut into non-overlapping windows of ``seq_len`` tokens. Evaluation windows are taken
out before training sees anything, and the split is recorded (docs/DESIGN.md, "Retraining").
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

from .calibration import Calibration, json_lines, read_utf8
from .errors import DepthcutError
from .kernels import IGNORE_INDEX

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Document:
    """One training document: plain text (all tokens trained) or a chat (assistant tokens trained)."""

    text: str | None = None
    messages: list[dict] | None = None
    where: str = field(default="", compare=False)  # "file:line", for errors the chat template raises


def _document(row, where: str) -> Document:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return Document(text=row["text"])
    messages = row.get("messages") if isinstance(row, dict) else None
    if (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        unknown = next((m["role"] for m in messages if m["role"] not in CHAT_ROLES), None)
        if unknown is not None:
            raise DepthcutError(f"{where}: unknown chat role '{unknown}'; roles are {', '.join(CHAT_ROLES)}")
        return Document(messages=messages, where=where)
    raise DepthcutError(f"{where}: expected a 'text' string or a 'messages' list of {{role, content}} strings")


def read_documents(path: str | Path) -> list[Document]:
    """A .txt file is one document; .jsonl has one JSON object per line; .parquet has rows
    with a ``text`` or ``messages`` column (read through the ``datasets`` library)."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise DepthcutError(f"training data file not found: {path}")
        import datasets

        try:
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as e:  # pyarrow and datasets raise many types for a bad file
            raise DepthcutError(f"cannot read {path} as parquet: {str(e).splitlines()[0] if str(e) else e}") from None
        return [_document(row, f"{path} row {i}") for i, row in enumerate(rows)]
    text = read_utf8(path, "training data file")
    if path.suffix != ".jsonl":
        return [Document(text=text)]
    return [_document(row, where) for where, row in json_lines(path, text)]


def stream_dataset(spec: str) -> Iterator[Document]:
    """Documents of a Hugging Face dataset ``NAME[:CONFIG]`` (train split), streamed."""
    import datasets

    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for i, row in enumerate(rows):
            yield _document(row, f"dataset {spec} row {i}")
    except DepthcutError:
        raise
    except Exception as e:  # offline, unknown name, no train split: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DepthcutError(f"cannot read dataset '{spec}' (it needs the Hugging Face hub: are you online?): "
                            f"{first}") from None


def chat_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant wrote.

    Found by rendering growing prefixes of the conversation: an assistant turn's span runs
    from the end of the prefix rendered with the generation prompt to the end of the prefix
    that includes the turn, so its end-of-turn token is trained and its header is not.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DepthcutError("chat 'messages' data needs a tokenizer with a chat template")
    render = tokenizer.apply_chat_template
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(render(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    return render(messages, tokenize=False), spans


def tokenize_document(doc: Document, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is trained on."""
    if doc.text is not None:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        return ids, [True] * len(ids)
    try:
        text, spans = chat_spans(tokenizer, doc.messages)
    except TemplateError as e:
        raise DepthcutError(f"{doc.where or 'a chat'}: the tokenizer's chat template refuses it: {e}") from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], trained


def pack(docs: Iterable[Document], tokenizer, seq_len: int, max_windows: int | None = None):
    """(ids [N, T], labels [N, T]): documents joined with EOS, cut into whole windows.

    ``labels`` holds the token id where it is trained and -100 elsewhere; the loss at
    position t predicts labels[t + 1] from ids[:t + 1], inside one window.
    """
    if seq_len < 2:
        raise DepthcutError(f"--seq-len must be at least 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    keep: list[bool] = []
    for doc in docs:
        d_ids, d_keep = tokenize_document(doc, tokenizer)
        if not d_ids:
            continue
        ids += d_ids
        keep += d_keep
        if eos is not None:
            ids.append(eos)
            keep.append(doc.text is not None)  # a chat's end-of-turn is already trained
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    t_ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    t_keep = torch.tensor(keep[: n * seq_len], dtype=torch.bool).view(n, seq_len)
    return t_ids, torch.where(t_keep, t_ids, IGNORE_INDEX)


@dataclass
class TrainingSet:
    """Training windows and the evaluation windows kept apart from them."""

    train_ids: torch.Tensor  # [N, T]
    train_labels: torch.Tensor  # [N, T], -100 where not trained
    eval_ids: torch.Tensor  # [E, T]
    split: dict = field(default_factory=dict)  # how the windows were chosen, for the model card

    @property
    def seq_len(self) -> int:
        return self.train_ids.shape[1]

    def describe(self) -> dict:
        trained = int((self.train_labels[:, 1:] != IGNORE_INDEX).sum())
        return {**self.split, "seq_len": self.seq_len, "train_windows": len(self.train_ids),
                "eval_windows": len(self.eval_ids), "trained_tokens_per_epoch": trained}

    @classmethod
    def from_default_text(cls, tokenizer, seq_len: int = 128, eval_windows: int = 40, seed: int = 1234,
                          calib_samples: int = 10) -> "TrainingSet":
        """CPython's documentation topics, split as every depthcut command splits them: the
        calibration windows (seed, ``calib_samples``) and the first ``eval_windows`` held-apart
        windows (what ``prune --eval`` and the demo evaluate on) are never trained on."""
        calib = Calibration.load(tokenizer, n_samples=calib_samples, seq_len=seq_len, seed=seed)
        held = calib.heldout_ids
        if len(held) <= eval_windows:
            raise DepthcutError(f"the default text has {len(held)} windows of {seq_len} tokens left after "
                                f"calibration; {eval_windows} evaluation windows leave none to train on")
        train = held[eval_windows:]
        return cls(train, train.clone(), held[:eval_windows], {
            "source": calib.source, "rule": f"held apart from calibration ({calib_samples} windows, seed {seed}) "
                                            f"and evaluation (the first {eval_windows} held-apart windows)"})

    @classmethod
    def from_documents(cls, docs: Iterable[Document], tokenizer, seq_len: int, source: str,
                       eval_windows: int = 40, seed: int = 1234, max_windows: int | None = None) -> "TrainingSet":
        """Pack the documents; ``eval_windows`` windows drawn with ``seed`` are kept for evaluation."""
        ids, labels = pack(docs, tokenizer, seq_len, None if max_windows is None else max_windows + eval_windows)
        if len(ids) <= eval_windows:
            raise DepthcutError(f"training data too short: {source} gives {len(ids)} window(s) of {seq_len} "
                                f"tokens; {eval_windows} are kept for evaluation and at least one must remain")
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            raise DepthcutError(f"nothing to train on in {source}: its chats have no assistant turns")
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        held, train = order[:eval_windows].sort().values, order[eval_windows:].sort().values
        return cls(ids[train], labels[train], ids[held], {
            "source": source, "rule": f"{eval_windows} of {len(ids)} packed windows drawn with seed {seed} "
                                      f"for evaluation, the rest for training",
            "eval_window_indices": held.tolist()})
