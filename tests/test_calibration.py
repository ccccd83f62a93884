import json

import pytest
import torch

from depthcut import Calibration, DepthcutError
from depthcut.calibration import as_token_ids, read_text, tokenize_windows


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


@pytest.mark.parametrize("name, content, message", [
    ("null.jsonl", b'{"text": null}\n', r"null.jsonl:1: not a JSON object with a 'text' string"),
    ("num.jsonl", b'{"text": "ok"}\n{"text": 7}\n', r"num.jsonl:2: not a JSON object with a 'text' string"),
    ("broken.jsonl", b'{"text": \n', r"broken.jsonl:1: not valid JSON"),
    ("latin1.txt", "na\u00efve".encode("latin-1"), r"latin1.txt is not UTF-8 text \(invalid byte at offset 2\)"),
    ("nul.txt", b"abc\x00def", r"nul.txt looks binary \(NUL byte at offset 3\)"),
    ("empty.jsonl", b"\n\n", r"empty.jsonl is empty"),
])
def test_bad_text_files_are_refused_not_corrupted(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DepthcutError, match=message):
        read_text(tmp_path / name)


def test_bom_is_dropped_and_json_strings_keep_line_separators(tmp_path):
    line = json.dumps({"text": "one\u2028two"}, ensure_ascii=False)
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode())
    assert read_text(tmp_path / "a.jsonl") == "one\u2028two"


def test_windows_of_fewer_than_two_tokens_are_refused():
    with pytest.raises(DepthcutError, match="windows need at least 2 tokens"):
        tokenize_windows("abcdef", CharTokenizer(), 1)
