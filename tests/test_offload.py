"""Models larger than memory: streamed blocks give the in-memory scores, within a fraction of the memory."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import depthcut
from depthcut.errors import DepthcutError
from depthcut import offload
from depthcut.offload import load_streamed
from tiny_models import FAMILIES, random_tokens, save_word_tokenizer, tiny_model

CRITERIA = ["ppl", "taylor", "bi", "angular", "magnitude"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("budget", [None, 60_000])  # one chunk; several chunks (per_block Taylor)
def test_streamed_scores_are_the_in_memory_scores(family, budget, tokenizer, tmp_path):
    model = tiny_model(family, seed=3, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = random_tokens(model, 4, 23, seed=5)
    in_memory, _ = depthcut.load_model(tmp_path, dtype=torch.float32, device="cpu")
    whole = depthcut.score(in_memory, ids, CRITERIA, windows=[1, 2], dtype=torch.float32, max_memory=budget,
                           progress=False)
    streamed, _ = load_streamed(tmp_path, "disk", dtype=torch.float32, device="cpu")
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())
    got = depthcut.score(streamed, ids, CRITERIA, windows=[1, 2], max_memory=budget, progress=False)
    for c in whole:
        assert got[c] == whole[c], c  # the same arithmetic, bit for bit
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())  # every block released


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_gpu_streamed_scores_are_the_in_memory_scores(offload, tmp_path):
    """On a GPU blocks arrive through a side stream while the previous block computes."""
    model = tiny_model("llama", seed=3)
    model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, model.config.vocab_size)
    ids = random_tokens(model, 4, 23, seed=5)
    in_memory, _ = depthcut.load_model(tmp_path, dtype=torch.float32, device="cuda")
    whole = depthcut.score(in_memory, ids, CRITERIA, windows=[1, 2], dtype=torch.float32, progress=False)
    streamed, _ = load_streamed(tmp_path, offload, dtype=torch.float32, device="cuda")
    got = depthcut.score(streamed, ids, CRITERIA, windows=[1, 2], progress=False)
    for c in whole:
        assert got[c] == whole[c], c


def test_a_pruned_streamed_model_saves_tensor_by_tensor(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama", seed=4, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    streamed, tok = load_streamed(tmp_path / "dense", "disk", dtype=torch.float32, device="cpu")
    depthcut.prune_blocks(streamed, [2, 5])
    monkeypatch.setattr(offload, "MIN_SHARD_BYTES", 100_000)  # several shards (of two blocks) and an index
    depthcut.save_model(streamed, tok, tmp_path / "cut")
    assert len(json.loads((tmp_path / "cut" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    reloaded, _ = depthcut.load_model(tmp_path / "cut", dtype=torch.float32, device="cpu")
    expected = depthcut.prune_blocks(model, [2, 5])
    ids = random_tokens(model, 2, 9)
    torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_a_pruned_streamed_model_exports_the_same_gguf(tokenizer, tmp_path):
    pytest.importorskip("gguf")
    from depthcut.export_gguf import export_gguf

    model = tiny_model("llama", seed=4, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    whole, tok = depthcut.load_model(tmp_path / "dense", dtype=torch.float32, device="cpu")
    streamed, _ = load_streamed(tmp_path / "dense", "disk", dtype=torch.float32, device="cpu")
    for m, out in ((whole, "whole.gguf"), (streamed, "streamed.gguf")):
        export_gguf(depthcut.prune_blocks(m, [1, 6]), tok, tmp_path / out, "q8_0", name="cut")
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "streamed.gguf").read_bytes()
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())


def test_streaming_refuses_what_it_cannot_stream(tmp_path, tiny_model_dir):
    with pytest.raises(DepthcutError, match="--offload cpu keeps the blocks in host memory for a GPU pass"):
        load_streamed(tiny_model_dir, "cpu", device="cpu")
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(DepthcutError, match="--offload disk needs a safetensors checkpoint"):
        load_streamed(tmp_path, "disk", device="cpu")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(DepthcutError, match="unreadable safetensors file .*model.safetensors"):
        load_streamed(tmp_path, "disk", device="cpu")
    nan = tiny_model("llama", seed=4)
    with torch.no_grad():
        nan.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    nan.save_pretrained(tmp_path / "nan")
    save_word_tokenizer(tmp_path / "nan", nan.config.vocab_size)
    streamed, _ = load_streamed(tmp_path / "nan", "disk", dtype=torch.float32, device="cpu")
    with pytest.raises(DepthcutError, match=r"NaN or infinite values in model\.layers\.2\.mlp\.up_proj\.weight"):
        depthcut.score(streamed, random_tokens(streamed, 2, 9), ["bi"], progress=False)
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())  # released all the same
    streamed, _ = load_streamed(tiny_model_dir, "disk", dtype=torch.float32, device="cpu")
    with pytest.raises(DepthcutError, match="a streamed model computes in the dtype it was loaded in"):
        depthcut.score(streamed, random_tokens(streamed, 2, 9), ["ppl"], dtype=torch.bfloat16, progress=False)
    with pytest.raises(DepthcutError, match="--scorer reference needs the whole model in memory"):
        depthcut.score(streamed, random_tokens(streamed, 2, 9), ["ppl"], scorer="reference", progress=False)


# 3.55 GB of fp32 weights: 120 blocks of hidden 768 (28 MB each) and a tied 49k-token embedding (151 MB).
# The process itself (torch, transformers, the tokenizer) takes 0.5-0.6 GB before any weight.
BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=120, num_attention_heads=12,
           num_key_value_heads=12, tie_word_embeddings=True, max_position_embeddings=256)


def _write_big_model(folder, tokenizer) -> int:
    """A random Llama written shard by shard (one block per shard): never whole in this process."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), **BIG)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)

    def fill(name, shape):
        return torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02

    groups = {}
    for name, shape in shapes.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append((name, shape))
    weight_map, total = {}, 0
    for k, (key, items) in enumerate(groups.items()):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: fill(name, shape) for name, shape in items}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return total


def _run_measured(*args) -> int:
    """Runs the CLI in a wrapper process whose only child it is; returns the child's peak RSS."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "depthcut.cli", *map(str, args)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_a_3_5gb_model_scores_and_prunes_in_a_third_of_its_size(tokenizer, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    size = _write_big_model(big, tokenizer)
    assert size > 3.5e9
    common = ["--criteria", "taylor,bi,magnitude", "--n-samples", 2, "--seq-len", 32, "--compute-dtype", "fp32",
              "--max-memory", "64MiB"]
    peak = _run_measured("score", big, *common, "--offload", "disk", "--out", tmp_path / "streamed.json")
    assert peak < size / 3, f"peak RSS {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB model"
    _run_measured("score", big, *common, "--out", tmp_path / "whole.json")
    streamed = json.loads((tmp_path / "streamed.json").read_text())
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert streamed["scores"] == whole["scores"]

    peak = _run_measured("prune", big, "--offload", "disk", "--blocks", "10,20,30", "--compute-dtype", "fp32",
                         "--out", tmp_path / "cut")
    assert peak < size / 3, f"prune peak RSS {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB model"
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["num_hidden_layers"] == 117
    index = json.loads((tmp_path / "cut" / "model.safetensors.index.json").read_text())["weight_map"]
    source = json.loads((big / "model.safetensors.index.json").read_text())["weight_map"]
    old = [i for i in range(120) if i not in (10, 20, 30)]
    for name, file in index.items():  # every tensor, renumbered, equal to its source; one at a time
        src = name
        if name.startswith("model.layers."):
            j, rest = name[len("model.layers."):].split(".", 1)
            src = f"model.layers.{old[int(j)]}.{rest}"
        with safe_open(tmp_path / "cut" / file, "pt") as a, safe_open(big / source[src], "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(src)), name
    assert len(index) == len(source) - 3 * 9
