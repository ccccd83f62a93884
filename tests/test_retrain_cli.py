"""depthcut retrain and prune --retrain end to end; bad input; kill -9 and resume; two processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from test_cli import expect_error, run

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--seq-len", 32, "--batch-size", 2, "--eval-windows", 4]


def test_retrain_writes_a_plain_model_log_plot_and_card(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "healed"
    assert run("retrain", tiny_model_dir, *TRAIN, "--steps", 3, "--eval-every", 2, "--save-adapter",
               "--out", out) == 0
    assert "perplexity" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 8 and not any("lora" in k for k in model.state_dict())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]
    assert [e["step"] for e in log if "eval_ppl" in e] == [0, 2, 3]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "adapter" / "adapter_config.json").is_file()
    card = json.loads((out / "depthcut.json").read_text())["retraining"]
    assert card["recipe"]["method"] == "lora" and card["recipe"]["lr"] == 1e-4 and card["steps"] == 3
    assert card["data"]["source"] == "pydoc_data.topics" and "held apart" in card["data"]["rule"]
    assert "## Retraining" in (out / "README.md").read_text()


def test_prune_then_retrain_then_gguf_in_one_command(tiny_model_dir, tmp_path):
    out, gguf = tmp_path / "cut", tmp_path / "cut.gguf"
    assert run("prune", tiny_model_dir, "--remove", 2, "--n-samples", 4, "--seq-len", 32, "--out", out,
               "--retrain", "full", "--retrain-steps", 2, "--retrain-seq-len", 32, "--retrain-batch-size", 2,
               "--retrain-distill-weight", 0.5, "--retrain-eval-windows", 4, "--gguf", gguf) == 0
    card = json.loads((out / "depthcut.json").read_text())
    assert len(card["removed"]) == 2 and card["retraining"]["recipe"]["method"] == "full"
    assert card["retraining"]["recipe"]["distill_weight"] == 0.5 and card["retraining"]["recipe"]["teacher_blocks"] == 8
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    assert AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name).config.num_hidden_layers == 6


@pytest.fixture(scope="module")
def other_tokenizer_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with one token added to its tokenizer: a teacher that does not fit."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("other") / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<depthcut-extra>"])
    model.resize_token_embeddings(len(tok))  # a loadable model, only its vocabulary differs
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_bad_retraining_input(tiny_model_dir, other_tokenizer_dir, tmp_path, capsys):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("a few words")
    cases = [
        (["--data", empty, "--steps", 1], "empty.txt is empty"),
        (["--data", short, "--steps", 1, "--eval-windows", 0], "training data too short"),
        (["--data", tmp_path / "missing.jsonl", "--steps", 1], "training data file not found"),
        ([], "say how long to retrain"),
        (["--steps", 1, "--resume"], "--resume: no checkpoint"),
        (["--steps", 1, "--teacher", other_tokenizer_dir, "--distill-weight", 0.5], "tokenizer differs"),
        (["--steps", 1, "--distill-weight", 0.5], "needs a teacher"),
        (["--steps", 1, "--global-batch", 3], "not a multiple"),
        (["--steps", 1, "--dataset", "no-such/dataset-anywhere"], "cannot read dataset"),
        (["--steps", 1, "--data", short, "--dataset", "x"], "not both"),
    ]
    expect_error(capsys, run("prune", tiny_model_dir, "--remove", 1, "--retrain-steps", 3, "--out", tmp_path / "never"),
                 "--retrain-steps given without --retrain")
    for extra, message in cases:
        out = tmp_path / "never"
        expect_error(capsys, run("retrain", tiny_model_dir, *TRAIN, *extra, "--out", out), message)
        assert not out.exists()


def _cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return [sys.executable, "-m", "depthcut.cli", *map(str, args)], env


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    recipe = ["retrain", tiny_model_dir, "--seq-len", 64, "--batch-size", 4, "--eval-windows", 2, "--steps", 24,
              "--save-every", 4, "--lr", 1e-3]
    cmd, env = _cli(*recipe, "--out", tmp_path / "whole")
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = _cli(*recipe, "--out", tmp_path / "cut")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "cut.train" / "checkpoints" / "step-00000008"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut").exists()

    cmd, env = _cli(*recipe, "--resume", "--out", tmp_path / "cut")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = json.loads((tmp_path / "cut" / "depthcut.json").read_text())["retraining"]
    assert card["resumed_from_step"] >= 8
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    def losses(folder):
        return [(e["step"], e.get("loss")) for e in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines())]

    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert [step for step, _ in losses(tmp_path / "cut")] == list(range(25))


def test_two_processes_give_the_one_process_loss_curve(tiny_model_dir, tmp_path):
    """torchrun, gloo: 2 processes x batch 2 against 1 process x batch 2 x 2 accumulation."""
    recipe = ["retrain", tiny_model_dir, "--seq-len", 32, "--batch-size", 2, "--global-batch", 4, "--steps", 4,
              "--lr", 1e-3, "--lora-dropout", 0, "--eval-windows", 2]
    cmd, env = _cli(*recipe, "--out", tmp_path / "one")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    cmd, env = _cli(*recipe, "--out", tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000)] + cmd[1:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    def curve(folder):
        return [e["loss"] for e in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines())
                if "loss" in e]

    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(one) == len(two) == 4 and one[0] != one[-1]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    card = json.loads((tmp_path / "two" / "depthcut.json").read_text())["retraining"]
    assert card["recipe"]["processes"] == 2 and card["global_batch"] == 4
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
