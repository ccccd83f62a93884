"""Several devices in one process: blocks spread by a device map give the one-device scores, the
variant stack following them; a map that spills onto the CPU or disk is refused."""
import copy

import pytest
import torch

import depthcut
from depthcut.errors import DepthcutError
from depthcut.models import check_placement
from test_cli import expect_error, run
from tiny_models import random_tokens, tiny_model

CRITERIA = ["ppl", "taylor", "bi", "angular", "magnitude"]


def test_a_device_map_loads_and_scores_as_the_plain_load(tiny_model_dir):
    """Without GPUs accelerate's placement is the CPU: the same model, the same scores."""
    plain, _ = depthcut.load_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    mapped, _ = depthcut.load_model(tiny_model_dir, dtype=torch.float32, device_map="auto")
    ids = random_tokens(plain, 3, 17, seed=2)
    want = depthcut.score(plain, ids, CRITERIA, windows=[2], progress=False)
    got = depthcut.score(mapped, ids, CRITERIA, windows=[2], progress=False)
    for c in want:
        assert got[c] == want[c], c
    with pytest.raises(DepthcutError, match="unknown device map 'everywhere'"):
        depthcut.load_model(tiny_model_dir, device_map="everywhere")


def test_a_map_that_spills_off_the_gpus_is_refused(monkeypatch):
    model = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(DepthcutError, match="does not fit the GPUs .* parts on cpu and disk\\): use --offload"):
        check_placement(model, "m")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    check_placement(model, "m")  # GPUs only


def test_cli_device_map(tiny_model_dir, tmp_path, capsys):
    assert run("score", tiny_model_dir, "--device-map", "auto", "--criteria", "ppl,bi", "--n-samples", 2,
               "--seq-len", 16, "--out", tmp_path / "s") == 0
    assert run("prune", tiny_model_dir, "--device-map", "auto", "--remove", 2, "--n-samples", 2, "--seq-len", 16,
               "--eval", "--out", tmp_path / "p") == 0
    pruned, _ = depthcut.load_model(tmp_path / "p", device="cpu")
    assert pruned.config.num_hidden_layers == 6
    expect_error(capsys, run("score", tiny_model_dir, "--device-map", "auto", "--offload", "disk",
                             "--out", tmp_path / "t"), "--offload and --device-map exclude each other")
    expect_error(capsys, run("prune", tiny_model_dir, "--device-map", "auto", "--remove", 1, "--retrain", "lora",
                             "--out", tmp_path / "p"), "--retrain with --device-map: retraining runs on one device")


def _spread(model, devices):
    """The first half of the blocks (and the embedding) on devices[0], the rest (and the final
    norm and head) on devices[1]: what a device map does, without accelerate's hooks, so the walk
    alone must carry every tensor across."""
    half = len(model.model.layers) // 2
    model.model.embed_tokens.to(devices[0])
    model.model.rotary_emb.to(devices[0])
    for i, layer in enumerate(model.model.layers):
        layer.to(devices[0] if i < half else devices[1])
    model.model.norm.to(devices[1])
    model.lm_head.to(devices[1])
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", [None, 60_000])  # one chunk; several (the per_block Taylor backward)
@pytest.mark.parametrize("angular_tokens", ["all", "last"])
def test_blocks_on_two_devices_give_the_one_device_scores(budget, angular_tokens):
    """Two GPUs when there are two, else the GPU and the CPU."""
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    model = tiny_model("llama", seed=3, tie_word_embeddings=False).float()
    ids = random_tokens(model, 4, 23, seed=5)
    one = copy.deepcopy(model).to("cuda:0")
    want = depthcut.score(one, ids, CRITERIA, windows=[1, 2], angular_tokens=angular_tokens, max_memory=budget,
                          progress=False)
    spread = _spread(model, ["cuda:0", second])
    got = depthcut.score(spread, ids, CRITERIA, windows=[1, 2], angular_tokens=angular_tokens, max_memory=budget,
                         progress=False)
    for c in want:
        torch.testing.assert_close(torch.as_tensor(got[c]), torch.as_tensor(want[c]), rtol=2e-4, atol=1e-6, msg=c)
