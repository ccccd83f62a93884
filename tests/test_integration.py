"""On the real SmolLM2-135M-Instruct (30 blocks), CPU, fp32: the paper's default 10 x 128 calibration."""
import copy
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthcut
from depthcut import Calibration, Protect, perplexity, prune_blocks, save_model

pytestmark = pytest.mark.integration
CRITERIA = ["ppl", "taylor", "magnitude", "bi"]


@pytest.fixture(scope="module")
def calib(smollm2):
    return Calibration.load(smollm2[1])


@pytest.fixture(scope="module")
def fused(smollm2, calib):
    return depthcut.score(smollm2[0], calib, CRITERIA, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def heldout(calib):
    return calib.heldout_ids[:16]


def test_scores_are_finite_and_early_blocks_matter(fused):
    for c in CRITERIA:
        assert len(fused[c]) == 30 and all(math.isfinite(v) for v in fused[c]), c
    most_important = fused.ranking("ppl", Protect.none())[-5:]
    assert {0, 1} <= set(most_important)
    assert fused.meta["dense_ppl"] < min(fused["ppl"])  # removing any block hurts on calibration text


def test_fused_equals_reference_on_the_real_model(smollm2, calib):
    model = smollm2[0]
    ids = calib.input_ids[:4, :64]  # the reference path is slow on 2 cores; exactness needs no more
    ref = depthcut.score(model, ids, ["ppl", "taylor", "bi"], scorer="reference", progress=False)
    fused = depthcut.score(model, ids, ["ppl", "taylor", "bi"], dtype=torch.float32, progress=False)
    for c in ("ppl", "taylor", "bi"):
        err = max(abs(a - b) / abs(b) for a, b in zip(fused[c], ref[c]))
        assert err < 1e-4, (c, err)
        assert fused.ranking(c) == ref.ranking(c), c


def test_ppl_pruning_beats_random_middle_blocks(smollm2, fused, heldout):
    model = smollm2[0]
    chosen = fused.select("ppl", 6)
    by_ppl = perplexity(prune_blocks(copy.deepcopy(model), chosen), heldout)
    random_blocks = random.Random(0).sample(range(4, 28), 6)
    by_chance = perplexity(prune_blocks(copy.deepcopy(model), random_blocks), heldout)
    assert by_ppl < by_chance, (chosen, by_ppl, random_blocks, by_chance)


def test_pruned_smollm2_saves_and_reloads(smollm2, fused, tmp_path):
    model, tokenizer = smollm2
    pruned = prune_blocks(copy.deepcopy(model), fused.select("taylor", 6))
    out = save_model(pruned, tokenizer, tmp_path / "smol-24")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pruned(ids).logits, atol=1e-4)
    assert loaded.config.num_hidden_layers == 24


def test_lora_heals_the_ppl_pruned_smollm2(smollm2, fused, tmp_path):
    """A few steps of the demo's recipe on windows neither calibration nor evaluation uses."""
    from depthcut.retrain import RetrainConfig, retrain
    from depthcut.train_data import TrainingSet

    model, tokenizer = smollm2
    pruned = prune_blocks(copy.deepcopy(model), fused.select("ppl", 6))
    data = TrainingSet.from_default_text(tokenizer, eval_windows=8)
    cfg = RetrainConfig(steps=4, batch_size=4, lr=1e-3, warmup=0)
    s = retrain(pruned, data, cfg, tmp_path / "run", progress=False).summary
    assert s["perplexity_after"] < 0.85 * s["perplexity_before"], s
