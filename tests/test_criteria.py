"""The criteria against direct implementations of the definitions in docs/DESIGN.md, "Criteria", on tiny random models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import depthcut
from depthcut import reference
from depthcut.evaluate import perplexity
from tiny_models import FAMILIES, random_tokens, tiny_model

BASE = ["llama", "mistral", "qwen2", "qwen3"]


def direct_taylor(model, ids):
    """The definition of docs/DESIGN.md, "Criteria", verbatim: one loss over the whole set, one backward, then Σ|W ⊙ ∂L/∂W|."""
    model = copy.deepcopy(model)
    model.zero_grad()
    logits = model(ids).logits[:, :-1].float()
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    return [sum((p * p.grad).abs().sum().item() for p in layer.parameters()) for layer in model.model.layers]


def rel(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("family", BASE)
def test_reference_ppl_equals_deleting_the_block(family):
    model = tiny_model(family, seed=1)
    ids = random_tokens(model, 4, 21, seed=2)
    scores = reference.ppl_scores(model, ids, batch_size=3)
    deleted = [perplexity(depthcut.prune_blocks(copy.deepcopy(model), [i]), ids) for i in range(8)]
    assert rel(scores, deleted) < 1e-5


@pytest.mark.parametrize("family", BASE)
def test_reference_taylor_is_signed_over_the_whole_set(family):
    model = tiny_model(family, seed=3)
    ids = random_tokens(model, 5, 17, seed=4)
    direct = direct_taylor(model, ids)
    assert rel(reference.taylor_scores(model, ids, batch_size=5), direct) < 1e-4
    assert rel(reference.taylor_scores(model, ids, batch_size=2), direct) < 1e-4  # split, still signed
    # Summing |.| per batch instead would be a different (wrong) number:
    per_batch = [sum(v) for v in zip(direct_taylor(model, ids[:2]), direct_taylor(model, ids[2:]))]
    assert rel(per_batch, direct) > 1e-2


def test_magnitude_is_the_sum_of_absolute_block_weights():
    model = tiny_model("llama")
    expected = [sum(p.abs().sum().item() for p in layer.parameters()) for layer in model.model.layers]
    assert rel(reference.magnitude_scores(model), expected) < 1e-6


def test_block_influence_matches_its_definition():
    model = tiny_model("llama", seed=5)
    ids = random_tokens(model, 3, 19)
    h = []
    hooks = [layer.register_forward_hook(lambda m, a, o: h.append(o)) for layer in model.model.layers]
    with torch.no_grad():
        x0 = model.model.embed_tokens(ids)
        model(ids)
    for k in hooks:
        k.remove()
    stream = [x0] + h
    bi = [1 - F.cosine_similarity(stream[i], stream[i + 1], dim=-1).mean().item() for i in range(8)]
    ang2 = [(torch.arccos(F.cosine_similarity(stream[i], stream[i + 2], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
            for i in range(7)]
    got = reference.stream_scores(model, ids, windows=(2,), batch_size=2)
    assert rel(got["bi"], bi) < 1e-4
    assert rel(got["angular2"], ang2) < 1e-4


def pruneme_angular(model, ids, n):
    """PruneMe's angular distance, as its code computes it: Hugging Face's hidden_states (the last
    one after the final norm), the last token of each sequence, averaged over sequences."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    last = [h[:, -1] for h in hs]
    return [(torch.arccos(F.cosine_similarity(last[i], last[i + n], dim=-1).clamp(-1, 1)) / math.pi).mean().item()
            for i in range(len(last) - n)]


@pytest.mark.parametrize("scorer", ["reference", "fused"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_last_token_angular_reproduces_pruneme(scorer, family):
    model = tiny_model(family, seed=8)
    ids = random_tokens(model, 5, 13, seed=9)
    got = depthcut.score(model, ids, ["angular"], scorer=scorer, windows=[1, 3], angular_tokens="last",
                         dtype=torch.float32, progress=False)
    for n in (1, 3):
        assert rel(got[f"angular{n}"], pruneme_angular(model, ids, n)) < 1e-4
    every_token = depthcut.score(model, ids, ["angular"], scorer=scorer, progress=False, dtype=torch.float32)
    assert rel(got["angular1"], every_token["angular1"]) > 1e-2  # the two conventions differ
    assert got.meta["angular_tokens"] == "last"


ALL = ["ppl", "taylor", "magnitude", "bi", "angular"]


@pytest.mark.parametrize("family", BASE)
@pytest.mark.parametrize("max_memory", [None, 60_000])  # 60 kB forces one window per chunk
def test_fused_equals_reference(family, max_memory):
    model = tiny_model(family, seed=6)
    ids = random_tokens(model, 4, 23, seed=7)
    ref = depthcut.score(model, ids, ALL, scorer="reference", windows=[1, 3], progress=False)
    fused = depthcut.score(model, ids, ALL, scorer="fused", windows=[1, 3], max_memory=max_memory, dtype=torch.float32,
                         progress=False)
    if max_memory:
        assert fused.meta["windows_per_chunk"] == 1 and fused.meta["taylor_accumulator_bytes"] > 0
    for c in ref:
        assert rel(fused[c], ref[c]) < 1e-4, c
        assert fused.ranking(c) == ref.ranking(c), c


@pytest.mark.parametrize("backward", ["per_block", "per_chunk"])
def test_taylor_over_several_chunks_keeps_the_sign_until_the_end(backward):
    """Both several-chunk backwards give the definition's scores and the first-order estimate."""
    from depthcut.single_pass import SinglePass, accumulator_bytes

    model = tiny_model("llama", seed=12)
    ids = random_tokens(model, 5, 19, seed=13)
    one = SinglePass(model, {"taylor"}, dtype=torch.float32)
    whole = one.run(ids, progress=False)
    sp = SinglePass(model, {"taylor"}, max_memory=60_000, dtype=torch.float32, several_chunks_backward=backward)
    chunked = sp.run(ids, progress=False)
    assert one.taylor_backward == "one_gemm" and sp.plan.windows_per_chunk < len(ids)
    assert sp.taylor_backward == backward
    assert rel(sp.taylor_scores, direct_taylor(model, ids)) < 1e-4
    assert rel(chunked.first_order.tolist(), whole.first_order.tolist()) < 1e-4
    blocks = list(range(model.config.num_hidden_layers))
    assert sp.taylor_accumulator_bytes == accumulator_bytes(sp.adapter, blocks, backward)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    if backward == "per_block":  # one block's accumulators; every chunk's L+1 boundaries and gradient wait
        assert sp.taylor_accumulator_bytes == linear_bytes // len(blocks)
        assert sp.taylor_stored_bytes == (len(blocks) + 2) * ids.numel() * model.config.hidden_size * 4
    else:
        assert sp.taylor_accumulator_bytes == linear_bytes and sp.taylor_stored_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_per_block_taylor_waits_in_host_memory():
    """Over budget on a GPU, the chunks' boundaries wait in pinned host memory: same scores."""
    from depthcut.single_pass import SinglePass

    model = tiny_model("llama", seed=12).cuda()
    ids = random_tokens(model, 5, 19, seed=13)
    for criteria in ({"taylor", "ppl"}, {"taylor", "ppl", "angular"}):
        sp = SinglePass(model, criteria, windows=(2,) if "angular" in criteria else (), max_memory=60_000,
                        dtype=torch.float32)
        sp.run(ids, progress=False)
        assert (sp.taylor_backward, sp.taylor_store.type) == ("per_block", "cpu")
        assert rel(sp.taylor_scores, direct_taylor(model, ids.cuda())) < 1e-4


def test_cpu_picks_the_smaller_several_chunk_backward():
    """On a CPU the stored streams and the accumulators share one memory: the smaller wins."""
    from depthcut.single_pass import SinglePass

    model = tiny_model("llama", seed=12)
    short = SinglePass(model, {"taylor"}, max_memory=60_000, dtype=torch.float32)
    short.run(random_tokens(model, 5, 19, seed=13), progress=False)  # streams ≈ 0.24 MB < accumulators ≈ 0.98 MB
    long = SinglePass(model, {"taylor"}, max_memory=60_000, dtype=torch.float32)
    long.run(random_tokens(model, 6, 200, seed=13), progress=False)  # streams ≈ 3.1 MB
    assert (short.taylor_backward, long.taylor_backward) == ("per_block", "per_chunk")


def test_fused_with_fixed_shape_groups_equals_reference():
    """The padded constant-size variant groups used on the GPU give the same numbers."""
    from depthcut import single_pass

    model = tiny_model("llama", seed=8)
    ids = random_tokens(model, 3, 15)
    sp = single_pass.SinglePass(model, {"ppl"})
    plan = single_pass.Plan(windows_per_chunk=2, variant_batch=4, fixed_shapes=True, variants=9)
    orig = single_pass.make_plan
    single_pass.make_plan = lambda *a, **k: plan
    try:
        r = sp.run(ids, progress=False)
    finally:
        single_pass.make_plan = orig
    fused = [math.exp(v / r.count) for v in r.nll[1:].tolist()]
    assert rel(fused, reference.ppl_scores(model, ids)) < 1e-5


def test_bf16_pass_keeps_the_ranking_up_to_near_ties():
    model = tiny_model("llama", seed=9)
    ids = random_tokens(model, 4, 33)
    f32 = depthcut.score(model, ids, ["ppl", "taylor"], dtype=torch.float32, progress=False)
    b16 = depthcut.score(model, ids, ["ppl", "taylor"], dtype=torch.bfloat16, progress=False)
    for c in ("ppl", "taylor"):
        assert rel(b16[c], f32[c]) < 0.05
        # blocks may swap only where their fp32 scores are within 2 % of each other
        for a, b in zip(f32.ranking(c), b16.ranking(c)):
            assert a == b or abs(f32[c][a] - f32[c][b]) / f32[c][a] < 0.02


def test_iterative_ppl_removes_the_best_block_each_step():
    model = tiny_model("llama", seed=10, num_hidden_layers=10)
    ids = random_tokens(model, 3, 17)
    scores = depthcut.score(model, ids, ["ppl"], iterative=2, dtype=torch.float32, progress=False)
    order = scores.meta["iterative"]["order"]
    assert order[0] == scores.ranking("ppl")[0]
    pruned = depthcut.prune_blocks(copy.deepcopy(model), [order[0]])
    second = reference.ppl_scores(pruned, ids)
    kept = [i for i in range(10) if i != order[0]]
    allowed = [pos for pos, i in enumerate(kept) if 4 <= i < 8]
    best_pos = min(allowed, key=lambda p: second[p])
    assert order[1] == kept[best_pos]
    assert abs(scores.meta["iterative"]["ppl_after_each"][1] - second[best_pos]) / second[best_pos] < 1e-5
    assert scores.select("ppl_iterative", 2) == sorted(order)


def test_first_order_estimate_tracks_ppl():
    model = tiny_model("llama", seed=11)
    ids = random_tokens(model, 4, 33)
    s = depthcut.score(model, ids, ["ppl", "taylor"], dtype=torch.float32, progress=False)
    assert len(s["taylor_ppl_estimate"]) == 8
    assert -1 <= s.meta["taylor_ppl_estimate_spearman"] <= 1
    assert abs(s.meta["dense_ppl"] - perplexity(model, ids)) / s.meta["dense_ppl"] < 1e-5


def test_bad_criteria_and_scorer():
    model = tiny_model("llama")
    ids = random_tokens(model, 2, 9)
    with pytest.raises(depthcut.DepthcutError, match="unknown criteria"):
        depthcut.score(model, ids, ["perplexity"])
    with pytest.raises(depthcut.DepthcutError, match="unknown scorer"):
        depthcut.score(model, ids, ["ppl"], scorer="magic")


def test_without_ppl_only_the_full_stream_is_walked():
    model = tiny_model("qwen3", seed=12)
    ids = random_tokens(model, 3, 19)
    alone = depthcut.score(model, ids, ["taylor", "bi"], dtype=torch.float32, progress=False)
    ref = depthcut.score(model, ids, ["taylor", "bi"], scorer="reference", progress=False)
    assert alone.meta["block_evaluations"] == 8
    for c in ("taylor", "bi"):
        assert rel(alone[c], ref[c]) < 1e-4
    assert abs(alone.meta["dense_ppl"] - perplexity(model, ids)) / alone.meta["dense_ppl"] < 1e-5


def test_cpu_small_variant_groups_equal_reference():
    """CPU token cap per call: the variant stack split into several uneven groups per block."""
    from depthcut import single_pass

    model = tiny_model("llama", seed=11)
    ids = random_tokens(model, 3, 15)
    orig = single_pass.CPU_TOKENS_PER_CALL
    single_pass.CPU_TOKENS_PER_CALL = 2 * 3 * 15  # two variants per call
    try:
        sp = single_pass.SinglePass(model, {"ppl", "taylor"})
        r = sp.run(ids, progress=False)
    finally:
        single_pass.CPU_TOKENS_PER_CALL = orig
    assert sp.plan.variant_batch == 2 and not sp.plan.fixed_shapes
    fused = [math.exp(v / r.count) for v in r.nll[1:].tolist()]
    assert rel(fused, reference.ppl_scores(model, ids)) < 1e-5
