"""The depthcut command: end to end on a tiny model folder, and one-line errors for bad input."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from depthcut.cli import main


def run(*args):
    return main([str(a) for a in args])


def test_score_prune_eval_end_to_end(tiny_model_dir, tmp_path, capsys):
    scores = tmp_path / "s.json"
    assert run("score", tiny_model_dir, "--n-samples", 4, "--seq-len", 32, "--criteria", "ppl,taylor,magnitude,bi",
               "--out", scores) == 0
    data = json.loads(scores.read_text())
    assert set(data["scores"]) >= {"ppl", "taylor", "magnitude", "bi"}
    assert all(len(v) == 8 for k, v in data["scores"].items())
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "pruned"
    assert run("prune", tiny_model_dir, "--remove", 2, "--criterion", "taylor", "--scores", scores,
               "--out", out) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    removed = json.loads((out / "depthcut.json").read_text())["removed"]
    assert removed == sorted(data["ranking"]["taylor"][:2])
    assert run("prune", tiny_model_dir, "--ratio", 0.25, "--n-samples", 4, "--seq-len", 32, "--eval",
               "--eval-windows", 4, "--out", tmp_path / "p2") == 0
    assert "perplexity" in capsys.readouterr().out
    assert run("eval", out, "--max-windows", 3, "--seq-len", 32) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["windows"] == 3


@pytest.mark.parametrize("args, message", [
    (["score", "/nonexistent/model.gguf"], "model file not found"),
    (["score", "/nonexistent/folder/x"], "model not found"),
    (["prune", "--ratio", "1.5", "--out", "x"], "ratio must be between 0 and 1"),
])
def test_bad_arguments_give_one_line_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expect_error(capsys, run(*args), message)


def expect_error(capsys, code, message):
    """Exit status 2 and the error is one line, the last one (progress lines may precede it)."""
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("depthcut: error:") and message in last, err


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    expect_error(capsys, run("score", bad), "bad magic")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    expect_error(capsys, run("score", truncated), "corrupt GGUF file")


def test_too_many_blocks_and_too_little_text(tiny_model_dir, tmp_path, capsys):
    expect_error(capsys, run("prune", tiny_model_dir, "--remove", 3, "--n-samples", 2, "--seq-len", 16,
                             "--out", tmp_path / "o"), "cannot remove 3 blocks")
    short = tmp_path / "short.txt"
    short.write_text("too little text")
    expect_error(capsys, run("score", tiny_model_dir, "--calib", short), "calibration text too short")
    expect_error(capsys, run("score", tiny_model_dir, "--calib", tmp_path / "nope.txt"), "text file not found")
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=100).save_pretrained(folder)
    expect_error(capsys, run("score", folder), "unsupported architecture 'gpt2'; supported: ")


def test_nan_in_model(tiny_model_dir, smollm2_tokenizer, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    smollm2_tokenizer.save_pretrained(tmp_path / "nan")
    expect_error(capsys, run("eval", tmp_path / "nan"), "NaN or infinite values in model.layers.2.mlp.up_proj.weight")


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "depthcut.cli", "eval", str(tmp_path / "missing.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("depthcut: error: model file not found")


def test_prune_and_export_gguf(tiny_model_dir, tmp_path, capsys):
    gguf_path = tmp_path / "tiny.q8_0.gguf"
    assert run("prune", tiny_model_dir, "--blocks", "2,5", "--out", tmp_path / "p", "--gguf", gguf_path,
               "--type", "q8_0") == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    assert loaded.config.num_hidden_layers == 6
    assert run("export", tmp_path / "p", "--gguf", tmp_path / "again.gguf") == 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("runner", ["runtime", "hf"])
def test_generate_prints_text_and_speed(tiny_model_dir, runner, capsys):
    assert run("generate", tiny_model_dir, "--prompt", "def f(x):", "--max-new-tokens", 6, "--runner", runner) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "decode:" in captured.err and "tok/s" in captured.err and f"({runner}" in captured.err


def test_runtime_and_hf_generate_agree(tiny_model_dir, capsys):
    texts = []
    for runner in ("runtime", "hf"):
        run("generate", tiny_model_dir, "--prompt", "import os", "--max-new-tokens", 8, "--runner", runner)
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_bench_writes_json_and_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert run("bench", tiny_model_dir, "--batch-sizes", 1, "--new-tokens", 4, "--warmup", 0, "--runs", 1,
               "--out", out) == 0
    data = json.loads((out / "speed.json").read_text())
    assert data["ratios"] and (out / "speed.png").read_bytes()[:4] == b"\x89PNG"
    assert "ratios measured in this run" in capsys.readouterr().out
