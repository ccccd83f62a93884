"""The real client: llama.cpp (through llama-cpp-python) runs the exported files.

Skipped unless ``llama_cpp`` is importable (``make llama-cpp`` builds it). Text goes in as token
ids from the transformers tokenizer, so these tests compare the model graphs, not tokenizers.
"""
from __future__ import annotations

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
