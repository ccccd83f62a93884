"""Narrow weights on the CPU: the runtime keeps fp32 activations and arithmetic over fp16
or bf16 weights, so it is the fp32 model with rounded weights, and its greedy tokens
follow Hugging Face's fp32 ones except where HF itself is at a near-tie."""
import copy

import pytest
import torch

from depthcut.runtime import Runtime
from tiny_models import random_tokens, tiny_model

NARROW = [torch.float16, torch.bfloat16]
# A divergence is a near-tie when HF's fp32 logits of its token and of the runtime's
# token differ by less than this (fp16-rounded weights move SmolLM2's logits ~1e-2).
NEAR_TIE = 0.1


def rounded(model, dtype):
    """A copy of the fp32 model whose weight matrices are rounded to `dtype` and back."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype).float())
    return model


@pytest.mark.parametrize("dtype", NARROW)
def test_narrow_weights_are_fp32_arithmetic_on_rounded_weights(dtype):
    model = tiny_model("qwen2")  # biases too
    ids = random_tokens(model, 2, 13)
    narrow = Runtime.from_hf(model, dtype=dtype)
    exact = Runtime.from_hf(rounded(model, dtype))
    assert narrow.weights.blocks[0].wqkv.dtype == dtype and narrow.weights.act_dtype == torch.float32
    torch.testing.assert_close(narrow.forward(ids), exact.forward(ids), atol=1e-5, rtol=1e-5)
    a, _ = narrow.generate(ids, max_new_tokens=16)
    b, _ = exact.generate(ids, max_new_tokens=16)
    assert torch.equal(a, b)


def first_divergence_is_a_near_tie(model, ids, tokens, n):
    """HF's greedy tokens; where ``tokens`` first differs, HF's fp32 margin must be tiny."""
    ref = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    hf = ref.sequences[0, ids.shape[1]:]
    diff = (tokens[0] != hf).nonzero()
    if not len(diff):
        return None
    j = int(diff[0])
    logits = ref.logits[j][0]
    margin = float(logits[hf[j]] - logits[tokens[0, j]])
    assert 0 <= margin < NEAR_TIE, (j, margin)
    return j


@pytest.mark.integration
@pytest.mark.parametrize("dtype", NARROW)
def test_smollm2_narrow_weights_follow_hf_up_to_near_ties(smollm2, dtype):
    model, tok = smollm2
    rt = Runtime.from_hf(model, dtype=dtype)
    prompts = ["The history of the Python programming language begins", "def fibonacci(n):",
               "In physics, energy is"]
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        tokens, _ = rt.generate(ids, max_new_tokens=64)
        first_divergence_is_a_near_tie(model, ids, tokens, 64)


def test_default_weight_dtype_is_fp16_on_the_cpu_when_the_weights_fit(monkeypatch):
    import depthcut.runtime as runtime

    model = tiny_model("llama")
    assert runtime.default_weight_dtype(model) == (torch.float16 if runtime.HAS_EXT else torch.float32)
    monkeypatch.setattr(runtime, "HAS_EXT", True)
    assert runtime.default_weight_dtype(model) == torch.float16
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = 7e4  # beyond fp16's 65504
    assert runtime.default_weight_dtype(model) == torch.float32
    monkeypatch.setattr(runtime, "HAS_EXT", False)  # narrow weights would be upcast every step
    assert runtime.default_weight_dtype(tiny_model("llama")) == torch.float32
