"""depthcut.ops on the CPU, with the compiled ops and with the forced references."""
import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import DTYPE_TOL, dtype_params, head_inputs, kl_inputs, scaled_tol

from depthcut import ops
from depthcut._ext import HAS_EXT
from depthcut.errors import DepthcutError

MODES = ["reference"] + (["auto"] if HAS_EXT else [])
FP32 = DTYPE_TOL[torch.float32]
BF16_LOGITS = scaled_tol(torch.bfloat16, 16)  # bf16 kernels that round logits of up to ~16


@pytest.fixture(params=MODES)
def backend(request, monkeypatch):
    monkeypatch.setenv("DEPTHCUT_OPS", request.param)
    return request.param


def _full_logits(hidden, weight, targets, softcap):
    z = hidden.float() @ weight.float().T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, reduction="none")


def test_backend_choice(backend):
    expected = "ext" if backend == "auto" else "reference"
    assert ops._backend(torch.device("cpu")) == expected


def test_unknown_backend_rejected(monkeypatch):
    monkeypatch.setenv("DEPTHCUT_OPS", "bogus")
    with pytest.raises(DepthcutError, match="DEPTHCUT_OPS"):
        ops._backend(torch.device("cpu"))


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype,tol", dtype_params(torch.float32, torch.bfloat16, torch.float16, scale=16))
def test_linear_nll_and_gradient(backend, softcap, dtype, tol):
    """bf16 logit tiles of the compiled op round logits of up to ~16 (hence the scale); fp16,
    which that op does not take, goes to the reference."""
    hidden, weight, targets, _ = head_inputs(37, 1001, 48, dtype)
    h1 = hidden.clone().requires_grad_()
    nll = ops.linear_nll(h1, weight, targets, softcap)
    h2 = hidden.float().clone().requires_grad_()
    ref = _full_logits(h2, weight, targets, softcap)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, ref.detach(), **tol)
    g = torch.rand(37, generator=torch.Generator().manual_seed(3))
    (nll * g).sum().backward()
    (ref * g).sum().backward()
    assert h1.grad.dtype == dtype
    torch.testing.assert_close(h1.grad.float(), h2.grad, **tol)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_nll_head_weight_gradient(backend, softcap):
    """Full training: the head weight's gradient (and the hidden one beside it) equal autograd on full logits."""
    hidden, weight, targets, _ = head_inputs(37, 211, 24, torch.float32)
    g = torch.rand(37, generator=torch.Generator().manual_seed(3)) + 0.5
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (ops.linear_nll(h1, w1, targets, softcap) * g).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (_full_logits(h2, w2, targets, softcap) * g).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, **FP32)
    torch.testing.assert_close(h1.grad, h2.grad, **FP32)


def _bad_input_cases():
    """(call, message) pairs: each op given one bad argument."""
    hidden, weight, targets, _ = head_inputs(5, 97, 16, torch.float32)
    x, dy = torch.ones(5, 16), torch.ones(5, 97)

    def with_target(value):
        bad = targets.clone()
        bad[2] = value
        return bad

    range_msg = "linear_nll: target ids must lie in \\[0, 97\\) or be -100 \\(ignored\\), got ids from {} to {}"
    return [
        (lambda: ops.linear_nll(hidden, weight, with_target(97)), range_msg.format(0, 97)),
        (lambda: ops.linear_nll(hidden, weight, with_target(-1)), range_msg.format(-1, ".*")),
        (lambda: ops.linear_nll(hidden, weight, with_target(-101)), range_msg.format(-101, ".*")),
        (lambda: ops.linear_nll_sum(hidden.requires_grad_(), weight, with_target(97)),
         "linear_nll_sum: target ids"),
        (lambda: ops.linear_nll(hidden, weight, targets.int()), "linear_nll: targets must be int64 \\[5\\]"),
        (lambda: ops.linear_nll(hidden, weight, targets[:4]), "targets must be int64 \\[5\\], got torch.int64 \\(4,"),
        (lambda: ops.linear_nll(hidden, weight[:, :8], targets),
         "linear_nll: hidden \\(5, 16\\) and weight \\(97, 8\\) disagree on H"),
        (lambda: ops.linear_nll(hidden, weight.bfloat16(), targets), "linear_nll: hidden and weight dtypes differ"),
        (lambda: ops.linear_nll(hidden[0], weight, targets), "linear_nll: hidden must be 2-D, got shape \\(16,\\)"),
        (lambda: ops.linear_nll(hidden.long(), weight.long(), targets), "hidden must be float32, float16 or bfloat16"),
        (lambda: ops.linear_nll(hidden, weight, targets, 0.0),
         "linear_nll: softcap must be a positive number or None, got 0.0"),
        (lambda: ops.linear_nll(hidden, weight, targets, float("inf")), "softcap must be a positive number"),
        (lambda: ops.linear_nll(hidden.to("meta"), weight.to("meta"), targets),
         "linear_nll: all tensors must be on one device, got cpu, meta"),
        (lambda: ops.linear_kl(hidden, weight, hidden, weight, with_target(97)), "linear_kl: target ids"),
        (lambda: ops.linear_kl(hidden, weight, hidden, weight[:50], targets), "vocabularies differ: 97 vs 50"),
        (lambda: ops.linear_kl(hidden, weight, hidden[:4], weight, targets), "student and teacher have 5 and 4 rows"),
        (lambda: ops.linear_kl(hidden, weight, hidden, weight, targets, None, -3.0),
         "linear_kl: teacher_softcap must be a positive number"),
        (lambda: ops.taylor_saliency(x, dy, weight[:, :8]), "taylor_saliency: weight must be \\[N, K\\]"),
        (lambda: ops.taylor_saliency(x, dy.bfloat16(), weight), "taylor_saliency: x and dy dtypes differ"),
        (lambda: ops.decode_linear(x, weight[:, :8]), "decode_linear: x \\[..., K\\], weight \\[N, K\\]"),
        (lambda: ops.decode_linear(x, weight, torch.ones(3)), "bias \\[N\\] expected"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_input_is_refused_alike_by_every_backend(backend, case):
    """The wrappers check once, before dispatch: the same DepthcutError whichever backend would run."""
    call, message = _bad_input_cases()[case]
    with pytest.raises(DepthcutError, match=message):
        call()


def test_ignored_targets_are_not_out_of_range(backend):
    """-100 rows are skipped, not refused, even when every row is ignored."""
    hidden, weight, targets, _ = head_inputs(5, 97, 16, torch.float32)
    nll = ops.linear_nll(hidden, weight, torch.full_like(targets, -100))
    assert torch.equal(nll, torch.zeros(5))
    assert ops.linear_nll(hidden[:0], weight, targets[:0]).shape == (0,)


OPTIMISED_SCRIPT = """
import torch
from depthcut import ops
from depthcut.errors import DepthcutError
try:
    ops.linear_nll(torch.ones(2, 4), torch.ones(3, 4), torch.tensor([0, 3]))
except DepthcutError as exc:
    print(exc)
"""


@pytest.mark.parametrize("mode", MODES)
def test_checks_survive_python_optimise(mode):
    """python -O strips asserts; the checks are real exceptions."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-O", "-c", OPTIMISED_SCRIPT], capture_output=True, text=True,
                          env={**os.environ, "DEPTHCUT_OPS": mode}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "target ids must lie in [0, 3)" in proc.stdout


@pytest.mark.parametrize("softcaps", [(None, None), (3.0, 5.0)])
def test_linear_kl(backend, softcaps):
    """KL(teacher || student) and its student gradients equal kl_div on full logits."""
    hs, ws, ht, wt, targets, _ = kl_inputs(29, 151, 24, 40, torch.float32, seed=1)  # a wider teacher
    cs, ct = softcaps

    def capped(z, c):
        return z if c is None else c * torch.tanh(z / c)

    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    kl = ops.linear_kl(h1, w1, ht, wt, targets, cs, ct)
    kl.sum().backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = F.kl_div(capped(h2 @ w2.T, cs).log_softmax(-1), capped(ht @ wt.T, ct).log_softmax(-1), log_target=True,
                   reduction="none").sum(-1).masked_fill(targets == -100, 0.0)
    ref.sum().backward()
    torch.testing.assert_close(kl, ref, **FP32)
    torch.testing.assert_close(h1.grad, h2.grad, **FP32)
    torch.testing.assert_close(w1.grad, w2.grad, **FP32)


def test_taylor_saliency(backend):
    g = torch.Generator().manual_seed(5)
    x, dy, w = torch.randn(65, 40, generator=g), torch.randn(65, 130, generator=g), torch.randn(130, 40, generator=g)
    got = ops.taylor_saliency(x, dy, w)
    ref = (w.double() * (dy.double().T @ x.double())).abs().sum()
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_decode_linear_is_fp32_arithmetic(backend, wdtype, rows):
    """Narrow weights with fp32 activations: exactly the fp32 product of the rounded weights
    (not a product in the weight dtype), with and without the compiled op."""
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 77, generator=g), torch.randn(50, 77, generator=g).to(wdtype), torch.randn(50).to(wdtype)
    got = ops.decode_linear(x, w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), F.linear(x.double(), w.double(), b.double()), atol=1e-4, rtol=1e-5)
    if wdtype != torch.float32:  # activations in the weight dtype: plain F.linear
        same = ops.decode_linear(x.to(wdtype), w, b)
        assert same.dtype == wdtype and torch.equal(same, F.linear(x.to(wdtype), w, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "reference"] + (["ext"] if HAS_EXT else []))
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_nll_cuda(monkeypatch, mode, softcap):
    monkeypatch.setenv("DEPTHCUT_OPS", mode)
    hidden, weight, targets, _ = head_inputs(300, 5003, 64, torch.bfloat16, device="cuda")
    h1 = hidden.clone().requires_grad_()
    nll = ops.linear_nll(h1, weight, targets, softcap)
    h2 = hidden.float().clone().requires_grad_()
    ref = _full_logits(h2, weight, targets, softcap)
    torch.testing.assert_close(nll, ref.detach(), **BF16_LOGITS)
    nll.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad, **BF16_LOGITS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "reference"] + (["ext"] if HAS_EXT else []))
def test_taylor_saliency_cuda(monkeypatch, mode):
    monkeypatch.setenv("DEPTHCUT_OPS", mode)
    g = torch.Generator().manual_seed(5)
    x, dy, w = (torch.randn(s, generator=g).cuda() for s in [(257, 72), (257, 130), (130, 72)])
    got = ops.taylor_saliency(x, dy, w)
    ref = (w.double() * (dy.double().T @ x.double())).abs().sum()
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-3)


FALLBACK_SCRIPT = """
import sys, warnings
sys.modules["depthcut._C"] = None  # as if the extension had not been built
sys.path.insert(0, "tests")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import depthcut
    from depthcut._ext import HAS_EXT
from tiny_models import random_tokens, tiny_model
model = tiny_model("llama")
scores = depthcut.score(model, random_tokens(model, 2, 9), ["ppl", "taylor"], progress=False)
messages = [str(w.message) for w in caught if "depthcut._C" in str(w.message)]
print(HAS_EXT, len(messages), len(scores["ppl"]), len(scores["taylor"]))
"""


@pytest.mark.parametrize("env", [{}, {"DEPTHCUT_NO_EXT": "1"}])
def test_package_works_without_the_extension(env):
    """One warning when the extension is missing (none when skipped on purpose), then pure torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=root, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warned = "0" if env else "1"
    assert proc.stdout.split() == ["False", warned, "8", "8"]


def test_decode_ops_choice(backend):
    from depthcut.kernels import decode as K

    cpu = torch.device("cpu")
    chosen = ops.decode_ops(cpu, torch.float32)
    if backend == "auto":  # the compiled twins, for fp32 only
        assert chosen[0] is torch.ops.depthcut.add_rmsnorm
        assert ops.decode_ops(cpu, torch.bfloat16)[0] is K.add_rmsnorm_ref
    else:
        assert chosen == (K.add_rmsnorm_ref, K.rope_cache_write_ref, K.decode_attention_ref, K.swiglu_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["auto"] + (["ext"] if HAS_EXT else []))
def test_decode_ops_cuda_are_triton(monkeypatch, mode):
    from depthcut.kernels import decode as K

    monkeypatch.setenv("DEPTHCUT_OPS", mode)
    assert ops.decode_ops(torch.device("cuda"), torch.bfloat16)[2] is K.decode_attention


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_nll_sum_with_a_frozen_head(backend, softcap, monkeypatch):
    """The training loss: on the CPU op the hidden gradient comes from the forward; it must equal autograd's."""
    hidden, weight, targets, _ = head_inputs(41, 211, 24, torch.float32, seed=4)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    calls = []
    if backend == "auto":
        monkeypatch.setattr(ops._LinearNLLSumEager, "apply", _recording(ops._LinearNLLSumEager.apply, calls))
    loss = ops.linear_nll_sum(h1, weight, targets, softcap)
    (3.0 * loss).backward()
    ref = _full_logits(h2, weight, targets, softcap).sum()
    (3.0 * ref).backward()
    assert loss.dim() == 0 and calls == ([1] if backend == "auto" else [])
    torch.testing.assert_close(loss, ref, **FP32)
    torch.testing.assert_close(h1.grad, h2.grad, **FP32)


def _recording(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    return wrapped
