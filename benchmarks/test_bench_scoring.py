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

import engine  # noqa: E402
from engine import reference  # noqa: E402
from tiny_models import random_tokens, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    return model, random_tokens(model, 10, 128)


@pytest.mark.benchmark(group="ppl")
def test_fused_ppl(benchmark, setup):
    model, ids = setup
    benchmark.pedantic(lambda: engine.score(model, ids, ["ppl"], progress=False), rounds=3)


@pytest.mark.benchmark(group="ppl")
def test_reference_ppl(benchmark, setup):
    model, ids = setup
    benchmark.pedantic(lambda: reference.ppl_scores(model, ids), rounds=3)


@pytest.mark.benchmark(group="taylor")
def test_fused_taylor(benchmark, setup):
    model, ids = setup
    benchmark.pedantic(lambda: engine.score(model, ids, ["taylor"], progress=False), rounds=3)


@pytest.mark.benchmark(group="taylor")
def test_reference_taylor(benchmark, setup):
    model, ids = setup
    benchmark.pedantic(lambda: reference.taylor_scores(model, ids), rounds=3)


@pytest.mark.benchmark(group="all")
def test_fused_all_criteria_bf16(benchmark, setup):
    model, ids = setup
    benchmark.pedantic(lambda: engine.score(model, ids, ["ppl", "taylor", "magnitude", "bi"],
                                            dtype=torch.bfloat16, progress=False), rounds=3)
