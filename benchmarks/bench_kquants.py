"""K-quant speed: quantising the real SmolLM2's weights, depthcut's C++ op vs its numpy reference
(docs/DESIGN.md, "K-quant quantisers").

Every 2-D weight whose rows are a multiple of 256 long is quantised (in SmolLM2-135M: the 30
FFN down projections; its other rows are 576 long and take a legacy type). Each contender is
one function in CONTENDERS, ([(weight, importance or None)], qtype) -> seconds, on --threads threads
in this one process; ratios are against the first. Peak memory: the process's peak resident
set after each contender (cumulative, so later contenders only show what they add).

    python benchmarks/bench_kquants.py                     # q4_k, 2 threads, no importance
    python benchmarks/bench_kquants.py --type q6_k --importance --out benchmarks/kquants_cpu_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import depthcut  # noqa: E402
from depthcut import kquants  # noqa: E402
from depthcut.ops import _has_ext_op  # noqa: E402
from depthcut.outputs import WRITTEN_BY, atomic_write  # noqa: E402
from depthcut.speed import machine  # noqa: E402


def smollm2_weights() -> dict[str, torch.Tensor]:
    """The bundled SmolLM2's 2-D fp32 weights that K-quants can hold (rows a multiple of 256 long)."""
    model, _ = depthcut.load_model(dtype=torch.float32, device="cpu")
    return {name: p.detach() for name, p in model.named_parameters()
            if p.dim() == 2 and p.shape[1] % kquants.QK_K == 0}


def _timed_each(weights, fn) -> float:
    start = time.perf_counter()
    for w, imp in weights:
        fn(w, imp)
    return time.perf_counter() - start


def depthcut_op(weights, qtype: str) -> float:
    """depthcut's C++ op (checks and importance normalisation included, as kquants.quantize runs it)."""
    if not _has_ext_op("quantize_kquant", torch.device("cpu")):
        raise SystemExit("depthcut._C lacks quantize_kquant: python setup.py build_ext --inplace")
    return _timed_each(weights, lambda w, imp: kquants.quantize(w, qtype, imp))


def numpy_reference(weights, qtype: str) -> float:
    """The straightforward implementation: kquants.quantize_reference, numpy vectorised over super-blocks."""
    return _timed_each(weights, lambda w, imp: kquants.quantize_reference(w, qtype, imp))


CONTENDERS = {"depthcut C++ op": depthcut_op, "numpy reference": numpy_reference}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="q4_k", choices=kquants.KQUANT_TYPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--importance", action="store_true", help="weight by a random importance per column")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    named = smollm2_weights()
    g = torch.Generator().manual_seed(0)
    weights = [(w, torch.rand(w.shape[1], generator=g) if args.importance else None) for w in named.values()]
    rows, count = sum(w.shape[0] for w, _ in weights), sum(w.numel() for w, _ in weights)
    print(f"{machine()}; SmolLM2-135M: {len(weights)} tensors, {rows} rows, {count / 1e6:.1f} M weights "
          f"to {args.type}{' with importance' if args.importance else ''}")
    results = []
    for name, fn in CONTENDERS.items():
        seconds = fn(weights, args.type)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results.append({"contender": name, "seconds": seconds, "rows_per_s": rows / seconds,
                        "weights_per_s": count / seconds, "peak_rss_mib": peak})
    base = results[0]["seconds"]
    print(f"{'contender':<20} {'seconds':>8} {'rows/s':>10} {'M weights/s':>12} {'vs first':>9} {'peak RSS':>10}")
    for r in results:
        print(f"{r['contender']:<20} {r['seconds']:8.2f} {r['rows_per_s']:10.0f} {r['weights_per_s'] / 1e6:12.2f} "
              f"{r['seconds'] / base:8.2f}x {r['peak_rss_mib']:7.0f} MiB")
    if args.out:
        record = {"written_by": WRITTEN_BY, "machine": machine(), "qtype": args.type, "threads": args.threads,
                  "importance": args.importance, "tensors": len(weights), "rows": rows, "weights": count,
                  "date": time.strftime("%Y-%m-%d"), "results": results}
        atomic_write(args.out, (json.dumps(record, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
