"""Block streaming: the streamed single pass against the in-memory one, on a model that fits.

A random-weight model of the chosen shape is saved once to a temporary folder; both passes
score it with the same criteria and budget, in this process, in alternating order after a
warm-up (so the page cache is warm for the streamed pass, the case the target is set for).
Prints seconds, the ratio, and each pass's peak resident memory above the start.
  python benchmarks/bench_offload.py                       # CPU, SmolLM2 shape, 10 x 128
  python benchmarks/bench_offload.py --shape llama7b       # GPU: blocks streamed from host memory
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from bench_scoring import PeakMemory  # noqa: E402
from tiny_models import save_word_tokenizer  # noqa: E402

import depthcut  # noqa: E402
from depthcut.offload import load_streamed  # noqa: E402
from depthcut.speed import SHAPES, machine, random_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--criteria", default="ppl,taylor,bi")
    ap.add_argument("--n-samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/offload.json")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    offload = "cpu" if device.type == "cuda" else "disk"
    criteria = args.criteria.split(",")
    with tempfile.TemporaryDirectory() as folder:
        model = random_model(args.shape, torch.device("cpu"), dtype)
        model.save_pretrained(folder)
        ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len),
                            generator=torch.Generator().manual_seed(1234))
        save_word_tokenizer(folder, model.config.vocab_size)  # load_streamed reads one
        whole = model.to(device)
        streamed, _ = load_streamed(folder, offload, dtype=dtype, device=device)
        weights = sum(p.numel() * p.element_size() for p in whole.parameters())
        print(f"random {args.shape} shape, {model.config.num_hidden_layers} blocks, {str(dtype)[6:]}, "
              f"{tuple(ids.shape)} calibration, offload {offload}, {machine()}", file=sys.stderr)

        def run(m):
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                out = depthcut.score(m, ids, criteria, dtype=dtype, progress=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            return seconds, mem.bytes, out

        run(whole), run(streamed)  # warm-up: kernels, page cache
        times = {"in memory": [], "streamed": []}
        peaks = {"in memory": 0, "streamed": 0}
        scores = {}
        for _ in range(args.runs):
            for name, m in (("in memory", whole), ("streamed", streamed)):
                seconds, peak, scores[name] = run(m)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
        same = all(scores["streamed"][c] == scores["in memory"][c] for c in scores["in memory"])
    best = {k: min(v) for k, v in times.items()}
    ratio = best["streamed"] / best["in memory"]
    print(f"\n{'pass':<12} {'seconds':>9} {'peak MiB':>9}")
    for name in times:
        print(f"{name:<12} {best[name]:>9.2f} {peaks[name] / 2**20:>9.0f}")
    print(f"streamed / in memory: {ratio:.2f} (target <= 1.3 on the CPU from a warm page cache); "
          f"identical scores: {same}; weights {weights / 2**20:.0f} MiB; {machine()}")
    out = {"shape": args.shape, "device": str(device), "offload": offload, "calibration": list(ids.shape),
           "criteria": criteria, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": best,
           "ratio": ratio, "peak_extra_bytes": peaks, "identical_scores": same, "weights_bytes": weights}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
