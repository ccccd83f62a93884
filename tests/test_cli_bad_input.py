"""Every command with bad values: exit 2, the error is the last stderr line and one line,
no traceback, and the files already in the working folder are left exactly as they were."""
import hashlib
import json
import re
import shutil

import pytest
import torch

from depthcut import DepthcutError, perplexity, score
from depthcut.cli import _size, main
from depthcut.runtime import Runtime

M = "{model}"  # the tiny model folder
BARE = "{bare}"  # the same model, its tokenizer without a chat template


def _chats(turns):
    return "".join(json.dumps({"messages": turns}) + "\n" for _ in range(40))


FILES = {  # what the user had in the working folder before each command
    "notes.txt": b"my own notes, not to be touched\n",
    "null.jsonl": b'{"text": "fine"}\n{"text": null}\n',
    "num.jsonl": b'{"text": 3}\n',
    "empty.txt": b"\n  \n",
    "latin1.txt": "caf\u00e9 au lait".encode("latin-1"),
    "nul.txt": b"hello\x00world",
    "wizard.jsonl": _chats([{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "ok"}]).encode(),
    "user-only.jsonl": _chats([{"role": "user", "content": "hello there, how are you today? " * 3}]).encode(),
    "strings.json": json.dumps({"num_blocks": 8, "scores": {"ppl": ["a"] * 8}}).encode(),
    "short.json": json.dumps({"num_blocks": 8, "scores": {"ppl": [1.0] * 3}}).encode(),
}

FAST = ["--n-samples", "1", "--seq-len", "8"]
RETRAIN = ["retrain", M, "--steps", "1", "--out", "r"]
BENCH = ["bench", M, "--no-hf", "--batch-sizes", "1", "--new-tokens", "2", "--warmup", "0", "--runs", "1"]

ROWS = [  # (arguments, a fragment of the one-line error)
    # text files: null or numeric 'text', empty, not UTF-8, binary
    (["score", M, "--calib", "null.jsonl"], "null.jsonl:2: not a JSON object with a 'text' string"),
    (["score", M, "--calib", "num.jsonl"], "num.jsonl:1: not a JSON object with a 'text' string"),
    (["score", M, "--calib", "empty.txt"], "empty.txt is empty"),
    (["score", M, "--calib", "latin1.txt"], "latin1.txt is not UTF-8 text (invalid byte at offset 3)"),
    (["score", M, "--calib", "nul.txt"], "nul.txt looks binary (NUL byte at offset 5)"),
    (["eval", M, "--text", "num.jsonl"], "num.jsonl:1: not a JSON object"),
    (["eval", M, "--text", "latin1.txt"], "not UTF-8 text"),
    (RETRAIN + ["--data", "null.jsonl"], "null.jsonl:2: expected a 'text' string or a 'messages' list"),
    (RETRAIN + ["--data", "nul.txt"], "nul.txt looks binary"),
    (RETRAIN + ["--data", "wizard.jsonl"], "wizard.jsonl:1: unknown chat role 'wizard'"),
    (RETRAIN + ["--data", "user-only.jsonl", "--seq-len", "16", "--eval-windows", "1"],
     "nothing to train on in user-only.jsonl: its chats have no assistant turns"),
    # windows and prompts longer than the model's context (256)
    (["score", M, "--seq-len", "300", "--n-samples", "1", "--criteria", "magnitude"],
     "300-token windows are longer than the model's context of 256 tokens"),
    (["eval", M, "--seq-len", "300"], "300-token windows are longer than the model's context of 256"),
    (["generate", M, "--prompt", "hi", "--max-new-tokens", "100000"],
     "--max-new-tokens 100000 exceed the model's context of 256 tokens"),
    (["generate", M, "--prompt", "hi " * 300, "--max-new-tokens", "1", "--runner", "hf"],
     "exceed the model's context"),
    (BENCH + ["--new-tokens", "1000"],
     "32-token prompts and 1000 new tokens exceed the model's context of 256 tokens"),
    # streaming and torchrun-only refusals
    (["score", M, "--offload", "cpu", "--criteria", "bi"], "--offload cpu keeps the blocks in host memory for a GPU pass"),
    (["score", "--offload", "disk", "--criteria", "bi"], "--offload disk streams a Hugging Face folder"),
    (["prune", M, "--offload", "disk", "--remove", "1", "--eval", "--out", "cut"],
     "--eval with --offload: these need the whole model in memory"),
    # calibration and scoring counts
    (["score", "--n-samples", "0"], "argument --n-samples: must be at least 1, got 0"),
    (["score", "--n-samples", "-3"], "argument --n-samples: must be at least 1, got -3"),
    (["score", "--seq-len", "1"], "argument --seq-len: must be at least 2, got 1"),
    (["score", "--seq-len", "x"], "argument --seq-len: not an integer: 'x'"),
    (["score", "--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (["score", "--seed", str(2**70)], "argument --seed: must be in [0, 4294967295]"),
    (["score", "--window", "0"], "argument --window: must be at least 1, got 0"),
    (["score", "--keep-first", "-1"], "argument --keep-first: must be at least 0, got -1"),
    (["score", "--keep-last", "-2"], "argument --keep-last: must be at least 0, got -2"),
    (["score", "--iterative", "-1"], "argument --iterative: must be at least 0, got -1"),
    (["score", "--max-memory", "1e400"], "argument --max-memory: not a positive size such as 8GiB"),
    (["score", "--max-memory", "infGiB"], "argument --max-memory: not a positive size"),
    (["score", "--max-memory", "abc"], "argument --max-memory: not a positive size"),
    (["score", "--max-memory", "0"], "argument --max-memory: not a positive size"),
    (["score", "--max-memory=-5MiB"], "argument --max-memory: not a positive size"),
    (["score", "--max-memory", "nan"], "argument --max-memory: not a positive size"),
    # prune
    (["prune", "--remove", "0", "--out", "o"], "argument --remove: must be at least 1, got 0"),
    (["prune", "--blocks", "1,1", "--out", "o"], "argument --blocks: '1,1' names a value twice"),
    (["prune", "--blocks", "-1", "--out", "o"], "argument --blocks: must be at least 0, got -1"),
    (["prune", "--blocks", "two", "--out", "o"], "argument --blocks: not an integer: 'two'"),
    (["prune", "--blocks", ",", "--out", "o"], "argument --blocks: no values in ','"),
    (["prune", "--remove", "1", "--eval", "--eval-windows", "0", "--out", "o"],
     "argument --eval-windows: must be at least 1, got 0"),
    (["prune", M, "--remove", "1", "--criterion", "angularx", "--out", "o"] + FAST,
     "unknown criterion 'angularx': angular takes a window size"),
    (["prune", M, "--remove", "1", "--scores", "strings.json", "--out", "o"],
     "not a depthcut scores file: strings.json"),
    (["prune", M, "--remove", "1", "--scores", "short.json", "--out", "o"], "not a depthcut scores file: short.json"),
    (["prune", "--remove", "1", "--out", "o", "--retrain", "lora", "--retrain-steps", "0"],
     "argument --retrain-steps: must be at least 1, got 0"),
    (["prune", "--remove", "1", "--out", "o", "--retrain", "lora", "--retrain-lora-alpha", "0"],
     "argument --retrain-lora-alpha: must be > 0, got 0"),
    # eval
    (["eval", "--seq-len", "0"], "argument --seq-len: must be at least 2, got 0"),
    (["eval", "--max-windows", "-1"], "argument --max-windows: must be at least 0, got -1"),
    # generate: checked before the model is loaded
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1, got -3"),
    (["generate", "--prompt", "hi", "--do-sample", "--temperature", "0"],
     "--temperature must be a positive number with --do-sample, got 0.0"),
    (["generate", "--prompt", "hi", "--do-sample", "--temperature", "nan"], "--temperature must be a positive number"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "--prompt", "hi", "--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
    (["generate", BARE, "--prompt", "hi", "--chat"], "--chat: the model's tokenizer has no chat template"),
    # bench
    (["bench", "--batch-sizes", "0"], "argument --batch-sizes: must be at least 1, got 0"),
    (["bench", "--batch-sizes", ","], "argument --batch-sizes: no values in ','"),
    (["bench", "--batch-sizes", "1,1"], "argument --batch-sizes: '1,1' names a value twice"),
    (["bench", "--new-tokens", "0"], "argument --new-tokens: must be at least 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["bench", "--runs", "0"], "argument --runs: must be at least 1, got 0"),
    (["bench", "--keep", "0"], "argument --keep: must be at least 1, got 0"),
    (BENCH + ["--keep", "1"], "--keep must be between 2 and the model's 8 blocks, got 1"),
    (BENCH + ["--keep", "9"], "--keep must be between 2 and the model's 8 blocks, got 9"),
    # retraining counts and rates
    (["retrain", "--steps", "0", "--out", "r"], "argument --steps: must be at least 1, got 0"),
    (["retrain", "--tokens", "-1", "--out", "r"], "argument --tokens: must be at least 1, got -1"),
    (["retrain", "--batch-size", "0", "--out", "r"], "argument --batch-size: must be at least 1, got 0"),
    (["retrain", "--grad-accum", "0", "--out", "r"], "argument --grad-accum: must be at least 1, got 0"),
    (["retrain", "--global-batch", "0", "--out", "r"], "argument --global-batch: must be at least 1, got 0"),
    (["retrain", "--seq-len", "1", "--out", "r"], "argument --seq-len: must be at least 2, got 1"),
    (["retrain", "--lr", "0", "--out", "r"], "argument --lr: must be > 0, got 0"),
    (["retrain", "--lr", "-1", "--out", "r"], "argument --lr: must be > 0, got -1"),
    (["retrain", "--lr", "inf", "--out", "r"], "argument --lr: must be > 0, got inf"),
    (["retrain", "--lr", "nan", "--out", "r"], "argument --lr: must be > 0, got nan"),
    (["retrain", "--warmup", "-1", "--out", "r"], "argument --warmup: must be at least 0, got -1"),
    (["retrain", "--weight-decay", "-0.1", "--out", "r"], "argument --weight-decay: must be at least 0, got -0.1"),
    (["retrain", "--max-grad-norm", "-1", "--out", "r"], "argument --max-grad-norm: must be at least 0, got -1"),
    (["retrain", "--lora-rank", "0", "--out", "r"], "argument --lora-rank: must be at least 1, got 0"),
    (["retrain", "--lora-alpha", "-2", "--out", "r"], "argument --lora-alpha: must be > 0, got -2"),
    (["retrain", "--lora-dropout", "1", "--out", "r"], "argument --lora-dropout: must be in [0, 1), got 1"),
    (["retrain", "--distill-weight", "1.5", "--out", "r"], "argument --distill-weight: must be in [0, 1], got 1.5"),
    (["retrain", "--eval-every", "-1", "--out", "r"], "argument --eval-every: must be at least 0, got -1"),
    (["retrain", "--save-every", "-1", "--out", "r"], "argument --save-every: must be at least 0, got -1"),
    (["retrain", "--eval-windows", "-1", "--out", "r"], "argument --eval-windows: must be at least 0, got -1"),
    (["retrain", "--seed", "-1", "--out", "r"], "argument --seed: must be in [0, 4294967295]"),
    # demo
    (["demo", "--remove", "0"], "argument --remove: must be at least 1, got 0"),
]


@pytest.fixture(scope="module")
def bare_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template."""
    path = tmp_path_factory.mktemp("bare") / "tiny-bare"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in folder.rglob("*")}


@pytest.mark.parametrize("args, message", ROWS, ids=[" ".join(a)[:60] for a, _ in ROWS])
def test_bad_input_is_one_line_and_touches_nothing(args, message, tiny_model_dir, bare_model_dir, tmp_path,
                                                   monkeypatch, capsys):
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    argv = [a.replace(M, str(tiny_model_dir)).replace(BARE, str(bare_model_dir)) for a in args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage, then one error line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert re.match(rf"depthcut( {args[0]})?: error: ", lines[-1]) and message in lines[-1], err
    assert not [line for line in lines[:-1] if "error" in line.lower()], err  # the error is said once
    if lines[-1].startswith(f"depthcut {args[0]}:"):
        assert lines[0].startswith(f"usage: depthcut {args[0]}")
    assert _snapshot(tmp_path) == before  # nothing created, changed or deleted


def test_sizes_still_parse():
    assert _size("8GiB") == 8 << 30
    assert _size("512mib") == 512 << 20
    assert _size("2e9") == 2_000_000_000
    assert _size(" 1.5kb ") == 1500


def test_hf_decode_speed_is_a_real_figure(tiny_model_dir, capsys):
    """With one new token there is no decode to time; with several the rate is from the
    generate loop itself (it once printed 4e9 tok/s from a separately timed prefill)."""
    assert main(["generate", str(tiny_model_dir), "--prompt", "def f(x):", "--max-new-tokens", "1",
                 "--runner", "hf"]) == 0
    assert "decode: n/a" in capsys.readouterr().err
    assert main(["generate", str(tiny_model_dir), "--prompt", "def f(x):", "--max-new-tokens", "8",
                 "--runner", "hf"]) == 0
    rate = float(re.search(r"decode: ([0-9.]+) tok/s", capsys.readouterr().err).group(1))
    assert 0 < rate < 1e5


# ---------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def tiny():
    from tiny_models import tiny_model

    return tiny_model("llama")  # vocabulary 211, context 256


@pytest.mark.parametrize("ids, message", [
    (torch.full((2, 8), 211), "token id 211 is outside the model's vocabulary (0..210)"),
    (torch.full((2, 8), -1), "token id -1 is outside the model's vocabulary"),
    (torch.zeros((0, 8), dtype=torch.long), "the ids are an empty [0, 8] tensor"),
    (torch.zeros((1, 300), dtype=torch.long), "300-token windows are longer than the model's context of 256"),
    (torch.zeros((2, 8)), "an [N, T] int64 tensor"),
])
def test_score_and_perplexity_refuse_bad_token_ids(tiny, ids, message):
    with pytest.raises(DepthcutError, match=re.escape(message)):
        score(tiny, ids, ["ppl"], progress=False)
    with pytest.raises(DepthcutError, match=re.escape(message)):
        perplexity(tiny, ids)


@pytest.mark.parametrize("ids, kwargs, message", [
    (torch.tensor([[5, 211]]), {}, "token id 211 is outside the model's vocabulary (0..210)"),
    (torch.tensor([[-2, 5]]), {}, "token id -2 is outside"),
    (torch.zeros((1, 0), dtype=torch.long), {}, "the ids are an empty [1, 0] tensor"),
    (torch.tensor([[5, 6]]), {"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0"),
    (torch.tensor([[5, 6]]), {"do_sample": True, "temperature": -1.0}, "--temperature must be a positive number"),
    (torch.tensor([[5, 6]]), {"top_p": 2.0}, "--top-p must be in (0, 1], got 2.0"),
    (torch.tensor([[5, 6]]), {"top_k": 0}, "--top-k must be at least 1, got 0"),
])
def test_runtime_refuses_bad_token_ids_and_settings(tiny, ids, kwargs, message):
    rt = Runtime.from_hf(tiny, use_cuda_graph=False)
    with pytest.raises(DepthcutError, match=re.escape(message)):
        rt.generate(ids, **{"max_new_tokens": 2, **kwargs})
    if not kwargs:
        with pytest.raises(DepthcutError, match=re.escape(message)):
            rt.forward(ids)
