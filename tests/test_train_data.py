"""Retraining data: reading, chat masks on assistant tokens, packing, and the evaluation split."""
import json

import pytest
import torch

from depthcut.calibration import Calibration
from depthcut.errors import DepthcutError
from depthcut.train_data import (
    IGNORE_INDEX,
    Document,
    TrainingSet,
    chat_spans,
    pack,
    read_documents,
    tokenize_document,
)

CHAT = [{"role": "user", "content": "What is a generator?"},
        {"role": "assistant", "content": "A function that yields values lazily."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."}]


def test_chat_loss_covers_exactly_the_assistant_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text, spans = chat_spans(tok, CHAT)
    assert [text[s:e] for s, e in spans] == ["A function that yields values lazily.<|im_end|>\n",
                                             "You are welcome.<|im_end|>\n"]
    ids, trained = tokenize_document(Document(messages=CHAT), tok)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    trained_text = tok.decode([i for i, t in zip(ids, trained) if t])
    assert trained_text == "A function that yields values lazily.<|im_end|>\nYou are welcome.<|im_end|>\n"
    assert "user" not in trained_text and "assistant" not in trained_text


def test_pack_joins_documents_with_eos_and_masks_chats(smollm2_tokenizer):
    tok = smollm2_tokenizer
    docs = [Document(text="alpha beta gamma " * 20), Document(messages=CHAT), Document(text="delta " * 30)]
    ids, labels = pack(docs, tok, seq_len=16)
    stream = []
    for d in docs:
        stream += tokenize_document(d, tok)[0] + [tok.eos_token_id]
    assert ids.shape == (len(stream) // 16, 16)
    assert ids.flatten().tolist() == stream[: ids.numel()]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    n_text = len(tokenize_document(docs[0], tok)[0]) + 1
    assert trained.flatten()[:n_text].all()  # plain text and its EOS are trained
    assert not trained.flatten()[n_text:n_text + 5].all()  # the chat's system/user header is not


def test_read_documents_formats(tmp_path, smollm2_tokenizer):
    import datasets

    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"messages": CHAT}) + "\n")
    datasets.Dataset.from_dict({"text": ["p1", "p2"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert read_documents(tmp_path / "a.txt") == [Document(text="plain text")]
    assert read_documents(tmp_path / "b.jsonl") == [Document(text="one"), Document(messages=CHAT)]
    assert read_documents(tmp_path / "c.parquet") == [Document(text="p1"), Document(text="p2")]


@pytest.mark.parametrize("content, message", [
    (b'{"text": null}\n', "expected a 'text' string"),
    (b'{"text": 3}\n', "expected a 'text' string"),
    (b'{"messages": [{"role": "user"}]}\n', "expected a 'text' string"),
    (b'not json\n', "not valid JSON"),
    (b'\xff\xfe binary', "not UTF-8"),
])
def test_bad_rows_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / ("bad.jsonl" if content.startswith((b"{", b"n")) else "bad.txt")
    path.write_bytes(content)
    with pytest.raises(DepthcutError, match=message):
        read_documents(path)


def test_default_text_never_trains_on_calibration_or_evaluation(smollm2_tokenizer):
    data = TrainingSet.from_default_text(smollm2_tokenizer, seq_len=128, eval_windows=40)
    calib = Calibration.load(smollm2_tokenizer)
    assert torch.equal(data.eval_ids, calib.heldout_ids[:40])  # what prune --eval and the demo evaluate
    seen = {tuple(w) for w in data.train_ids.tolist()}
    assert not seen & {tuple(w) for w in calib.input_ids.tolist()}
    assert not seen & {tuple(w) for w in data.eval_ids.tolist()}
    assert len(data.train_ids) + 40 + 10 == len(calib.heldout_ids) + 10
    assert data.describe()["train_windows"] == len(data.train_ids)


def test_documents_split_is_disjoint_seeded_and_recorded(smollm2_tokenizer):
    docs = [Document(text=f"document number {i} " * 12) for i in range(30)]
    a = TrainingSet.from_documents(docs, smollm2_tokenizer, 16, "docs", eval_windows=5, seed=7)
    b = TrainingSet.from_documents(docs, smollm2_tokenizer, 16, "docs", eval_windows=5, seed=7)
    ids, _ = pack(docs, smollm2_tokenizer, 16)
    held = a.split["eval_window_indices"]
    assert torch.equal(a.eval_ids, ids[held]) and torch.equal(a.eval_ids, b.eval_ids)
    assert len(a.train_ids) == len(ids) - 5
    assert torch.equal(a.train_ids, ids[[i for i in range(len(ids)) if i not in held]])
    with pytest.raises(DepthcutError, match="training data too short"):
        TrainingSet.from_documents(docs[:1], smollm2_tokenizer, 16, "one doc", eval_windows=5)


@pytest.mark.parametrize("content, message", [
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}\n', "bad.jsonl:1: unknown chat role 'wizard'"),
    (b"\n \n", "bad.txt is empty"),
    (b"text\x00more", r"looks binary \(NUL byte at offset 4\)"),
])
def test_unknown_roles_empty_and_binary_files_are_refused(tmp_path, content, message):
    path = tmp_path / ("bad.jsonl" if content.startswith(b"{") else "bad.txt")
    path.write_bytes(content)
    with pytest.raises(DepthcutError, match=message):
        read_documents(path)


def test_a_chat_template_refusal_names_the_line(smollm2_tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    docs = read_documents(tmp_path / "c.jsonl")
    with pytest.raises(DepthcutError, match=r"c\.jsonl:2: the tokenizer's chat template refuses it: roles must"):
        pack(docs, tok, 16)


def test_chats_without_assistant_turns_leave_nothing_to_train_on(smollm2_tokenizer):
    docs = [Document(messages=[{"role": "user", "content": f"question number {i} " * 8}]) for i in range(20)]
    with pytest.raises(DepthcutError, match="nothing to train on in chats"):
        TrainingSet.from_documents(docs, smollm2_tokenizer, 16, "chats", eval_windows=1)
