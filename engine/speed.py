"""The paper's speed protocol (SPEC §5): forced-length generation over batch sizes x
output lengths, warm-up then timed runs, latency / throughput / peak memory, dense vs
pruned, this runtime vs Hugging Face ``generate``.

Backends run interleaved inside each timed repetition so that a noisy shared machine
slows both alike; ratios are therefore measured within one run, never across runs.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

GPU_PROTOCOL = dict(batch_sizes=(1, 8, 16, 32, 64, 128, 256), new_tokens=(128, 512), warmup=10, runs=20)
CPU_PROTOCOL = dict(batch_sizes=(1,), new_tokens=(32, 128), warmup=1, runs=3)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


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
    """On CUDA: this backend's own weights (+ runtime cache) plus what the run allocated on
    top of everything already resident; on CPU: the process RSS high-water mark."""
    if device.type == "cuda":
        return (own + torch.cuda.max_memory_allocated(device) - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _backends(model, runtimes, hf):
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


def measure(model, runtimes, label, batch_sizes, new_tokens, warmup, runs, prompt_len=32, hf=True,
            seed=0, log=print):
    """Rows for one model (dense or pruned) over the protocol grid; ``runtimes`` maps a
    backend name to a :class:`Runtime` built from ``model``."""
    device = next(model.parameters()).device
    fns = _backends(model, runtimes, hf)
    n_blocks = model.config.num_hidden_layers
    rows = []
    for n in new_tokens:
        for B in batch_sizes:
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, model.config.vocab_size, (B, prompt_len), generator=g).to(device)
            mask = torch.ones_like(ids)
            times = {k: [] for k in fns}
            decode = {k: [] for k in fns}
            toks, status = {}, {}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            peaks = {}
            for name, fn in fns.items():
                try:
                    for _ in range(warmup):
                        fn(ids, mask, n)
                    status[name] = "ok"
                except torch.cuda.OutOfMemoryError:
                    status[name] = "oom"
                    torch.cuda.empty_cache()
            for _ in range(runs):  # interleaved: both backends see the same machine load
                for name, fn in fns.items():
                    if status[name] != "ok":
                        continue
                    base = 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    sec, (out, tok_s) = _timed(lambda: fn(ids, mask, n), device)
                    peak = _peak_mib(device, base, _own_bytes(model, runtimes, name))
                    peaks[name] = max(peaks.get(name, 0.0), peak)
                    times[name].append(sec)
                    if tok_s is not None:
                        decode[name].append(tok_s)
                    toks[name] = out
            for name in fns:
                row = dict(model=label, blocks=n_blocks, backend=name, batch=B, new_tokens=n,
                           status=status[name], device=machine())
                if times[name]:
                    lat = statistics.median(times[name])
                    row.update(latency_s=lat, latency_std_s=statistics.pstdev(times[name]),
                               throughput_tok_s=B * n / lat, peak_mem_mib=peaks[name])
                    if decode[name]:
                        row["decode_tok_s"] = statistics.median(decode[name])
                if name != "hf" and "hf" in toks and name in toks:
                    row["greedy_equal_to_hf"] = bool(torch.equal(toks[name].cpu(), toks["hf"].cpu()))
                rows.append(row)
                log(_fmt(row))
    return rows


def summarize(rows):
    """Ratios measured in the same run: runtime/HF per config, pruned/dense per backend."""
    key = {(r["model"], r["backend"], r["batch"], r["new_tokens"]): r.get("throughput_tok_s") for r in rows}
    out = []
    for (model, backend, B, n), tp in key.items():
        if backend != "hf" and tp and key.get((model, "hf", B, n)):
            out.append(dict(what=f"{backend}/hf", model=model, batch=B, new_tokens=n,
                            ratio=tp / key[(model, "hf", B, n)]))
        if model != "dense" and tp and key.get(("dense", backend, B, n)):
            out.append(dict(what=f"{model}/dense", backend=backend, batch=B, new_tokens=n,
                            ratio=tp / key[("dense", backend, B, n)]))
    return out


def _fmt(r):
    if "latency_s" not in r:
        return f"{r['model']:>8} {r['blocks']:>3}blk {r['backend']:>8} B={r['batch']:<4} n={r['new_tokens']:<4} {r['status']}"
    extra = f" decode {r['decode_tok_s']:8.1f} tok/s" if "decode_tok_s" in r else ""
    eq = f" greedy==hf:{r['greedy_equal_to_hf']}" if "greedy_equal_to_hf" in r else ""
    return (f"{r['model']:>8} {r['blocks']:>3}blk {r['backend']:>8} B={r['batch']:<4} n={r['new_tokens']:<4} "
            f"latency {r['latency_s']:8.3f} s  throughput {r['throughput_tok_s']:9.1f} tok/s  "
            f"peak {r['peak_mem_mib']:8.0f} MiB{extra}{eq}")


def plot(rows, path):
    """Throughput vs batch size, one panel per output length, a line per model x backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["new_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for model, backend in sorted({(r["model"], r["backend"]) for r in rows}):
            pts = sorted((r["batch"], r["throughput_tok_s"]) for r in rows
                         if r["new_tokens"] == n and r["model"] == model and r["backend"] == backend
                         and "throughput_tok_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{model} / {backend}")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens / s",
               title=f"{n} new tokens")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"depthcut decode speed ({machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_protocol(model, prune=None, *, batch_sizes=None, new_tokens=None, warmup=None, runs=None,
                   dtypes=(None,), hf=True, prompt_len=32, out_dir=None, log=print):
    """Run SPEC §5 on ``model`` (dense) and, when ``prune`` lists blocks to delete, on the
    same model pruned in place afterwards (no second copy of the weights). One runtime
    backend per entry of ``dtypes`` (None: the model's dtype), plus HF generate when
    ``hf``. Defaults: the full protocol on CUDA, a short one on CPU. Returns a dict; with
    ``out_dir`` also writes ``speed.json`` and ``speed.png`` there."""
    from .runtime import Runtime

    device = next(model.parameters()).device
    proto = dict(GPU_PROTOCOL if device.type == "cuda" else CPU_PROTOCOL)
    for k, v in dict(batch_sizes=batch_sizes, new_tokens=new_tokens, warmup=warmup, runs=runs).items():
        if v is not None:
            proto[k] = v
    rows = []
    variants = [("dense", None)] + ([("pruned", sorted(prune))] if prune else [])
    for label, blocks in variants:
        if blocks:
            from .pruner import prune_blocks

            prune_blocks(model, blocks)
        runtimes = {"runtime" + ("" if dt is None else "-" + str(dt).replace("torch.", "")):
                    Runtime.from_hf(model, dtype=dt) for dt in dtypes}
        rows += measure(model, runtimes, label, prompt_len=prompt_len, hf=hf, log=log, **proto)
        del runtimes
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = dict(machine=machine(), torch=torch.__version__, protocol=proto, prompt_len=prompt_len,
                  model_dtype=str(next(model.parameters()).dtype), pruned_blocks=prune,
                  peak_mem_note=("backend's own weights/cache + what its run allocated" if device.type == "cuda"
                                 else "process RSS high-water mark (all backends together)"),
                  rows=rows, ratios=summarize(rows))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2))
        plot(rows, out / "speed.png")
    return result
