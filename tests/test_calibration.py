import json

import pytest
import torch

from engine import Calibration, DepthcutError
from engine.calibration import as_token_ids, read_text, tokenize_windows


class CharTokenizer:
    """One token per character: enough to test windowing without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_windows_are_deterministic_and_disjoint_from_heldout():
    text = "".join(chr(97 + i % 26) for i in range(5000))
    a = Calibration.from_text(text, CharTokenizer(), n_samples=10, seq_len=64, seed=7)
    b = Calibration.from_text(text, CharTokenizer(), n_samples=10, seq_len=64, seed=7)
    c = Calibration.from_text(text, CharTokenizer(), n_samples=10, seq_len=64, seed=8)
    assert a.input_ids.shape == (10, 64)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert len(a.heldout_ids) == 5000 // 64 - 10
    windows = tokenize_windows(text, CharTokenizer(), 64)
    drawn = {tuple(w.tolist()) for w in a.input_ids}
    starts_calib = {i for i, w in enumerate(windows) if tuple(w.tolist()) in drawn}
    assert len(starts_calib) >= 1
    all_rows = torch.cat([a.input_ids, a.heldout_ids])
    assert sorted(map(tuple, all_rows.tolist())) == sorted(map(tuple, windows.tolist()))


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DepthcutError, match="too short: 10x128 tokens needed"):
        Calibration.from_text("short text", CharTokenizer(), n_samples=10, seq_len=128)


def test_jsonl_and_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert read_text(tmp_path / "a.jsonl") == "first\n\nsecond"
    (tmp_path / "b.txt").write_text("plain")
    assert read_text(tmp_path / "b.txt") == "plain"
    (tmp_path / "bad.jsonl").write_text('{"content": 1}\n')
    with pytest.raises(DepthcutError, match="bad.jsonl:1"):
        read_text(tmp_path / "bad.jsonl")
    with pytest.raises(DepthcutError, match="not found"):
        read_text(tmp_path / "missing.txt")


def test_token_tensor_is_accepted_and_checked():
    ids = torch.randint(0, 10, (3, 8))
    assert as_token_ids(ids) is ids
    with pytest.raises(DepthcutError):
        as_token_ids(ids.float())
    with pytest.raises(DepthcutError):
        as_token_ids(ids[:, :1])


def test_default_text_gives_the_paper_default(smollm2_tokenizer):
    calib = Calibration.load(smollm2_tokenizer)
    assert calib.input_ids.shape == (10, 128)
    assert calib.source == "pydoc_data.topics"
    assert len(calib.heldout_ids) > 500  # ~113k tokens of text
