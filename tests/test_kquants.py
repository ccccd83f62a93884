"""K-quant quantisers: gguf reads every block back; the C++ op writes the reference's bytes;
reconstruction error within each type's bound (random and real SmolLM2 weights); importance
lowers the weighted error; bad input is one DepthcutError line."""
import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # optional: the device image lacks it
from gguf.quants import dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from depthcut import kquants  # noqa: E402
from depthcut.errors import DepthcutError  # noqa: E402
from depthcut.ops import _has_ext_op  # noqa: E402

T = gguf.GGMLQuantizationType
HAS_OP = _has_ext_op("quantize_kquant", torch.device("cpu"))
needs_op = pytest.mark.skipif(not HAS_OP, reason="compiled op depthcut::quantize_kquant not built "
                              "(python setup.py build_ext --inplace)")
SHAPES = [(1, 256), (7, 512), (33, 1536)]

# Relative RMS error bounds on N(0, 1) weights: measured 0.269 / 0.145 / 0.071 / 0.035 / 0.017
# (65 x 1536, seed 1), plus ~4%; gguf's own Q4_0 / Q5_0 / Q8_0 give 0.086 / 0.043 / 0.0054 there.
# SmolLM2's FFN down weights stay within them too (0.276 / 0.150 / 0.013 / 0.014 / 0.017: the
# bundled model is Q4_1, whose 16-level grid Q4_K and Q5_K nearly reproduce).
GAUSSIAN_BOUND = {"q2_k": 0.28, "q3_k": 0.152, "q4_k": 0.074, "q5_k": 0.037, "q6_k": 0.018}
# Every K-quant beats the legacy type of its bit width (or the next wider one, for Q6_K: < half Q5_0's).
LEGACY_RIVAL = {"q4_k": (T.Q4_0, 1.0), "q5_k": (T.Q5_0, 1.0), "q6_k": (T.Q5_0, 0.5)}


def _ggml(qtype):
    return getattr(T, qtype.upper())


def _weights(rows, cols, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * scale


def _skewed_importance(cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cols, generator=g) ** 8 * 1e4  # a few channels dominate, as in real activations


def degenerate_rows() -> torch.Tensor:
    """[4, 512]: a zero row, a constant one, a tiny one (fp16-subnormal steps) and one spike."""
    x = torch.zeros(4, 512)
    x[1] = 0.25
    x[2] = torch.linspace(-1e-7, 1e-7, 512)
    x[3, 17] = 3.0
    return x


def _read(blocks, qtype):
    return dequantize(blocks, _ggml(qtype))


def _rel_rms(y, x):
    return float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))


def _weighted_sq_error(y, x, importance):
    return float((((y - x) ** 2) * importance).sum())


# ----------------------------------------------------------------------------- (a) gguf reads every block


def test_row_bytes_match_gguf_block_sizes():
    for qtype in kquants.KQUANT_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[_ggml(qtype)]
        assert block == kquants.QK_K
        assert kquants.row_bytes(qtype, 1536) == 6 * size


@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_gguf_dequantises_every_block(qtype, rows, cols, weighted):
    x = _weights(rows, cols, seed=rows * 31 + cols, scale=0.05)
    imp = _skewed_importance(cols, seed=cols) if weighted else None
    blocks = kquants.quantize_reference(x, qtype, imp)
    assert blocks.dtype == np.uint8 and blocks.shape == (rows, kquants.row_bytes(qtype, cols))
    y = _read(blocks, qtype)
    assert y.shape == (rows, cols) and np.isfinite(y).all()
    # With importance, the error in its own weighting is what the search lowers; a few
    # super-blocks sample it loosely, hence the margin.
    weight = np.ones(cols, np.float32) if imp is None else imp.numpy()
    rel = np.sqrt(_weighted_sq_error(y, x.numpy(), weight) / _weighted_sq_error(0 * y, x.numpy(), weight))
    assert rel < 1.25 * GAUSSIAN_BOUND[qtype]


@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_gguf_writer_and_reader_round_trip(tmp_path, qtype):
    x = _weights(5, 512, seed=3)
    blocks = kquants.quantize(x, qtype)
    path = tmp_path / f"{qtype}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", blocks, raw_dtype=_ggml(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == _ggml(qtype) and list(tensor.shape) == [512, 5]
    np.testing.assert_array_equal(_read(np.asarray(tensor.data), qtype), _read(blocks, qtype))


@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_degenerate_rows_stay_exact_and_quiet(qtype):
    """Zero, constant, tiny (fp16-subnormal scales) and one-spike rows: no warnings, exact zeros."""
    x = degenerate_rows()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = _read(kquants.quantize_reference(x, qtype), qtype)
    assert (y[0] == 0).all() and np.isfinite(y).all()
    assert np.abs(y[1] - 0.25).max() < 0.01 and np.abs(y[2]).max() < 2e-7
    assert abs(y[3, 17] - 3.0) < 0.05 and (y[3, :256] != 0).sum() == 1


# ----------------------------------------------------------------------------- (b) C++ op == reference


@needs_op
@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
@pytest.mark.parametrize("rows,cols", SHAPES + [(129, 256)])
@pytest.mark.parametrize("weighted", [False, True])
def test_ext_writes_the_reference_bytes(qtype, rows, cols, weighted):
    x = _weights(rows, cols, seed=rows + cols * 7 + weighted, scale=0.02)
    x[0, :64] = 0.0  # a sub-block of zeros and one of outliers
    x[-1, 100:110] *= 50
    imp = _skewed_importance(cols, seed=rows) if weighted else None
    w, colw = kquants.prepare("test", x, qtype, imp)
    out = torch.ops.depthcut.quantize_kquant(w, qtype, colw)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), kquants.quantize_reference(x, qtype, imp))


@needs_op
def test_quantize_dispatches_to_the_op_and_reference_alike(monkeypatch):
    x = _weights(9, 768, seed=11, scale=0.1).to(torch.bfloat16)
    compiled = kquants.quantize(x, "q4_k")
    monkeypatch.setenv("DEPTHCUT_OPS", "reference")
    np.testing.assert_array_equal(kquants.quantize(x, "q4_k"), compiled)


@needs_op
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(weighted):
    x = _weights(3, 256, seed=5)
    imp = torch.rand(256) if weighted else None
    torch.library.opcheck(torch.ops.depthcut.quantize_kquant.default, (x, "q5_k", imp))


# ----------------------------------------------------------------------------- (c) error bounds


@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_gaussian_error_within_bound_and_below_legacy(qtype):
    x = _weights(65, 1536, seed=1).numpy()
    err = _rel_rms(_read(kquants.quantize(torch.from_numpy(x), qtype), qtype), x)
    assert err < GAUSSIAN_BOUND[qtype]
    if qtype in LEGACY_RIVAL:
        rival, factor = LEGACY_RIVAL[qtype]
        assert err < factor * _rel_rms(dequantize(gguf_quantize(x, rival), rival), x)


def test_more_bits_give_less_error():
    x = _weights(33, 1024, seed=2).numpy()
    errs = [_rel_rms(_read(kquants.quantize(torch.from_numpy(x), q), q), x) for q in kquants.KQUANT_TYPES]
    assert all(a > 1.6 * b for a, b in zip(errs, errs[1:])), errs


def test_least_squares_beats_plain_min_max():
    """The candidate search must improve on its own first candidate (the min/max fit)."""
    x = _weights(64, 32, seed=4).numpy().reshape(-1, 32)
    w = np.ones_like(x)
    fmt = kquants.FORMATS["q4_k"]
    scale, low = kquants.fit_asymmetric(x, w, fmt)
    lo = np.minimum(x.min(-1), 0)
    plain = (x.max(-1) - lo) / 15

    def sq_err(s, m):
        q = np.clip(np.rint((x - m[:, None]) / s[:, None]), 0, 15)
        return ((s[:, None] * q + m[:, None] - x) ** 2).sum()

    assert sq_err(scale, low) < 0.85 * sq_err(plain, lo)


@pytest.mark.integration
@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_smollm2_error_within_bound_and_below_legacy(smollm2, qtype):
    """FFN down weights: SmolLM2's other rows are 576 long, no multiple of 256 (legacy types there)."""
    model, _ = smollm2
    for weight in (model.model.layers[3].mlp.down_proj.weight, model.model.layers[20].mlp.down_proj.weight):
        x = weight.detach().float()
        y = _read(kquants.quantize(x, qtype), qtype)
        err = _rel_rms(y, x.numpy())
        print(f"SmolLM2 {tuple(x.shape)} {qtype}: relative RMS error {err:.4f}")
        assert err < GAUSSIAN_BOUND[qtype]
        if qtype in LEGACY_RIVAL:
            rival, factor = LEGACY_RIVAL[qtype]
            assert err < factor * _rel_rms(dequantize(gguf_quantize(x.numpy(), rival), rival), x.numpy())


# ----------------------------------------------------------------------------- (d) importance


@pytest.mark.parametrize("qtype", kquants.KQUANT_TYPES)
def test_importance_lowers_the_weighted_error(qtype):
    x = _weights(32, 512, seed=6)
    imp = _skewed_importance(512, seed=7)
    plain = _weighted_sq_error(_read(kquants.quantize(x, qtype), qtype), x.numpy(), imp.numpy())
    weighted = _weighted_sq_error(_read(kquants.quantize(x, qtype, imp), qtype), x.numpy(), imp.numpy())
    assert weighted < 0.9 * plain


def test_uniform_or_zero_importance_changes_nothing():
    x = _weights(5, 512, seed=8)
    plain = kquants.quantize(x, "q3_k")
    np.testing.assert_array_equal(kquants.quantize(x, "q3_k", torch.full((512,), 7.0)), plain)
    np.testing.assert_array_equal(kquants.quantize(x, "q3_k", torch.zeros(512)), plain)


# ----------------------------------------------------------------------------- (e) bad input


@pytest.mark.parametrize("fn", [kquants.quantize, kquants.quantize_reference])
@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 300), "q4_k"), "multiple of 256"),
    ((torch.zeros(4, 256), "q7_k"), "unknown K-quant type"),
    ((torch.full((4, 256), float("nan")), "q4_k"), "NaN"),
    ((torch.full((4, 256), 1e6), "q4_k"), "fp16"),
    ((torch.zeros(256), "q4_k"), "2-D float"),
    ((torch.zeros(4, 256, dtype=torch.int32), "q4_k"), "2-D float"),
    ((torch.zeros(4, 256), "q4_k", torch.ones(255)), r"importance must be a tensor of shape \(256,\)"),
    ((torch.zeros(4, 256), "q4_k", -torch.ones(256)), "non-negative"),
    ((torch.zeros(4, 256), "q4_k", torch.full((256,), float("inf"))), "finite"),
])
def test_bad_input_is_one_line(fn, args, match):
    with pytest.raises(DepthcutError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)
