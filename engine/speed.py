"""The paper's speed protocol (docs/DESIGN.md, "Evaluation and speed protocols"): forced-length generation over batch sizes x
output lengths, warm-up then timed runs, latency / throughput / peak memory, dense vs
pruned, this runtime vs Hugging Face ``generate``.

Backends run interleaved inside each timed repetition so that a noisy shared machine
slows both alike; ratios are therefore measured within one run, never across runs.
"""
from __future__ import annotations

import copy
import json
import platform
import resource
import statistics
import time
import torch

from .errors import DepthcutError
from .models import check_context
from .outputs import atomic_path

SHAPES = {  # random-weight stand-ins for the GPU targets (docs/DESIGN.md, "Targets and what was measured")
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    rope_theta=100000.0),
}
GPU_PROTOCOL = dict(batch_sizes=(1, 8, 16, 32, 64, 128, 256), new_tokens=(128, 512), warmup=10, runs=20)
CPU_PROTOCOL = dict(batch_sizes=(1,), new_tokens=(32, 128), warmup=1, runs=3)


def random_model(shape: str, device=None, dtype=torch.bfloat16):
    """A random-weight Llama of a named shape, built directly on the device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tail_blocks(n_blocks: int, keep: int):
    """Blocks to delete for a ``keep``-block variant: those just before the last two (the
    "+" rule keeps the first 4 and last 2). Which blocks go does not change the speed."""
    if not 2 <= keep <= n_blocks:
        raise DepthcutError(f"--keep must be between 2 and the model's {n_blocks} blocks, got {keep}")
    return list(range(n_blocks - 2 - (n_blocks - keep), n_blocks - 2)) if keep < n_blocks else None


def machine() -> str:
    """The GPU's name, or the CPU's model name and torch's thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _timed(fn, device):
    """Wall time of fn() with CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3, out
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _own_bytes(model, runtimes, name):
    if name in runtimes:
        return runtimes[name].memory_bytes()
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peak_mib(device, base, own):
    """On CUDA: this runner's own weights (+ runtime cache) plus what the run allocated on
    top of everything already resident; on CPU: the process RSS high-water mark."""
    if device.type == "cuda":
        return (own + torch.cuda.max_memory_allocated(device) - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runners(model, runtimes, hf):
    """name -> fn(ids, mask, n) returning (new tokens [B, n], decode tok/s or None)."""
    fns = {}
    if hf:
        def hf_generate(ids, mask, n):
            gc = model.generation_config
            eos, gc.eos_token_id = gc.eos_token_id, None  # forced length, no EOS suppression
            try:
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                         pad_token_id=0)
            finally:
                gc.eos_token_id = eos
            return out[:, ids.shape[1]:], None
        fns["hf"] = hf_generate
    for name, rt in runtimes.items():
        def run(ids, mask, n, rt=rt):
            out, stats = rt.generate(ids, mask, max_new_tokens=n)
            return out, stats["decode_tok_s"]
        fns[name] = run
    return fns


def measure(variants, batch_sizes, new_tokens, warmup, runs, prompt_len=32, hf=True, seed=0, log=print):
    """Rows over the protocol grid. ``variants`` is a list of (label, model, runtimes), where
    ``runtimes`` maps a runner name to a :class:`Runtime` built from that model. Every
    (variant, runner) pair runs once per timed repetition, in turn."""
    device = next(variants[0][1].parameters()).device
    fns, owners = {}, {}
    for label, model, runtimes in variants:
        for name, fn in _runners(model, runtimes, hf).items():
            fns[label, name] = fn
            owners[label, name] = (model, runtimes)
    rows = []
    for n in new_tokens:
        for B in batch_sizes:
            g = torch.Generator().manual_seed(seed)
            vocab = variants[0][1].config.vocab_size
            ids = torch.randint(0, vocab, (B, prompt_len), generator=g).to(device)
            mask = torch.ones_like(ids)
            times = {k: [] for k in fns}
            decode = {k: [] for k in fns}
            toks, status, peaks = {}, {}, {}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for key, fn in fns.items():
                try:
                    for _ in range(warmup):
                        fn(ids, mask, n)
                    status[key] = "ok"
                except torch.cuda.OutOfMemoryError:
                    status[key] = "oom"
                    torch.cuda.empty_cache()
            for _ in range(runs):  # interleaved: every runner sees the same machine load
                for key, fn in fns.items():
                    if status[key] != "ok":
                        continue
                    base = 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    sec, (out, tok_s) = _timed(lambda: fn(ids, mask, n), device)
                    peak = _peak_mib(device, base, _own_bytes(*owners[key], key[1]))
                    peaks[key] = max(peaks.get(key, 0.0), peak)
                    times[key].append(sec)
                    if tok_s is not None:
                        decode[key].append(tok_s)
                    toks[key] = out
            for (label, name) in fns:
                key = (label, name)
                row = dict(model=label, blocks=owners[key][0].config.num_hidden_layers, runner=name,
                           batch=B, new_tokens=n, status=status[key], device=machine())
                if times[key]:
                    lat = statistics.median(times[key])
                    row.update(latency_s=lat, latency_std_s=statistics.pstdev(times[key]),
                               throughput_tok_s=B * n / lat, peak_mem_mib=peaks[key])
                    if decode[key]:
                        row["decode_tok_s"] = statistics.median(decode[key])
                if name != "hf" and (label, "hf") in toks and key in toks:
                    row["greedy_equal_to_hf"] = bool(torch.equal(toks[key].cpu(), toks[label, "hf"].cpu()))
                rows.append(row)
                log(_fmt(row))
    return rows


def summarize(rows):
    """Ratios measured in the same run: runtime/HF per config, pruned/dense per runner."""
    key = {(r["model"], r["runner"], r["batch"], r["new_tokens"]): r.get("throughput_tok_s") for r in rows}
    out = []
    for (model, runner, B, n), tp in key.items():
        if runner != "hf" and tp and key.get((model, "hf", B, n)):
            out.append(dict(what=f"{runner}/hf", model=model, batch=B, new_tokens=n,
                            ratio=tp / key[(model, "hf", B, n)]))
        if model != "dense" and tp and key.get(("dense", runner, B, n)):
            out.append(dict(what=f"{model}/dense", runner=runner, batch=B, new_tokens=n,
                            ratio=tp / key[("dense", runner, B, n)]))
    return out


def _fmt(r):
    if "latency_s" not in r:
        return f"{r['model']:>8} {r['blocks']:>3}blk {r['runner']:>8} B={r['batch']:<4} n={r['new_tokens']:<4} {r['status']}"
    extra = f" decode {r['decode_tok_s']:8.1f} tok/s" if "decode_tok_s" in r else ""
    eq = f" greedy==hf:{r['greedy_equal_to_hf']}" if "greedy_equal_to_hf" in r else ""
    return (f"{r['model']:>8} {r['blocks']:>3}blk {r['runner']:>8} B={r['batch']:<4} n={r['new_tokens']:<4} "
            f"latency {r['latency_s']:8.3f} s  throughput {r['throughput_tok_s']:9.1f} tok/s  "
            f"peak {r['peak_mem_mib']:8.0f} MiB{extra}{eq}")


def plot(rows, path):
    """Throughput vs batch size, one panel per output length, a line per model x runner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["new_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for model, runner in sorted({(r["model"], r["runner"]) for r in rows}):
            pts = sorted((r["batch"], r["throughput_tok_s"]) for r in rows
                         if r["new_tokens"] == n and r["model"] == model and r["runner"] == runner
                         and "throughput_tok_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{model} / {runner}")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens / s",
               title=f"{n} new tokens")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"depthcut decode speed ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_protocol(model, prune=None, *, batch_sizes=None, new_tokens=None, warmup=None, runs=None,
                   dtypes=(None,), hf=True, prompt_len=32, interleave=None, out_dir=None, force=False, log=print):
    """Run the speed protocol (docs/DESIGN.md, "Evaluation and speed protocols") on ``model`` (dense) and, when ``prune`` lists blocks to delete, on its
    pruned form (see ``interleave``; ``model`` itself is pruned in place when not). One runtime
    runner per entry of ``dtypes`` (None: the model's dtype), plus HF generate when
    ``hf``. Defaults: the full protocol on CUDA, a short one on CPU. ``interleave``
    (default: on CPU) keeps a pruned copy beside the dense model so both are timed in
    the same repetitions. Returns a dict; with ``out_dir`` also writes ``speed.json``
    and ``speed.png`` there (an existing folder only when depthcut wrote it, or with ``force``)."""
    from .pruner import prune_blocks
    from .runtime import Runtime

    device = next(model.parameters()).device
    proto = dict(GPU_PROTOCOL if device.type == "cuda" else CPU_PROTOCOL)
    for k, v in dict(batch_sizes=batch_sizes, new_tokens=new_tokens, warmup=warmup, runs=runs).items():
        if v is not None:
            proto[k] = v
    if min(proto["batch_sizes"], default=0) < 1 or min(proto["new_tokens"], default=0) < 1 \
            or proto["warmup"] < 0 or proto["runs"] < 1:
        raise DepthcutError(f"the protocol needs batch sizes and new tokens of at least 1, warmup >= 0 and "
                            f"runs >= 1; got {proto}")
    new = max(proto["new_tokens"])
    check_context(model.config, prompt_len + new, f"{prompt_len}-token prompts and {new} new tokens")

    def runtimes(m):
        return {"runtime" + ("" if dt is None else "-" + str(dt).replace("torch.", "")):
                Runtime.from_hf(m, dtype=dt) for dt in dtypes}

    if interleave is None:
        interleave = device.type == "cpu"
    grid = dict(prompt_len=prompt_len, hf=hf, log=log, **proto)
    if interleave:  # dense and pruned side by side: pruned/dense is a same-moment ratio
        variants = [("dense", model, runtimes(model))]
        if prune:
            pruned = prune_blocks(copy.deepcopy(model), prune)
            variants.append(("pruned", pruned, runtimes(pruned)))
        rows = measure(variants, **grid)
    else:  # one model in memory at a time: the dense one is pruned in place afterwards
        rows = measure([("dense", model, runtimes(model))], **grid)
        if prune:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            prune_blocks(model, prune)
            rows += measure([("pruned", model, runtimes(model))], **grid)
    result = dict(machine=machine(), torch=torch.__version__, protocol=proto, prompt_len=prompt_len,
                  model_dtype=str(next(model.parameters()).dtype), pruned_blocks=prune,
                  peak_mem_note=("runner's own weights/cache + what its run allocated" if device.type == "cuda"
                                 else "process RSS high-water mark (all runners together)"),
                  rows=rows, ratios=summarize(rows))
    if out_dir is not None:
        with atomic_path(out_dir, is_dir=True, force=force) as out:
            (out / "speed.json").write_text(json.dumps(result, indent=2))
            plot(rows, out / "speed.png")
    return result
