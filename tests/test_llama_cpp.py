"""The real client: llama.cpp (through llama-cpp-python) runs the exported files.

Skipped unless ``llama_cpp`` is importable (``make llama-cpp`` builds it). Text goes in as token
ids from the transformers tokenizer, so these tests compare the model graphs, not tokenizers.
"""
from __future__ import annotations

import ctypes
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")  # test_export_gguf needs it
llama_cpp = pytest.importorskip("llama_cpp")

from test_export_gguf import SMOLLM2_DIR, SMOLLM2_FILE, _tiny, heldout_windows, load_pruned_smollm2, perplexity, tokenizer  # noqa: E402,F401

from depthcut.export_gguf import export_gguf, gguf_tokenizer_pre  # noqa: E402


def llama_cpp_logits(path, windows: torch.Tensor) -> torch.Tensor:
    """[N, T, vocab] logits of llama.cpp for each window, each evaluated from an empty cache."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          logits_all=True, n_threads=2, verbose=False)
    out = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        out.append(np.array(llm.scores[: len(window)], dtype=np.float32))
    llm.close()
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_logits_match_transformers(family, tokenizer, tmp_path):
    """f16 weights: llama.cpp's logits follow the source model's (this is where a wrong q/k
    permutation or hyper-parameter shows: transformers' loader undoes our permutation, llama.cpp
    does not)."""
    model = _tiny(family, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / f"{family}.gguf", "f16")
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        src = model(ids).logits
    got = llama_cpp_logits(path, ids)
    # measured ~9e-4 for all three; without the q/k permutation llama gives 0.22
    assert ((got - src).norm() / src.norm()).item() < 5e-3
    assert (got.argmax(-1) == src.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.integration
def test_pruned_smollm2_perplexity_in_llama_cpp(tmp_path):
    model, tokenizer = load_pruned_smollm2()
    pre = gguf_tokenizer_pre(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))
    path = export_gguf(model, tokenizer, tmp_path / "smollm2-24.gguf", "q8_0", tokenizer_pre=pre)
    ids = heldout_windows(tokenizer)
    with torch.no_grad():
        ppl_hf = perplexity(model(ids).logits, ids)
    ppl_cpp = perplexity(llama_cpp_logits(path, ids), ids)
    print(f"pruned SmolLM2 (24 blocks) held-out PPL: transformers fp32 {ppl_hf:.3f}, llama.cpp q8_0 {ppl_cpp:.3f}")
    assert math.isfinite(ppl_cpp) and abs(ppl_cpp / ppl_hf - 1) < 0.03


K_MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs"]


@pytest.mark.parametrize("mix", K_MIXES)
def test_k_mixes_run_in_llama_cpp(mix, tokenizer, tmp_path):
    """llama.cpp reads every K type we write as the same weights transformers' GGUF loader
    dequantises (llama.cpp's own rounding of the activations to 8 bits aside)."""
    from test_export_gguf import _reload

    from depthcut.imatrix import collect_imatrix

    model = _tiny("llama", tokenizer, hidden_size=256, intermediate_size=512)
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(1))
    imatrix = collect_imatrix(model, ids, progress=False)
    path = export_gguf(model, tokenizer, tmp_path / f"{mix}.gguf", mix, imatrix=imatrix)
    with torch.no_grad():
        ref = _reload(path)(ids).logits
    got = llama_cpp_logits(path, ids)
    # measured 0.004-0.007 over the mixes (f16: 9e-4); a wrong block layout gives ~1
    # measured 0.077-0.082 over the K mixes (iq4_nl 0.058, iq4_xs 0.085), argmax 82-93%: llama.cpp
    # rounds the activations to 8 bits (per 256 for K types and IQ4_XS, per 32 for IQ4_NL) and this
    # random model amplifies that ~10x (a q8_0 file: 0.056, 93%);
    # a misread block layout gives ~1
    assert ((got - ref).norm() / ref.norm()).item() < 0.12
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.75


def llama_cpp_quantize(src, dst, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype = 2, ftype
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.integration
def test_smollm2_q4_k_m_against_llama_cpps_quantiser(tmp_path):
    """The pruned real model, one F16 file: depthcut's Q4_K_M within 1% of llama.cpp's own Q4_K_M
    (same file, no importance) and below it with the calibration's importance."""
    from transformers import AutoModelForCausalLM

    from depthcut.calibration import Calibration
    from depthcut.imatrix import collect_imatrix

    model, tokenizer = load_pruned_smollm2()
    pre = gguf_tokenizer_pre(os.path.join(SMOLLM2_DIR, SMOLLM2_FILE))
    f16 = export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16", tokenizer_pre=pre)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f16.name, dtype=torch.float32).eval()
    imatrix = collect_imatrix(model, Calibration.load(tokenizer, n_samples=16).input_ids, progress=False)
    files = {"f16": f16, "llama.cpp": tmp_path / "llama.cpp.gguf"}
    llama_cpp_quantize(f16, files["llama.cpp"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    for name, im in (("depthcut", None), ("depthcut+imatrix", imatrix)):
        files[name] = export_gguf(model, tokenizer, tmp_path / f"{name}.gguf", "q4_k_m", tokenizer_pre=pre, imatrix=im)
    ids = heldout_windows(tokenizer)
    ppl = {name: perplexity(llama_cpp_logits(path, ids), ids) for name, path in files.items()}
    print("pruned SmolLM2 held-out PPL in llama.cpp: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    assert ppl["depthcut"] <= 1.01 * ppl["llama.cpp"]
    assert ppl["depthcut+imatrix"] < ppl["llama.cpp"]
    assert ppl["depthcut+imatrix"] < 1.15 * ppl["f16"]
