"""pytest-benchmark: fused single pass vs the reference path on a small random Llama.

Run with `pytest benchmarks/test_bench_scoring.py` (not part of `make test`); compare the
groups' means in one run.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import depthcut  # noqa: E402
from depthcut import reference  # noqa: E402
from tiny_models import random_tokens, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    return model, random_tokens(model, 10, 128)


RUNS = {
    "ppl": {"fused": lambda m, x: depthcut.score(m, x, ["ppl"], progress=False),
            "reference": reference.ppl_scores},
    "taylor": {"fused": lambda m, x: depthcut.score(m, x, ["taylor"], progress=False),
               "reference": reference.taylor_scores},
    "all": {"fused bf16": lambda m, x: depthcut.score(m, x, ["ppl", "taylor", "magnitude", "bi"],
                                                     dtype=torch.bfloat16, progress=False)},
}


@pytest.mark.parametrize("group, backend", [(g, b) for g, runs in RUNS.items() for b in runs])
def test_scoring(benchmark, setup, group, backend):
    model, ids = setup
    benchmark.group = group
    benchmark.pedantic(lambda: RUNS[group][backend](model, ids), rounds=3)
