"""Importance matrix: the collector's sums against the layers' recorded inputs, renumbering for a
pruned model, llama.cpp's two file formats, and its use by the K-quant export."""
from __future__ import annotations

import os
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from tiny_models import random_tokens, tiny_model

from depthcut.errors import DepthcutError
from depthcut.imatrix import Imatrix, ImatrixCollector, collect_imatrix

gguf = pytest.importorskip("gguf")

LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
           "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up"}


def recorded_sums(model, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Σx² in float64 over every input each block linear received in one forward, from inputs
    kept whole by forward hooks (no running sums, no sharing between q, k and v)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and parts[:2] == ["model", "layers"]:
            key = f"blk.{parts[2]}.{LINEARS[parts[-1]]}.weight"
            hooks.append(module.register_forward_hook(
                lambda m, args, out, key=key: inputs.setdefault(key, []).append(args[0].detach().clone())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: sum((x.double().reshape(-1, x.shape[-1]) ** 2).sum(0) for x in xs).numpy() for k, xs in inputs.items()}


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2"])
def test_sums_equal_the_recorded_inputs(family):
    model = tiny_model(family)
    ids = random_tokens(model, 3, 20, seed=1)
    got = collect_imatrix(model, ids, batch_size=2, progress=False)
    want = recorded_sums(model, ids)
    assert set(got.sums) == set(want) and len(want) == model.config.num_hidden_layers * (4 if family == "phi3" else 7)
    for name, sums in want.items():
        np.testing.assert_allclose(got.sums[name], sums, rtol=2e-5, err_msg=name)
        assert got.counts[name] == 3 * 20
    assert (got.chunk_count, got.chunk_size) == (3, 20)


def test_block0_query_input_from_the_embeddings():
    """Independent of hooks: block 0's q/k/v read input_layernorm(embeddings)."""
    model = tiny_model("llama")
    ids = random_tokens(model, 2, 16, seed=2)
    got = collect_imatrix(model, ids, progress=False)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).double()
    want = (x.reshape(-1, x.shape[-1]) ** 2).sum(0).numpy()
    for proj in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(got.sums[f"blk.0.{proj}.weight"], want, rtol=1e-5)


def test_rows_and_active():
    """rows=T in a batch of 2 windows counts only the first window; inactive calls add nothing."""
    model = tiny_model("llama")
    ids = random_tokens(model, 2, 12, seed=3)
    with torch.no_grad(), ImatrixCollector(model, rows=12) as c:
        model(ids)
        c.active = False
        model(ids)
    first = collect_imatrix(model, ids[:1], progress=False)
    got = c.imatrix()
    for name in first.sums:
        np.testing.assert_allclose(got.sums[name], first.sums[name], rtol=1e-5)
        assert got.counts[name] == 12
    assert not any(h for h in model.model.layers[0].self_attn.q_proj._forward_pre_hooks.values())


def test_for_pruned_renumbers_like_the_pruned_model():
    from depthcut.pruner import prune_blocks

    model = tiny_model("llama")
    ids = random_tokens(model, 2, 16, seed=4)
    dense = collect_imatrix(model, ids, progress=False)
    cut = dense.for_pruned([4, 1])
    pruned = collect_imatrix(prune_blocks(model, [1, 4]), ids, progress=False)
    assert set(cut.sums) == set(pruned.sums)
    kept = [0, 2, 3, 5, 6, 7]
    for new, old in enumerate(kept):
        np.testing.assert_array_equal(cut.sums[f"blk.{new}.ffn_down.weight"], dense.sums[f"blk.{old}.ffn_down.weight"])
    # before the first removed block the inputs are the pruned model's own
    np.testing.assert_allclose(cut.sums["blk.0.attn_q.weight"], pruned.sums["blk.0.attn_q.weight"], rtol=1e-6)
    cut.check_blocks(6)
    with pytest.raises(DepthcutError, match="covers block 7 but the model has 6 blocks"):
        dense.check_blocks(6)


@pytest.mark.parametrize("criteria, budget", [({"ppl", "taylor"}, None), ({"ppl", "bi"}, 60_000), ({"bi"}, None)])
def test_the_scoring_pass_collects_the_plain_forwards_importance(criteria, budget):
    """Slot 0 of the walk is the full model: its rows alone, once per block, give what one plain
    forward collects, whatever the variant groups, chunks and Taylor recomputation do."""
    import depthcut
    from depthcut.single_pass import SinglePass

    model = tiny_model("llama", seed=2)
    ids = random_tokens(model, 5, 19, seed=3)
    want = collect_imatrix(model, ids, progress=False)
    sp = SinglePass(model, criteria, max_memory=budget, dtype=torch.float32, importance=True)
    sp.run(ids, progress=False)
    got = sp.imatrix
    assert set(got.sums) == set(want.sums) and got.counts == want.counts
    for name in want.sums:
        np.testing.assert_allclose(got.sums[name], want.sums[name], rtol=1e-5, err_msg=name)
    assert (got.chunk_count, got.chunk_size) == (5, 19)
    scored = depthcut.score(model, ids, ["ppl"], dtype=torch.float32, importance=True, progress=False)
    np.testing.assert_allclose(scored.importance.sums["blk.3.ffn_down.weight"], want.sums["blk.3.ffn_down.weight"],
                               rtol=1e-5)
    assert depthcut.score(model, ids, ["magnitude"], importance=True, progress=False).importance is None


def _random_imatrix(n_blocks=3, cols=(64, 96)) -> Imatrix:
    rng = np.random.default_rng(0)
    names = [f"blk.{i}.{p}.weight" for i in range(n_blocks) for p in ("attn_q", "ffn_down")]
    sums = {n: rng.random(cols[n.endswith("ffn_down.weight")], dtype=np.float32) * 50 for n in names}
    return Imatrix(sums, {n: int(rng.integers(1, 5000)) for n in names}, ["some text"], 7, 128)


@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_file_round_trip(tmp_path, suffix):
    im = _random_imatrix()
    path = im.save(tmp_path / f"m{suffix}")
    back = Imatrix.load(path)
    assert back.counts == im.counts and back.datasets == im.datasets and back.chunk_count == 7
    for name in im.sums:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
        torch.testing.assert_close(back.importance(name, im.sums[name].size),
                                   torch.from_numpy(im.sums[name] / im.counts[name]))
    if suffix == ".gguf":
        im.save(path)  # depthcut's mark is in the GGUF header: replaced without --force
    else:
        with pytest.raises(DepthcutError, match="did not write it"):  # the legacy format has no room for it
            im.save(path)
        im.save(path, force=True)
    assert (path.read_bytes()[:4] == b"GGUF") == (suffix == ".gguf")


def test_gguf_layout_is_llama_cpps(tmp_path):
    """What llama.cpp's loader reads: general.type imatrix, the three imatrix.* keys, and per
    weight an F32 in_sum2 of ggml shape [cols, 1] with an F32 counts of shape [1, 1]."""
    im = _random_imatrix()
    reader = gguf.GGUFReader(im.save(tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "imatrix" and fields["imatrix.datasets"] == ["some text"]
    assert fields["imatrix.chunk_count"] == 7 and fields["imatrix.chunk_size"] == 128
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(im.sums)
    t = tensors["blk.1.ffn_down.weight.in_sum2"]
    assert t.tensor_type.name == "F32" and list(t.shape) == [96, 1]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), im.sums["blk.1.ffn_down.weight"])
    c = tensors["blk.1.ffn_down.weight.counts"]
    assert list(c.shape) == [1, 1] and float(np.asarray(c.data).reshape(-1)[0]) == im.counts["blk.1.ffn_down.weight"]


def test_legacy_layout(tmp_path):
    im = Imatrix({"blk.0.attn_q.weight": np.array([1.0, 2.0], dtype=np.float32)}, {"blk.0.attn_q.weight": 4}, ["d"], 3)
    data = im.save(tmp_path / "m.dat").read_bytes()
    name = b"blk.0.attn_q.weight"
    assert data == (struct.pack("<ii", 1, len(name)) + name + struct.pack("<iiff", 4, 2, 1.0, 2.0)
                    + struct.pack("<ii", 3, 1) + b"d")


def test_bad_files(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\x00\x00")
    with pytest.raises(DepthcutError, match="not an importance matrix"):
        Imatrix.load(tmp_path / "x.dat")
    with pytest.raises(DepthcutError, match="cannot read"):
        Imatrix.load(tmp_path / "missing.gguf")
    with pytest.raises(DepthcutError, match="96 values for blk.0.ffn_down.weight but the tensor has 64"):
        _random_imatrix().importance("blk.0.ffn_down.weight", 64)
    other = tmp_path / "o.gguf"
    other.write_bytes(b"not mine")
    with pytest.raises(DepthcutError, match="depthcut did not write it"):
        _random_imatrix().save(other)


def test_cli_imatrix_export_and_prune(tmp_path, capsys):
    """`depthcut imatrix` writes the file `export --imatrix` reads; `prune --gguf --type q4_k_m`
    quantises with the importance of its calibration windows, renumbered for the pruned model."""
    from test_export_gguf import _tiny, tokenizer as tokenizer_fixture

    from depthcut import cli, kquants
    from depthcut.calibration import Calibration

    tok = tokenizer_fixture.__wrapped__()
    model = _tiny("llama", tok, hidden_size=256, intermediate_size=512)
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    calib = ["--n-samples", "2", "--seq-len", "16"]

    im = tmp_path / "tiny.imatrix.gguf"
    assert cli.main(["imatrix", str(src), "--out", str(im), *calib]) == 0
    assert f"wrote {im}: Σx² of 56 linear layers over 32 tokens" in capsys.readouterr().out
    assert Imatrix.load(im).counts["blk.7.ffn_down.weight"] == 32
    assert cli.main(["export", str(src), "--gguf", str(tmp_path / "e.gguf"), "--type", "q4_k_m", "--imatrix", str(im)]) == 0
    assert "(q4_k_m, " in capsys.readouterr().out

    pruned = tmp_path / "p.gguf"
    assert cli.main(["prune", str(src), "--blocks", "2,5", "--out", str(tmp_path / "p"), "--gguf", str(pruned),
                     "--type", "q4_k_m", *calib]) == 0
    windows = Calibration.load(tok, n_samples=2, seq_len=16).input_ids
    want_im = collect_imatrix(model, windows, progress=False).for_pruned([2, 5])
    w = model.model.layers[6].mlp.gate_proj.weight.detach()  # block 6 is block 4 of the pruned model
    want = kquants.quantize(w, "q4_k", want_im.importance("blk.4.ffn_gate.weight", 256))
    stored = {t.name: t for t in gguf.GGUFReader(pruned).tensors}["blk.4.ffn_gate.weight"]
    assert np.array_equal(np.asarray(stored.data).reshape(want.shape), want)

    scored = tmp_path / "s.gguf"  # scored by PPL: the importance comes from the scoring pass itself
    assert cli.main(["prune", str(src), "--remove", "2", "--out", str(tmp_path / "s"), "--gguf", str(scored),
                     "--type", "q4_k_m", "--compute-dtype", "fp32", *calib]) == 0
    assert "blk.5.ffn_gate.weight" in {t.name for t in gguf.GGUFReader(scored).tensors}

    capsys.readouterr()
    rc = cli.main(["export", str(tmp_path / "p"), "--gguf", str(tmp_path / "x.gguf"), "--type", "q4_k_m",
                   "--imatrix", str(im)])
    assert rc == 2 and "covers block 7 but the model has 6 blocks" in capsys.readouterr().err


def test_fallback_tensors_use_the_importance(tmp_path):
    """With an importance matrix, a K mix's legacy fallbacks are the weighted blocks of that tensor."""
    from test_export_gguf import _tiny, tokenizer as tokenizer_fixture

    from depthcut.export_gguf import export_gguf
    from depthcut.legacy_quants import quantize_weighted

    tok = tokenizer_fixture.__wrapped__()
    model = _tiny("qwen2", tok, hidden_size=96, intermediate_size=256, num_attention_heads=3,
                  num_key_value_heads=1, num_hidden_layers=2)
    imatrix = collect_imatrix(model, random_tokens(model, 2, 16), progress=False)
    with pytest.warns(UserWarning, match="fallback type"):
        reader = gguf.GGUFReader(export_gguf(model, tok, tmp_path / "m.gguf", "q4_k_m", imatrix=imatrix))
    stored = {t.name: t for t in reader.tensors}["blk.1.attn_output.weight"]
    assert stored.tensor_type.name == "Q5_0"
    w = model.model.layers[1].self_attn.o_proj.weight.detach().numpy()
    want = quantize_weighted(w, "Q5_0", imatrix.importance("blk.1.attn_output.weight", 96).numpy())
    assert np.array_equal(np.asarray(stored.data).reshape(want.shape), want)


def test_cli_refuses_a_missing_imatrix_before_loading(tmp_path, capsys):
    from depthcut import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(tmp_path / "no-model"), "--gguf", str(tmp_path / "o.gguf"), "--type", "q4_k_m",
                  "--imatrix", str(tmp_path / "missing.imatrix")])
    assert exit_.value.code == 2 and "argument --imatrix: no such file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
