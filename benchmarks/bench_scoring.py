"""Scoring speed: the fused single pass vs the reference path vs the reference code's structure.

Every ratio is measured in this one run, on this machine. Examples:
  python benchmarks/bench_scoring.py                          # CPU, real SmolLM2, fp32 and bf16 pass
  python benchmarks/bench_scoring.py --shape llama7b          # GPU, random weights, bf16
  python benchmarks/bench_scoring.py --shape llama7b --n-samples 128 --seq-len 2048 --only fused \
      --max-memory-gib 2      # SLEB scale within 1.15 x the weights: Taylor's per_block backward
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import depthcut  # noqa: E402
from depthcut import reference  # noqa: E402
from depthcut.evaluate import window_nll  # noqa: E402
from depthcut.speed import SHAPES, machine, random_model  # noqa: E402


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator stats, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name, fn, device, results, weights_bytes):
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    results.append({"what": name, "seconds": seconds, "peak_extra_bytes": mem.bytes,
                    "peak_over_weights": (mem.bytes + weights_bytes) / weights_bytes if device.type == "cuda"
                    else None, "plan": _plan(getattr(out, "meta", {}))})
    print(f"  {name}: {seconds:.2f} s", file=sys.stderr)


def _plan(meta: dict) -> dict:
    """How the fused pass cut the work: chunks, variant groups, and Taylor's backward."""
    keys = ("windows_per_chunk", "variant_batch", "taylor_backward", "taylor_accumulator_bytes",
            "taylor_stored_bytes", "taylor_stored_on")
    return {k: meta[k] for k in keys if k in meta}


def naive_ppl(model, ids):
    """The reference code's structure: a fresh model without block i, batch-1 forwards."""
    count = ids.shape[0] * (ids.shape[1] - 1)
    out = []
    for i in range(model.config.num_hidden_layers):
        fresh = depthcut.prune_blocks(copy.deepcopy(model), [i])
        out.append(math.exp(window_nll(fresh, ids, batch_size=1).sum().item() / count))
        del fresh
    return out


def block_flops(model, tokens: int, n_evals: int) -> float:
    """2·params·tokens per block evaluation (attention's T² term is small at T=128 and left out)."""
    block_params = sum(p.numel() for p in model.model.layers[0].parameters())
    return n_evals * tokens * 2 * block_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model path (default: bundled SmolLM2 when --shape is not given)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of this shape instead")
    ap.add_argument("--n-samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", choices=("fused", "all"), default="all", help="fused only (large calibration runs)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the fresh-model-per-block baseline")
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 peak for the utilisation column")
    ap.add_argument("--max-memory-gib", type=float, help="budget of the fused pass (default: half the free memory)")
    ap.add_argument("--json", default="benchmarks/scoring.json")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape:
        model = random_model(args.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        label = f"random {args.shape} shape"
        ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len),
                            generator=torch.Generator().manual_seed(1234))
    else:
        model, tok = depthcut.load_model(args.model, device=device)
        label = args.model or "SmolLM2-135M-Instruct"
        ids = depthcut.Calibration.load(tok, n_samples=args.n_samples, seq_len=args.seq_len).input_ids
    dtype = next(model.parameters()).dtype
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    L = model.config.num_hidden_layers
    print(f"{label}, {L} blocks, {str(dtype)[6:]}, {tuple(ids.shape)} calibration, {machine()}", file=sys.stderr)

    results: list[dict] = []
    all_criteria = ["ppl", "taylor", "magnitude", "bi"]
    budget = int(args.max_memory_gib * 2**30) if args.max_memory_gib else None
    score = lambda crit, **kw: depthcut.score(model, ids, crit, progress=False, max_memory=budget, **kw)  # noqa: E731
    measure("fused, all criteria (first call)", lambda: score(all_criteria), device, results, weights)
    measure("fused, all criteria", lambda: score(all_criteria), device, results, weights)
    if device.type == "cpu" and dtype == torch.float32:
        measure("fused, all criteria, bf16 pass", lambda: score(all_criteria, dtype=torch.bfloat16), device,
                results, weights)
    if args.only == "all":
        measure("fused, PPL only", lambda: score(["ppl"]), device, results, weights)
        measure("fused, Taylor only", lambda: score(["taylor"]), device, results, weights)
        measure("reference, PPL (in-place skip, batch 10)", lambda: reference.ppl_scores(model, ids), device,
                results, weights)
        measure("reference, Taylor (autograd)", lambda: reference.taylor_scores(model, ids), device, results,
                weights)
        if not args.skip_naive:
            measure("reference code structure, PPL (fresh model per block, batch 1)",
                    lambda: naive_ppl(model, ids), device, results, weights)

    fused = results[1]["seconds"]
    tokens = ids.numel()
    flops = block_flops(model, tokens, L + L * (L - 1) // 2 + 3 * L)  # walk + Taylor recompute/backward
    flops += 2 * tokens * (L + 1) * model.config.vocab_size * model.config.hidden_size
    print(f"\n{label} ({L} blocks, {str(dtype)[6:]}), {tokens} calibration tokens, {machine()}")
    header = f"{'what':<66} {'seconds':>9} {'x fused':>8} {'peak MiB':>9}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        r["fused_speedup"] = r["seconds"] / fused
        print(f"{r['what']:<66} {r['seconds']:>9.3f} {r['fused_speedup']:>8.2f} {r['peak_extra_bytes'] / 2**20:>9.0f}")
    tflops = flops / fused / 1e12
    print(f"fused all-criteria pass: ~{flops / 1e12:.2f} TFLOP, {tflops:.2f} TFLOP/s"
          + (f" ({100 * tflops / args.peak_tflops:.0f}% of {args.peak_tflops:.0f})" if device.type == "cuda" else ""))
    print(f"fused pass plan: {results[1]['plan']}")
    if device.type == "cuda":
        print(f"peak memory / weights (fused, all): {results[1]['peak_over_weights']:.2f} (target <= 1.15)")
    out = {"model": label, "blocks": L, "dtype": str(dtype), "calibration": list(ids.shape), "machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "weights_bytes": weights, "fused_tflop": flops / 1e12,
           "results": results}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
