"""The tokenizer half of the GGUF export: a Hugging Face tokenizer as llama.cpp's ``tokenizer.ggml.*``
keys (tokens, merges or scores, token types, pre-tokenizer name, special tokens, chat template).

``export_gguf.py`` writes the tensors and hyper-parameters and calls ``add_tokenizer``. The ``gguf``
package is imported when present: ``import depthcut`` and every command that neither writes nor reads
GGUF work without it, and the GGUF entry points call ``require_gguf`` to say what is missing.
"""
from __future__ import annotations

import itertools
import json
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from .errors import DepthcutError

try:
    import gguf
except ImportError:  # optional: see require_gguf
    gguf = None

_U64 = struct.Struct("<Q")


def new_writer(path, arch: str) -> gguf.GGUFWriter:
    """A GGUF writer whose long metadata arrays are packed in one pass (`_ArrayPacking`)."""
    require_gguf()
    return _ArrayPacking(path, arch)


if gguf is not None:
    class _ArrayPacking(gguf.GGUFWriter):
        """gguf's writer, packing arrays of plain str, int or float in one pass: the stock writer
        makes a struct call per item, a third of a small model's export time with a 50k-token
        vocabulary and its merges. The bytes are the stock writer's (tests/test_export_gguf.py)."""

        _FAST = {str: "STRING", int: "INT32", float: "FLOAT32"}  # what gguf infers for these item types

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            kinds = {type(v) for v in val} if vtype == gguf.GGUFValueType.ARRAY and sub_type is None else set()
            if len(kinds) != 1 or not val or self.endianess != gguf.GGUFEndian.LITTLE:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            kind = self._FAST.get(kinds.pop())
            if kind is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = gguf.GGUFValueType[kind]
            head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
            if kind == "STRING":
                encoded = [v.encode("utf-8") for v in val]
                return head + b"".join(itertools.chain.from_iterable(zip(map(_U64.pack, map(len, encoded)), encoded)))
            return head + np.asarray(val, dtype="<i4" if kind == "INT32" else "<f4").tobytes()


class GGUFExportError(DepthcutError, ValueError):
    """A model, tokenizer or option the exporter cannot write; the message says what is supported.
    Both halves of the export raise it; ``export_gguf`` re-exports it."""


def require_gguf() -> None:
    """One line instead of a traceback when a GGUF operation runs without the optional package."""
    if gguf is None:
        raise DepthcutError("GGUF support needs the gguf package: pip install gguf")


def gguf_tokenizer_pre(path) -> str | None:
    """The llama.cpp pre-tokenizer name a GGUF file states; transformers drops it when it loads the
    file, so pass it as ``tokenizer_pre`` when re-exporting a model that came from GGUF."""
    require_gguf()
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def check_name(name: str, tokenizer) -> None:
    """llama.cpp sets Phi-3 token attributes when general.name contains "phi3"/"phi-3", looking up
    four tokens by text; a vocabulary without one of them makes the load fail (unordered_map::at)."""
    if any(k in name.lower() for k in ("phi3", "phi-3")):
        missing = [t for t in ("</s>", "<unk>", "<s>", "<|endoftext|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise GGUFExportError(f"llama.cpp cannot load a model named {name!r} (it treats 'phi3' names as "
                                  f"Phi-3 and looks up {', '.join(missing)}, which this vocabulary lacks): "
                                  "pass another name=")


# Byte-level pre-tokenizer JSON (as ``tokenizers`` serialises it) -> llama.cpp ``tokenizer.ggml.pre``.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_PRE_TOKENIZERS = [
    ("gpt-2", [_GPT2_BYTE_LEVEL]),
    ("smollm", [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL]),
    ("qwen2", [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}}, {"type": "ByteLevel", "use_regex": False}]),
]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None) -> None:
    """The ``tokenizer.ggml.*`` keys for llama.cpp's "gpt2" (byte-level BPE) or "llama"
    (SentencePiece) tokenizer, whichever the Hugging Face tokenizer is."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre_json = state["model"], state.get("pre_tokenizer") or {}
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer has id {max(by_id)}, beyond the model's vocabulary of {vocab_size}")
    if model["type"] == "BPE" and "ByteLevel" in json.dumps(pre_json):
        _add_byte_level_vocab(writer, tokenizer, state, by_id, vocab_size, pre)
    elif model["type"] == "BPE" and model.get("byte_fallback") and _SPM_SPACE in json.dumps(state, ensure_ascii=False):
        _add_sentencepiece_vocab(writer, tokenizer, state, by_id, vocab_size)
    else:
        raise GGUFExportError("GGUF export supports byte-level BPE (GPT-2 style) tokenizers and SentencePiece-style "
                              "BPE tokenizers with byte fallback (Llama, Mistral, Gemma), not a "
                              f"{model['type']} model with pre-tokenizer {pre_json.get('type')!r}")
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # What the tokenizer does with special tokens, observed rather than read from version-dependent flags.
    encoded = tokenizer("a").input_ids
    writer.add_add_bos_token(ids["bos"] is not None and encoded[0] == ids["bos"])
    writer.add_add_eos_token(ids["eos"] is not None and encoded[-1] == ids["eos"])
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _add_byte_level_vocab(writer, tokenizer, state, by_id, vocab_size, pre) -> None:
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # embedding rows the tokenizer never produces (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _detect_pre(state.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_space_prefix(False)


_SPM_SPACE = "\u2581"  # SentencePiece's visible space ("▁"), which stands for " " in its pieces
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_ADDED_SCORE = -1000.0  # what llama.cpp's converter gives added and padding tokens


def _add_sentencepiece_vocab(writer, tokenizer, state, by_id, vocab_size) -> None:
    """llama.cpp's "llama" tokenizer (used for Llama-1/2, Mistral v0.1 and Gemma 1-3 alike): it cuts
    the text into characters (bytes where a character is not in the vocabulary) and repeatedly joins
    the adjacent pair whose joined token has the highest score, so the scores carry the merge order.

    Pieces, scores and types come from the SentencePiece model (``tokenizer.vocab_file``) when the
    tokenizer has one that agrees with it, as llama.cpp's own converter reads them; otherwise from
    the fast tokenizer's BPE, scoring each token by the rank of its first merge (see ``_bpe_scores``).
    Tokens the Hugging Face tokenizer adds on top keep their ids, typed control (special) or
    user-defined; rows past the vocabulary are unused padding.
    """
    pieces = _sentencepiece_pieces(getattr(tokenizer, "vocab_file", None), by_id)
    if pieces is None:
        pieces = _bpe_pieces(state["model"], by_id, tokenizer.unk_token)
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if i in pieces:
            _, score, ttype = pieces[i]
            if ttype == gguf.TokenType.NORMAL and token in added:
                ttype = gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED
        elif token is not None:  # added on top of the SentencePiece vocabulary
            score = _ADDED_SCORE
            ttype = gguf.TokenType.CONTROL if added.get(token) else gguf.TokenType.USER_DEFINED
        else:
            token, score, ttype = f"[PAD{i}]", _ADDED_SCORE, gguf.TokenType.UNUSED
        tokens.append(token)
        scores.append(float(score))
        types.append(ttype)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tokenizer))


def _sentencepiece_pieces(vocab_file, by_id) -> dict | None:
    """id -> (piece, score, type) from a SentencePiece model file, or None when there is none or it
    does not spell the tokenizer's vocabulary (then the tokenizer itself is the truth)."""
    if not vocab_file or not Path(vocab_file).is_file():
        return None
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
    except (ImportError, OSError, RuntimeError):
        return None
    pieces = {}
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if by_id.get(i) != piece:
            warnings.warn(f"{vocab_file} does not match the tokenizer (id {i}: {piece!r} vs {by_id.get(i)!r}); "
                          "the vocabulary is written from the tokenizer instead")
            return None
        # SentencePiece's piece types are numbered as gguf's TokenType (normal 1 ... byte 6).
        ttype = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                 else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                 else gguf.TokenType.NORMAL)
        pieces[i] = (piece, sp.get_score(i), ttype)
    return _mark_user_defined(vocab_file, pieces)


def _mark_user_defined(vocab_file, pieces: dict) -> dict:
    """User-defined pieces (matched whole in the text) are only visible in the model proto."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return pieces
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(vocab_file).read_bytes())
    for i, p in enumerate(proto.pieces):
        if p.type == p.USER_DEFINED and i in pieces:
            pieces[i] = (*pieces[i][:2], gguf.TokenType.USER_DEFINED)
    return pieces


def _bpe_pieces(model: dict, by_id: dict, unk_token) -> dict:
    """id -> (piece, score, type) from a byte-fallback BPE: bytes and the unknown token typed as such."""
    scores = _bpe_scores(model)
    pieces = {}
    for token, i in model["vocab"].items():
        ttype = (gguf.TokenType.UNKNOWN if token == unk_token else
                 gguf.TokenType.BYTE if _BYTE_PIECE.fullmatch(token) else gguf.TokenType.NORMAL)
        pieces[i] = (token, scores.get(token, 0.0), ttype)
    return pieces


def _bpe_scores(model: dict) -> dict:
    """Score = minus the rank of the first merge that builds the token: llama.cpp then joins pairs in
    the order the Hugging Face BPE applies its merges (vocabulary order would agree for a tokenizer
    converted from SentencePiece, where merges are sorted by piece score, but the merges are what
    the tokenizer runs). Tokens no merge builds (characters, bytes, specials) rank below every merge,
    in vocabulary order; their score only matters to tools that rebuild merges from scores."""
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    scores = {}
    for rank, (a, b) in enumerate(merges):
        scores.setdefault(a + b, -float(rank))
    rest = sorted((i, t) for t, i in model["vocab"].items() if t not in scores)
    for n, (_, token) in enumerate(rest):
        scores[token] = -float(len(merges) + n)
    return scores


def _adds_space_prefix(tokenizer) -> bool:
    """Whether the tokenizer writes a leading "▁" before the text (Llama) or not (Gemma)."""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str("a") if backend.normalizer is not None else "a"
    if backend.pre_tokenizer is not None:
        text = "".join(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return text.startswith(_SPM_SPACE)


def _detect_pre(pre_json: dict) -> str:
    steps = pre_json["pretokenizers"] if pre_json.get("type") == "Sequence" else [pre_json]
    for gguf_pre, pattern in _PRE_TOKENIZERS:
        if len(steps) == len(pattern) and all(s.items() >= p.items() for s, p in zip(steps, pattern)):
            return gguf_pre
    warnings.warn("unrecognised pre-tokenizer; llama.cpp will split text with its default rules "
                  "(pass tokenizer_pre= to name the right one)")
    return "default"
