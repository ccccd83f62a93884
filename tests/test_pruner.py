import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthcut
from depthcut import DepthcutError, blocks_for_ratio, prune_blocks, save_model
from tiny_models import random_tokens, tiny_model


def test_prune_renumbers_layers_and_config():
    model = tiny_model("llama")
    prune_blocks(model, [2, 5, 6])
    assert model.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]


def test_per_layer_config_lists_are_cut():
    model = tiny_model("llama")
    model.config.layer_types = [f"t{i}" for i in range(8)]
    model.config.eos_token_id = list(range(8))  # token ids are never per-layer
    prune_blocks(model, [0, 7])
    assert model.config.layer_types == [f"t{i}" for i in range(1, 7)]
    assert model.config.eos_token_id == list(range(8))


def test_pruned_generation_with_kv_cache_equals_no_cache():
    model = prune_blocks(tiny_model("qwen2"), [1, 4])
    ids = random_tokens(model, 1, 6)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_saved_model_reloads_with_stock_transformers(tmp_path, family):
    model = prune_blocks(tiny_model(family), [3, 4])
    ids = random_tokens(model, 2, 12)
    out = save_model(model, None, tmp_path / "pruned", {"removed": [3, 4], "num_blocks": 8, "criterion": "ppl"})
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 6
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert "ppl" in (out / "README.md").read_text()


def test_save_replaces_its_own_folder_and_no_one_elses(tmp_path):
    target = tmp_path / "m"
    save_model(tiny_model("llama"), None, target)
    save_model(prune_blocks(tiny_model("llama"), [1]), None, target)
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 7
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DepthcutError, match=r"did not write \(notes.txt\).*--force"):
        save_model(tiny_model("llama"), None, target)
    assert (target / "notes.txt").read_text() == "mine"
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 7
    save_model(tiny_model("llama"), None, target, force=True)
    assert not (target / "notes.txt").exists()
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 8


def test_failed_save_leaves_the_old_model(tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_model(tiny_model("llama"), None, target)
    model = prune_blocks(tiny_model("llama"), [1])
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model(model, None, target)
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 8
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_bad_block_lists():
    with pytest.raises(DepthcutError, match="out of range"):
        prune_blocks(tiny_model("llama"), [8])
    with pytest.raises(DepthcutError, match="at least one must stay"):
        prune_blocks(tiny_model("llama"), range(8))
    with pytest.raises(DepthcutError, match="ratio"):
        blocks_for_ratio(30, 1.5)
    assert blocks_for_ratio(30, 0.2) == 6


def test_prune_by_scores_end_to_end_api():
    model = tiny_model("llama", num_hidden_layers=10)
    ids = random_tokens(model, 3, 17)
    scores = depthcut.score(model, ids, ["ppl"], progress=False)
    blocks = scores.select("ppl", 2)
    pruned = prune_blocks(copy.deepcopy(model), blocks)
    expected = sorted(scores["ppl"][i] for i in range(4, 8))[:2]
    assert sorted(scores["ppl"][b] for b in blocks) == expected
    assert pruned.config.num_hidden_layers == 8
