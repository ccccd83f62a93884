"""IQ4_NL / IQ4_XS quantisers: the C++ op writes the reference's bytes; gguf reads every block;
reconstruction error within a bound and below a plain scale-from-extreme baseline; importance
lowers the weighted error; bad input is one DepthcutError line; the mix rules; a tiny model's
export reads back in gguf and in transformers' GGUF loader."""
import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # optional: the device image lacks it
from gguf.quants import dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from test_export_gguf import _reload, _tiny, tokenizer  # noqa: E402,F401  (tokenizer: a fixture)
from test_kquants import _skewed_importance, _weights, degenerate_rows  # noqa: E402

from depthcut import iquants  # noqa: E402
from depthcut.errors import DepthcutError  # noqa: E402
from depthcut.export_gguf import export_gguf, gguf_weight_name, tensor_types  # noqa: E402
from depthcut.gguf_mixes import TensorRole, tensor_type  # noqa: E402
from depthcut.ops import _has_ext_op  # noqa: E402

T = gguf.GGMLQuantizationType
TYPES = iquants.IQUANT_TYPES
HAS_OP = _has_ext_op("quantize_iquant", torch.device("cpu"))
needs_op = pytest.mark.skipif(not HAS_OP, reason="compiled op depthcut::quantize_iquant not built "
                              "(python setup.py build_ext --inplace)")
# (rows, cols) per type: odd row counts, and for IQ4_NL rows off the 256 grid (SmolLM2's 576)
SHAPES = {"iq4_nl": [(1, 32), (7, 96), (33, 576), (129, 256)], "iq4_xs": [(1, 256), (7, 512), (33, 1536), (129, 256)]}
CASES = [(q, r, c) for q in TYPES for r, c in SHAPES[q]]

# Relative RMS error on N(0, 1) weights (65 x 1536, seed 1): measured 0.0763 (IQ4_NL) and 0.0768
# (IQ4_XS), plus ~4%; gguf's Q4_0 (4.5 bits, as IQ4_NL) gives 0.086 there, the plain baseline 0.080.
GAUSSIAN_BOUND = 0.08


def _read(blocks, qtype):
    return dequantize(blocks, T[qtype.upper()])


def _rel(y, x, weight=None):
    weight = np.ones_like(x) if weight is None else weight
    return float(np.sqrt((weight * (y - x) ** 2).sum() / (weight * x ** 2).sum()))


def _extreme_baseline(x: np.ndarray) -> np.ndarray:
    """Plain IQ4_NL: per 32 the fp16 step that puts the largest-magnitude weight on -127, nearest levels."""
    b = x.reshape(-1, 32)
    peak = np.take_along_axis(b, np.abs(b).argmax(-1)[:, None], -1)
    d = (peak / -127).astype(np.float16).astype(np.float32)
    return (d * iquants.GRID[iquants.nearest(b / d)]).reshape(x.shape)


# ----------------------------------------------------------------------------- (a) C++ op == reference


@needs_op
@pytest.mark.parametrize("qtype,rows,cols", CASES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ext_writes_the_reference_bytes(qtype, rows, cols, weighted, dtype):
    x = _weights(rows, cols, seed=rows + cols * 7 + weighted, scale=0.02)
    x[0, :32] = 0.0  # a sub-block of zeros and a few outliers
    x[-1, 10:14] *= 50
    x = x.to(dtype)
    imp = _skewed_importance(cols, seed=rows) if weighted else None
    w, colw = iquants.prepare("test", x, qtype, imp)
    out = torch.ops.depthcut.quantize_iquant(w, qtype, colw)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (rows, iquants.row_bytes(qtype, cols))
    np.testing.assert_array_equal(out.numpy(), iquants.quantize_reference(x, qtype, imp))


@needs_op
def test_quantize_dispatches_to_the_op_and_reference_alike(monkeypatch):
    x = _weights(9, 768, seed=11, scale=0.1).to(torch.bfloat16)
    for qtype in TYPES:
        compiled = iquants.quantize(x, qtype)
        with monkeypatch.context() as m:
            m.setenv("DEPTHCUT_OPS", "reference")
            np.testing.assert_array_equal(iquants.quantize(x, qtype), compiled)


@needs_op
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(qtype, weighted):
    x = _weights(3, 256, seed=5)
    imp = torch.rand(256) if weighted else None
    torch.library.opcheck(torch.ops.depthcut.quantize_iquant.default, (x, qtype, imp))


# ----------------------------------------------------------------------------- (b) gguf reads every block


def test_row_bytes_match_gguf_block_sizes():
    for qtype in TYPES:
        block, size = gguf.GGML_QUANT_SIZES[T[qtype.upper()]]
        assert block == iquants.BLOCK[qtype] and iquants.BLOCK_BYTES[qtype] == size
        assert iquants.row_bytes(qtype, 1536) == 1536 // block * size


@pytest.mark.parametrize("qtype,rows,cols", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_gguf_dequantises_every_block(qtype, rows, cols, weighted):
    x = _weights(rows, cols, seed=rows * 31 + cols, scale=0.05)
    imp = _skewed_importance(cols, seed=cols) if weighted else None
    blocks = iquants.quantize(x, qtype, imp)
    y = _read(blocks, qtype)
    assert y.shape == (rows, cols) and np.isfinite(y).all()
    weight = None if imp is None else np.broadcast_to(imp.numpy(), x.shape)
    # a few blocks sample the error loosely, hence the margin
    assert _rel(y, x.numpy(), weight) < 1.3 * GAUSSIAN_BOUND


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_writer_and_reader_round_trip(tmp_path, qtype):
    x = _weights(5, 512, seed=3)
    blocks = iquants.quantize(x, qtype)
    path = tmp_path / f"{qtype}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", blocks, raw_dtype=T[qtype.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == T[qtype.upper()] and list(tensor.shape) == [512, 5]
    np.testing.assert_array_equal(_read(np.asarray(tensor.data), qtype), _read(blocks, qtype))


@pytest.mark.parametrize("qtype", TYPES)
def test_degenerate_rows_stay_close_and_quiet(qtype):
    """Zero, constant, tiny (an fp16 step that underflows) and one-spike rows: no warnings. The
    grid has no zero level: a spike's neighbours decode as ±step, at most |spike| / 113."""
    x = degenerate_rows()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = _read(iquants.quantize_reference(x, qtype), qtype)
    assert (y[0] == 0).all() and np.isfinite(y).all()
    assert np.abs(y[1] - 0.25).max() < 0.002 and np.abs(y[2]).max() < 2e-7
    assert abs(y[3, 17] - 3.0) < 0.01 and np.abs(np.delete(y[3], 17)).max() <= 3.0 / 100


# ----------------------------------------------------------------------------- (c) error bounds


@pytest.mark.parametrize("qtype", TYPES)
def test_gaussian_error_within_bound_and_below_baselines(qtype):
    x = _weights(65, 1536, seed=1).numpy()
    y = _read(iquants.quantize(torch.from_numpy(x), qtype), qtype)
    base = _extreme_baseline(x)
    assert _rel(y, x) < GAUSSIAN_BOUND
    assert _rel(y, x) < 0.97 * _rel(base, x)  # measured 0.952 / 0.958
    assert _rel(y, x, x * x) < 0.95 * _rel(base, x, x * x)  # the searched error: measured 0.909 / 0.925
    assert _rel(y, x) < 0.92 * _rel(dequantize(gguf_quantize(x, T.Q4_0), T.Q4_0), x)  # Q4_0: 4.5 bits


@pytest.mark.integration
@pytest.mark.parametrize("qtype", TYPES)
def test_smollm2_error_below_baseline(smollm2, qtype):
    model, _ = smollm2
    for weight in (model.model.layers[3].mlp.down_proj.weight, model.model.layers[20].mlp.down_proj.weight):
        x = weight.detach().float().numpy()
        err = _rel(_read(iquants.quantize(torch.from_numpy(x), qtype), qtype), x)
        print(f"SmolLM2 {x.shape} {qtype}: relative RMS error {err:.4f}")
        assert err < _rel(_extreme_baseline(x), x)


# ----------------------------------------------------------------------------- (d) importance


@pytest.mark.parametrize("qtype", TYPES)
def test_importance_lowers_the_weighted_error(qtype):
    x = _weights(32, 512, seed=6)
    imp = _skewed_importance(512, seed=7)
    weight = np.broadcast_to(imp.numpy(), x.shape)
    plain = _rel(_read(iquants.quantize(x, qtype), qtype), x.numpy(), weight)
    weighted = _rel(_read(iquants.quantize(x, qtype, imp), qtype), x.numpy(), weight)
    assert weighted < 0.9 * plain  # measured 0.81 / 0.82 (squared: 0.65 / 0.67)


def test_zero_importance_changes_nothing():
    x = _weights(5, 512, seed=8)
    for qtype in TYPES:
        np.testing.assert_array_equal(iquants.quantize(x, qtype, torch.zeros(512)), iquants.quantize(x, qtype))


# ----------------------------------------------------------------------------- (e) bad input


@pytest.mark.parametrize("fn", [iquants.quantize, iquants.quantize_reference])
@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 300), "iq4_nl"), "multiple of 32"),
    ((torch.zeros(4, 288), "iq4_xs"), "multiple of 256"),
    ((torch.zeros(4, 256), "iq4_ks"), "unknown IQ4 type"),
    ((torch.full((4, 256), float("nan")), "iq4_nl"), "NaN"),
    ((torch.full((4, 256), 1e6), "iq4_xs"), "fp16"),
    ((torch.zeros(256), "iq4_nl"), "2-D float"),
    ((torch.zeros(4, 256), "iq4_xs", torch.ones(255)), r"importance must be a tensor of shape \(256,\)"),
    ((torch.zeros(4, 256), "iq4_nl", -torch.ones(256)), "non-negative"),
])
def test_bad_input_is_one_line(fn, args, match):
    with pytest.raises(DepthcutError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- (f) mixes and export


def test_mix_rules():
    def t(mix, kind, i, n=32, gqa=1, cols=512, imatrix=False):
        return tensor_type(mix, TensorRole(kind, cols, i, False), n, gqa, has_imatrix=imatrix)[0]

    for mix, base in (("iq4_nl", "IQ4_NL"), ("iq4_xs", "IQ4_XS")):
        assert [t(mix, "attn_v", 9, gqa=g) for g in (3, 4)] == [base, "Q5_K"]  # GQA >= 4
        assert [t(mix, "ffn_down", i) for i in (3, 4)] == ["Q5_K", base]  # i < n/8, without an imatrix
        assert t(mix, "ffn_down", 0, imatrix=True) == base
        assert t(mix, "attn_output", 0) == t(mix, "ffn_up", 0) == base
        assert tensor_type(mix, TensorRole("output", 512, None, True), 32, 1) == ("Q6_K", None)
        assert tensor_type(mix, TensorRole("output", 576, None, True), 32, 1) == ("Q8_0", None)
        assert t(mix, "ffn_gate", 0, cols=48) == "F16"  # off the 32 grid
    off_grid = tensor_type("iq4_xs", TensorRole("attn_q", 576, 0, False), 32, 1)
    assert off_grid == ("IQ4_NL", "IQ4_XS->IQ4_NL (rows of 576)")
    assert t("iq4_xs", "attn_v", 0, gqa=4, cols=576) == "Q5_1"  # Q5_K off the 256 grid


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_export_reads_back_in_gguf_and_transformers(qtype, weighted, tokenizer, tmp_path):
    from depthcut.imatrix import collect_imatrix

    model = _tiny("qwen2", tokenizer, hidden_size=256, intermediate_size=512)  # 8 blocks, GQA 2
    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    imatrix = collect_imatrix(model, ids, progress=False) if weighted else None
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype, imatrix=imatrix)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]
    types = {k: v for k, v in tensor_types(path).items() if v != "F32"}
    base = qtype.upper()
    assert types.pop("output.weight") == "Q6_K"
    assert types.pop("blk.0.ffn_down.weight") == (base if weighted else "Q5_K")  # first eighth, no imatrix
    assert set(types.values()) == {base}

    loaded = _reload(path)
    stored = {t.name: t for t in reader.tensors}
    for hf_name, p in model.state_dict().items():
        if p.dim() != 2:
            continue
        t = stored[gguf_weight_name("qwen2", hf_name.removesuffix(".weight"))]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
        got = loaded.state_dict()[hf_name]
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))), hf_name
        if t.tensor_type.name.startswith("IQ4"):
            assert _rel(want, p.numpy()) < 1.15 * GAUSSIAN_BOUND, (hf_name, _rel(want, p.numpy()))
    with torch.no_grad():
        out, src = loaded(ids).logits, model(ids).logits
    # measured 0.63-0.65 (q4_k_m 0.60, q4_0 0.73, q8_0 0.057): this random model amplifies the weights' error ~10x
    assert ((out - src).norm() / src.norm()).item() < 0.8


def test_smollm2_widths_fall_back(tokenizer, tmp_path):
    """Rows of 576 are off the 256 grid: IQ4_XS stores them in IQ4_NL; ffn_down's 1536 stay IQ4_XS."""
    model = _tiny("llama", tokenizer, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, num_hidden_layers=2, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match="fallback type: row length not a multiple"):
        path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "iq4_xs")
    types = tensor_types(path)
    assert types["token_embd.weight"] == "Q8_0"  # the tied head, off the 256 grid
    for i in range(2):
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{kind}.weight"] == "IQ4_NL"
        assert types[f"blk.{i}.ffn_down.weight"] == "IQ4_XS"  # n/8 = 0 blocks raised
    notes = gguf.GGUFReader(path).fields["depthcut.quantization_fallbacks"].contents()
    assert "blk.0.attn_q.weight: IQ4_XS->IQ4_NL (rows of 576)" in notes
