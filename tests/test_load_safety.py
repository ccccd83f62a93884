"""Loading never runs a model folder's code, never fills missing weights with random ones, and
picks a compute precision that is fast on the machine at hand."""
import io
import json
import shutil
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

import depthcut
from depthcut import models
from depthcut.cli import main
from depthcut.errors import DepthcutError
from tiny_models import random_tokens, tiny_model

EVIL = """
import pathlib
pathlib.Path({sentinel!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""
AUTO_MAP = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


def plant_code(folder, model_type):
    """Give `folder` a module that leaves a sentinel file when imported, and configs that point at it."""
    sentinel = folder.parent / f"{folder.name}.ran"
    (folder / "modeling_evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update(model_type=model_type, auto_map=AUTO_MAP)
    config_path.write_text(json.dumps(config))
    tok_path = folder / "tokenizer_config.json"
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        tok["auto_map"] = {"AutoTokenizer": [None, "modeling_evil.EvilTokenizer"]}
        tok_path.write_text(json.dumps(tok))
    return sentinel


def test_folder_code_never_runs_even_when_stdin_says_yes(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    sentinel = plant_code(folder, "evil")
    proc = subprocess.run([sys.executable, "-m", "depthcut.cli", "score", str(folder)], input="y\n",
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines() == [err] and err.startswith("depthcut: error: unsupported architecture 'evil'"), err
    assert not sentinel.exists()


def test_transformers_is_never_allowed_to_run_it_either(tmp_path, monkeypatch):
    """Behind the architecture check, every transformers call is told trust_remote_code=False."""
    folder = tmp_path / f"evil-{uuid.uuid4().hex}"
    folder.mkdir()
    sentinel = plant_code(folder, "evil")
    monkeypatch.setattr(models, "check_architecture", lambda *args: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    with pytest.raises(DepthcutError, match="^cannot load model"):
        depthcut.load_model(folder, device="cpu")
    assert not sentinel.exists()


def test_known_architecture_loads_the_stock_class_not_the_folders(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "llama-with-auto-map"
    shutil.copytree(tiny_model_dir, folder)
    sentinel = plant_code(folder, "llama")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    model, tokenizer = depthcut.load_model(folder, device="cpu")
    assert type(model).__module__.startswith("transformers.models.llama.")
    assert not type(tokenizer).__name__.startswith("Evil")
    assert not sentinel.exists()


def test_hub_name_from_the_cache_is_checked_before_transformers(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = uuid.uuid4().hex + "0" * 8  # a fresh name: transformers caches a module it once ran by commit
    snapshot = tmp_path / "hub" / "models--someone--evil" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    sentinel = plant_code(snapshot, "evil")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    with pytest.raises(DepthcutError, match="^unsupported architecture 'evil'"):
        depthcut.load_model("someone/evil", device="cpu")
    assert not sentinel.exists()
    with pytest.raises(DepthcutError, match="^model not found: someone/missing"):
        depthcut.load_model("someone/missing", device="cpu")


@pytest.mark.parametrize("config, message", [
    (None, "no config.json"),
    ("{not json", "unreadable config.json"),
    ("[1, 2]", "is not a JSON object"),
    ("{}", "names no model_type"),
    ('{"model_type": ["llama"]}', "unsupported architecture"),
])
def test_bad_config_json_is_one_clear_error(tmp_path, config, message):
    folder = tmp_path / "m"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    with pytest.raises(DepthcutError, match=message):
        depthcut.load_model(folder, device="cpu")


def test_unknown_gguf_architecture_is_refused_before_transformers(tmp_path, monkeypatch):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", None)  # any call would fail differently
    with pytest.raises(DepthcutError, match="^unsupported architecture 'mamba'"):
        depthcut.load_model(path, device="cpu")
    assert models._GGUF_MODEL_TYPES["gemma3"] in models.FAMILIES


# ---------------------------------------------------------------- weights that do not match


def edited_copy(src, dst, edit):
    """A copy of the model folder `src` whose model.safetensors went through `edit`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(edit(tensors), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_missing_block_is_refused(tiny_model_dir, tmp_path):
    folder = edited_copy(tiny_model_dir, tmp_path / "m",
                         lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.3.")})
    with pytest.raises(DepthcutError, match=r"9 weights missing \(model\.layers\.3\.input_layernorm\.weight, "
                                            r"model\.layers\.3\..* and 6 more\)"):
        depthcut.load_model(folder, device="cpu")


def test_an_unexpected_tensor_is_refused(tiny_model_dir, tmp_path):
    folder = edited_copy(tiny_model_dir, tmp_path / "m",
                         lambda t: {**t, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(DepthcutError, match=r"1 unexpected weights \(model\.layers\.9\.mlp\.up_proj\.weight\)"):
        depthcut.load_model(folder, device="cpu")


def test_a_misshapen_tensor_is_refused(tiny_model_dir, tmp_path):
    def cut(t):
        t["model.norm.weight"] = t["model.norm.weight"][:16].clone()
        return t

    folder = edited_copy(tiny_model_dir, tmp_path / "m", cut)
    with pytest.raises(DepthcutError, match=r"wrong shape \(model\.norm\.weight \[16\] instead of \[32\]\)"):
        depthcut.load_model(folder, device="cpu")


def test_missing_head_is_refused_unless_tied(tiny_model_dir, smollm2_tokenizer, tmp_path):
    untied = edited_copy(tiny_model_dir, tmp_path / "untied",
                         lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(DepthcutError, match=r"1 weights missing \(lm_head\.weight\)"):
        depthcut.load_model(untied, device="cpu")
    tied = tmp_path / "gemma"
    tiny_model("gemma", vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=48,
               num_hidden_layers=4).save_pretrained(tied)
    smollm2_tokenizer.save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    model, _ = depthcut.load_model(tied, device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_larger_than_the_embedding_is_refused(smollm2_tokenizer, tmp_path):
    folder = tmp_path / "small-vocab"
    tiny_model("llama", vocab_size=211, hidden_size=32, intermediate_size=48).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    with pytest.raises(DepthcutError, match="tokenizer of 49152 tokens but embeddings for only 211"):
        depthcut.load_model(folder, device="cpu")


@pytest.mark.integration
def test_bundled_gguf_loads_with_a_clean_loading_report():
    model, tokenizer = depthcut.load_model(dtype=torch.float32, device="cpu")
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == model.config.vocab_size


# ---------------------------------------------------------------- compute precision


def cpu_with(monkeypatch, *features):
    monkeypatch.setattr(models, "_cpu_features", lambda: set(features))


@pytest.mark.parametrize("features, dtype, why", [
    (("avx2", "avx512_f"), torch.float32, "float32 (no native bf16 on this CPU)"),
    (("avx512_f", "avx512_bf16"), torch.bfloat16, "bfloat16 (native bf16 CPU: avx512_bf16)"),
    (("amx_tile", "amx_bf16", "avx512_bf16"), torch.bfloat16, "bfloat16 (native bf16 CPU: amx_bf16)"),
    (("neon", "bf16"), torch.bfloat16, "bfloat16 (native bf16 CPU: bf16)"),
])
def test_auto_compute_dtype_follows_the_cpu(monkeypatch, features, dtype, why):
    cpu_with(monkeypatch, *features)
    assert models.compute_dtype(torch.device("cpu"), torch.float32) == (dtype, why)
    assert models.compute_dtype(torch.device("cpu"), torch.bfloat16) == (dtype, why)


def test_compute_dtype_on_the_gpu_and_when_asked(monkeypatch):
    cpu_with(monkeypatch, "avx512_bf16")
    assert models.compute_dtype(torch.device("cuda"), torch.float16) == \
        (torch.float16, "float16 (the model's, on cuda)")
    assert models.compute_dtype(torch.device("cpu"), torch.bfloat16, torch.float32) == \
        (torch.float32, "float32 (requested)")
    assert models.compute_dtype(torch.device("cuda"), torch.float32, torch.float16)[0] == torch.float16
    with pytest.raises(DepthcutError, match="fp16 compute is not supported on the CPU"):
        models.compute_dtype(torch.device("cpu"), torch.float32, torch.float16)


def test_cpu_features_fall_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(models, "_CPUINFO", info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert models.native_bf16_cpu() is None
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert models.native_bf16_cpu() == "bf16"
    info.unlink()
    assert models.native_bf16_cpu() is None


@pytest.mark.parametrize("features, expected", [((), "float32"), (("avx512_bf16",), "bfloat16")])
def test_score_says_which_precision_it_chose(monkeypatch, features, expected):
    cpu_with(monkeypatch, *features)
    model = tiny_model("llama")
    scores = depthcut.score(model, random_tokens(model, 2, 9), ["ppl"], iterative=1, progress=False)
    assert scores.meta["dtype"] == expected and scores.meta["compute_dtype"].startswith(expected + " (")
    assert next(model.parameters()).dtype == torch.float32  # the pass ran on a copy
    assert "compute_dtype" not in depthcut.score(model, random_tokens(model, 2, 9), ["magnitude"], progress=False).meta


def test_cli_prints_the_chosen_precision_and_refuses_fp16_compute(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cpu_with(monkeypatch)
    small = ["--n-samples", "2", "--seq-len", "16", "--criteria", "ppl"]
    assert main(["score", str(tiny_model_dir), *small, "--dtype", "fp16", "--out", str(tmp_path / "s.json")]) == 0
    assert "(fused; float32 (no native bf16 on this CPU)); wrote" in capsys.readouterr().out
    assert main(["score", str(tiny_model_dir), *small, "--compute-dtype", "fp16", "--out",
                 str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "depthcut: error: fp16 compute is not supported on the CPU; use fp32 or bf16 " \
                                   "(or --compute-dtype auto)"
    assert "Traceback" not in err and not (tmp_path / "t.json").exists()
