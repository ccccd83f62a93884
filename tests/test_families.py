"""Every supported family end to end on a tiny random model (issue 5, part 1).

Scores from the fused pass equal the reference; the PPL criterion equals really deleting
the block; a pruned model saved and reloaded with stock transformers gives the same logits,
generates the same tokens with its KV cache, keeps per-layer config consistent and stays tied.
"""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthcut
from depthcut.models import FAMILIES as ENGINE_FAMILIES
from tiny_models import FAMILIES, random_tokens, tiny_config, tiny_model

CRITERIA = ["ppl", "taylor", "magnitude", "bi", "angular"]
SEQ_LEN = 24  # longer than every tiny sliding window, so the windows change the result
REMOVE = [1, 3]  # leaves a layer_types pattern that no prefix of the original list gives

# Every family as tests/tiny_models.py builds it, plus the per-layer forms that configs on the
# Hub also use: Qwen's "first k blocks full, the rest sliding" and Gemma3's period pattern.
pytestmark = pytest.mark.usefixtures("single_torch_thread")
CASES = {family: (family, {}) for family in FAMILIES}
CASES["qwen2_sliding"] = ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4})
CASES["gemma3_pattern"] = ("gemma3_text", {"sliding_window_pattern": 3, "layer_types": None})




@functools.lru_cache(maxsize=None)
def scored(case: str):
    """(model, tokens, fused scores, reference scores), computed once per case."""
    torch.set_num_threads(1)
    family, overrides = CASES[case]
    model = tiny_model(family, **overrides)
    ids = random_tokens(model, 3, SEQ_LEN)
    run = lambda scorer: depthcut.score(model, ids, CRITERIA, scorer=scorer, windows=[1, 3], dtype=torch.float32,
                                       progress=False)
    return model, ids, run("fused"), run("reference")


def pruned(case: str):
    model, ids, _, _ = scored(case)
    return model, ids, depthcut.prune_blocks(copy.deepcopy(model), REMOVE)


def test_every_engine_family_has_a_tiny_model_and_a_gguf_mapping():
    from depthcut.export_gguf import ARCHITECTURES

    assert set(ENGINE_FAMILIES) == set(FAMILIES) == set(ARCHITECTURES)


@pytest.mark.parametrize("case", CASES)
def test_fused_equals_reference(case):
    _, _, fused, ref = scored(case)
    assert set(ref) <= set(fused)
    for name in ref:
        f, r = torch.tensor(fused[name], dtype=torch.float64), torch.tensor(ref[name], dtype=torch.float64)
        assert torch.allclose(f, r, rtol=1e-4, atol=0), (name, f, r)
        assert fused.ranking(name, depthcut.Protect.none()) == ref.ranking(name, depthcut.Protect.none()), name


@pytest.mark.parametrize("case", CASES)
def test_ppl_criterion_equals_deleting_the_block(case):
    model, ids, fused, _ = scored(case)
    dense = depthcut.perplexity(model, ids)
    for i in range(len(model.model.layers)):
        deleted = depthcut.perplexity(depthcut.prune_blocks(copy.deepcopy(model), [i]), ids)
        assert deleted == pytest.approx(fused["ppl"][i], rel=1e-4)
        assert deleted != pytest.approx(dense, rel=1e-4)  # every block matters: the check has teeth


@pytest.mark.parametrize("case", CASES)
def test_saved_pruned_model_reloads_with_same_logits_and_cache(case, tmp_path):
    model, ids, small = pruned(case)
    depthcut.save_model(small, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(small)
    with torch.no_grad():
        want = small(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)

    # Greedy decoding with the in-memory model's KV cache (indexed by the renumbered layer_idx,
    # sliding layers kept by layer type) against the reloaded model recomputing everything.
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=0)
    cached = small.generate(ids[:1], use_cache=True, **gen)
    full = reloaded.generate(ids[:1], use_cache=False, **gen)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_per_layer_config_follows_the_kept_blocks(case, tmp_path):
    model, _, small = pruned(case)
    n = len(model.model.layers)
    keep = [i for i in range(n) if i not in REMOVE]
    depthcut.save_model(small, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for m in (small, reloaded):
        assert m.config.num_hidden_layers == len(m.model.layers) == len(keep)
        if getattr(model.config, "layer_types", None) is not None:
            assert m.config.layer_types == [model.config.layer_types[i] for i in keep]
    for new, (old, layer, fresh) in enumerate(zip(keep, small.model.layers, reloaded.model.layers)):
        assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), model.model.layers[old].parameters()))
        assert {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")} == {new}
        # What a freshly built layer derives from the cut config matches the moved layer.
        for attr in ("attention_type", "sliding_window", "is_sliding", "layer_type"):
            for a, b in ((layer, fresh), (layer.self_attn, fresh.self_attn)):
                assert getattr(a, attr, None) == getattr(b, attr, None), (new, attr)
    if getattr(model.config, "layer_types", None) is not None:  # the cut still mixes both kinds
        assert len(set(small.config.layer_types)) == len(set(model.config.layer_types))
    # Block-index scalars: Qwen's threshold still derives the cut layer_types; a period
    # pattern that no longer holds is not written at all.
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    if "max_window_layers" in saved and saved.get("use_sliding_window"):
        derived = type(model.config)(**{**saved, "layer_types": None})
        assert derived.layer_types == small.config.layer_types
    assert "sliding_window_pattern" not in saved and "_sliding_window_pattern" not in saved


@pytest.mark.parametrize("case", CASES)
def test_tied_embeddings_stay_tied(case, tmp_path):
    model, _, small = pruned(case)
    depthcut.save_model(small, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tied = bool(model.config.tie_word_embeddings)
    for m in (small, reloaded):
        assert m.config.tie_word_embeddings == tied
        same = m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        assert same == tied
    assert torch.equal(reloaded.lm_head.weight, small.lm_head.weight)


def test_some_family_is_tied_and_some_is_not():
    tied = {f: bool(tiny_config(f).tie_word_embeddings) for f in FAMILIES}
    assert any(tied.values()) and not all(tied.values())
