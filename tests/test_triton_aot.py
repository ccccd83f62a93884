"""Every Triton kernel of depthcut.kernels compiles for Hopper (sm_90) on a machine without a GPU.

A CUDA-only mistake (a tile whose shared memory exceeds the SM, register spills, a launch that
asks for more registers than an SM has, a construct the NVIDIA backend rejects) otherwise shows
only on the device. Each case calls a kernel's real Python wrapper with CPU tensors of the
GPU dtypes, so tile configuration, constexprs and argument specialisation are those of a CUDA
launch (only divisibility by 16 of sizes and strides enters the specialisation, so small
shapes stand in for model-sized ones). A stand-in driver reports an sm_90 target, and each
launch goes through Triton's warm-up path: compile, no run. ptxas's -v log gives spills and
registers, Triton's metadata the shared memory.

The compile runs in a subprocess: tests/conftest.py sets TRITON_INTERPRET=1, under which
@triton.jit yields interpreted functions and the kernel modules pick their interpreter tiles.
It checks the Triton installed here; the device image's Triton may differ (the device suite,
benchmarks/gpu_suite.sh, JIT-compiles the same kernels there).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

SMEM_PER_BLOCK = 227 * 1024  # Hopper: 228 KiB per SM, 227 KiB of it for one block
REGS_PER_SM = 64 * 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SOFTCAPS = {"nocap": None, "cap": 30.0}


def _e(*shape, dtype=torch.float32):
    """A stand-in operand: the compiler sees only its dtype, strides and alignment."""
    return torch.empty(*shape, dtype=dtype)


def _head(dt):
    """hidden [M, H], head weight [V, H], targets [M]: sizes divisible by 16, like model shapes."""
    return _e(256, 512, dtype=dt), _e(4000, 512, dtype=dt), torch.zeros(256, dtype=torch.int64)


def _nll_forward(dt, cap):
    from depthcut.kernels import linear_nll as K

    K.linear_nll_forward(*_head(dt), softcap=cap)


def _nll_backward(dt, cap):
    from depthcut.kernels import linear_nll as K

    h, w, t = _head(dt)
    K.linear_nll_backward(h, w, t, _e(256), _e(256), softcap=cap)


def _nll_backward_weight(dt, cap):
    from depthcut.kernels import linear_nll as K

    h, w, t = _head(dt)
    K.linear_nll_backward_weight(h, w, t, _e(256), _e(256), softcap=cap)


def _teacher(dt):
    """A wider teacher: hidden [M, HT], head [V, HT]."""
    return _e(256, 1024, dtype=dt), _e(4000, 1024, dtype=dt)


def _kl_forward(dt, cap):
    from depthcut.kernels import linear_kl as K

    hs, ws, t = _head(dt)
    K.linear_kl_forward(hs, ws, *_teacher(dt), t, cap, cap)


def _kl_backward(dt, cap):
    from depthcut.kernels import linear_kl as K

    hs, ws, t = _head(dt)
    K.linear_kl_backward(hs, ws, *_teacher(dt), t, _e(256), _e(256), _e(256), cap, cap, need_weight_grad=True)


def _taylor(dt, cap):
    from depthcut.kernels import taylor_saliency as K

    K.taylor_saliency(_e(256, 512, dtype=dt), _e(256, 1024, dtype=dt), _e(1024, 512, dtype=dt))


def _rmsnorm(dt, cap):
    from depthcut.kernels import decode as K

    for residual in (None, _e(4, 4096, dtype=dt)):
        K.add_rmsnorm(_e(4, 4096, dtype=dt), residual, _e(4096, dtype=dt), 1e-6)


def _rope(dt, cap):
    """Llama-7B heads, and Qwen3's per-head q/k norms."""
    from depthcut.kernels import decode as K

    B, n_q, n_kv, D, S = 4, 32, 8, 128, 640
    for norm in (None, _e(D, dtype=dt)):
        K.rope_cache_write(_e(B, (n_q + 2 * n_kv) * D, dtype=dt), _e(S, D), _e(S, D), torch.zeros(B, dtype=torch.long),
                           _e(B, n_kv, S, D, dtype=dt), _e(B, n_kv, S, D, dtype=dt), torch.zeros(1, dtype=torch.int32),
                           n_q, n_kv, norm, norm)


def _attention(dt, cap):
    """Split and single-program flash decoding; head dims 128 and 256 (Gemma), with the Gemma2 softcap."""
    from depthcut.kernels import decode as K

    for B, n_q, n_kv, D, splits in ((1, 32, 8, 128, None), (64, 32, 8, 128, 1), (2, 16, 8, 256, None)):
        S = 640
        K.decode_attention(_e(B, n_q, D, dtype=dt), _e(B, n_kv, S, D, dtype=dt), _e(B, n_kv, S, D, dtype=dt),
                           torch.zeros(B, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, D ** -0.5,
                           cap, splits=splits)


def _swiglu(dt, cap):
    from depthcut.kernels import decode as K

    for gelu in (False, True):
        K.swiglu(_e(4, 2 * 11008, dtype=dt), gelu=gelu)


# The head kernels take most of the compile time; fp16 gives them the same tiles, registers and
# shared memory as bf16 (checked once with all three), so they are compiled for bf16 and fp32.
_HEAD = {"linear_nll_forward": _nll_forward, "linear_nll_backward": _nll_backward,
         "linear_nll_backward_weight": _nll_backward_weight, "linear_kl_forward": _kl_forward,
         "linear_kl_backward": _kl_backward}
_PLAIN = {"taylor_saliency": _taylor, "add_rmsnorm": _rmsnorm, "rope_cache_write": _rope, "swiglu": _swiglu}
CASES = {f"{name}-{d}-{c}": (fn, DTYPES[d], cap) for name, fn in _HEAD.items() for d in ("bf16", "fp32")
         for c, cap in SOFTCAPS.items()}
CASES.update({f"attention-{d}-{c}": (_attention, dt, cap) for d, dt in DTYPES.items() for c, cap in SOFTCAPS.items()})
CASES.update({f"{name}-{d}": (fn, dt, None) for name, fn in _PLAIN.items() for d, dt in DTYPES.items()})

_SPILLS = re.compile(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                     r".*?Used (\d+) registers", re.S)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def compile_all(path: str) -> None:
    """Run every case, compiling (not launching) each kernel for sm_90; write the records to `path`
    as {case: [{kernel, shared, regs, threads, spill_stores, spill_loads} or {error}]}."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver, jit

    class Hopper:
        """The part of Triton's driver interface that compiling asks for."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    launch = jit.JITFunction.run
    records: list[dict] = []
    seen: dict[str, dict] = {}  # by kernel hash: Triton compiles (and ptxas logs) a specialisation once

    def compile_only(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.hash not in seen:
            found = _SPILLS.search(log.getvalue())
            if found is None:
                raise RuntimeError(f"ptxas log of {self.__name__} not understood: {log.getvalue()[:400]!r}")
            name, stores, loads, regs = found.groups()
            seen[kernel.hash] = dict(kernel=name, shared=kernel.metadata.shared, regs=int(regs),
                                     threads=32 * kernel.metadata.num_warps, spill_stores=int(stores),
                                     spill_loads=int(loads))
        records.append(seen[kernel.hash])
        return kernel

    driver.set_active(Hopper())
    knobs.nvidia.dump_ptxas_log = True
    jit.JITFunction.run = compile_only
    out = {}
    for case, (fn, dt, cap) in CASES.items():
        records.clear()
        try:
            fn(dt, cap)
            out[case] = list(records)
        except Exception as e:  # one failing case must not hide the others
            out[case] = [*records, dict(error=_first_line(e))]
    with open(path, "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: a cached kernel would skip ptxas and its log. FP fusion: the default, stated.
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")])))
    code = f"import test_triton_aot as t; t.compile_all({str(tmp / 'out.json')!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_hopper(compiled, case):
    records = compiled[case]
    assert records, f"{case} launched no kernel"
    for r in records:
        assert "error" not in r, r.get("error")
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{r['kernel']} spills registers: {r}"
        assert r["shared"] <= SMEM_PER_BLOCK, f"{r['kernel']} needs {r['shared']} B of shared memory: {r}"
        assert r["regs"] * r["threads"] <= REGS_PER_SM, f"{r['kernel']} asks for more registers than an SM has: {r}"
