"""K-quant GGUF files: depthcut's quantiser against llama.cpp's own, on the real SmolLM2-135M
(docs/DESIGN.md, "GGUF export": "K-quant mixes" and "Importance matrix").

One F16 GGUF written by depthcut is the common source. depthcut quantises the model read back
from it (``export_gguf`` with a K mix); llama.cpp quantises the file itself
(``llama_model_quantize`` through llama-cpp-python); each without and with the importance matrix
depthcut collects on the calibration windows (llama.cpp gets the same per-channel means its
``--imatrix`` loader would pass). llama.cpp then evaluates every file on held-apart windows of
the calibration text. Both quantisers run on the same threads; times are whole-file, ratios are
measured in this run. Needs ``make llama-cpp``.

    python benchmarks/bench_kquant_ppl.py [--mixes q4_k_m,q6_k] [--windows 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from depthcut import load_model
from depthcut.calibration import Calibration
from depthcut.export_gguf import export_gguf, gguf_tokenizer_pre, tensor_types
from depthcut.imatrix import collect_imatrix
from depthcut.models import default_model_path
from depthcut.outputs import WRITTEN_BY, atomic_write
from depthcut.speed import machine

try:
    import llama_cpp
except ImportError:
    sys.exit("needs llama-cpp-python: make llama-cpp")

FTYPES = {"q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S",
          "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL",
          "iq4_xs": "IQ4_XS"}


def llama_cpp_quantize(src: Path, dst: Path, mix: str, threads: int, imatrix=None) -> float:
    """Seconds llama.cpp's quantiser takes for the whole file."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPES[mix]}")
    keep = []
    if imatrix is not None:  # {name, mean x^2, size} per tensor, ended by a null name
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.sums) + 1))()
        for e, name in zip(entries, sorted(imatrix.sums)):
            mean = np.ascontiguousarray(imatrix.importance(name, imatrix.sums[name].size).numpy(), dtype=np.float32)
            keep.append(mean)
            e.name, e.data, e.size = name.encode(), mean.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), mean.size
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {mix}")
    return time.perf_counter() - t0


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """exp(mean NLL of each next token) of llama.cpp's logits, every window from an empty cache."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          logits_all=True, n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    try:
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32))
            nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:]), reduction="sum").item()
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mixes", default="q2_k,q3_k_m,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--windows", type=int, default=16, help="held-apart windows evaluated")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows of the importance matrix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/kquant_ppl_cpu_smollm2.json")
    args = ap.parse_args()
    mixes = args.mixes.split(",")
    torch.set_num_threads(args.threads)  # depthcut's quantiser runs its rows on torch's threads
    warnings.filterwarnings("ignore", message=".*stored in a legacy type.*")

    work = Path(tempfile.mkdtemp(prefix="bench_kquant_"))
    model, tokenizer = load_model(device="cpu")
    pre = gguf_tokenizer_pre(str(default_model_path()))
    f16 = export_gguf(model, tokenizer, work / "f16.gguf", "f16", tokenizer_pre=pre)
    del model
    # the F16 file's values, as llama.cpp's quantiser reads them
    src = AutoModelForCausalLM.from_pretrained(work, gguf_file=f16.name, dtype=torch.float32).eval()
    calibration = Calibration.load(tokenizer, n_samples=args.calib_samples, seq_len=args.seq_len)
    heldout = calibration.heldout_ids[: args.windows]
    imatrix = collect_imatrix(src, calibration.input_ids, dataset=calibration.source)
    imatrix.save(work / "imatrix.gguf")

    rows = {"f16": {"ppl": llama_cpp_perplexity(f16, heldout, args.threads), "mib": f16.stat().st_size / 2**20}}
    print(f"f16: held-out PPL {rows['f16']['ppl']:.3f}", flush=True)
    for mix in mixes:
        r = {}
        for im_name, im in (("", None), ("+imatrix", imatrix)):
            path = work / f"depthcut-{mix}{im_name}.gguf"
            t0 = time.perf_counter()
            export_gguf(src, tokenizer, path, mix, tokenizer_pre=pre, imatrix=im)
            r[f"depthcut{im_name}"] = {"seconds": time.perf_counter() - t0, "mib": path.stat().st_size / 2**20,
                                       "ppl": llama_cpp_perplexity(path, heldout, args.threads)}
            theirs = work / f"llama.cpp-{mix}{im_name}.gguf"
            seconds = llama_cpp_quantize(f16, theirs, mix, args.threads, im)
            r[f"llama.cpp{im_name}"] = {"seconds": seconds, "mib": theirs.stat().st_size / 2**20,
                                        "ppl": llama_cpp_perplexity(theirs, heldout, args.threads)}
            mine, other = tensor_types(path), tensor_types(theirs)
            r[f"types_differ{im_name}"] = {k: [v, other.get(k)] for k, v in mine.items() if other.get(k) != v}
        rows[mix] = r
        print(f"{mix}: " + ", ".join(f"{k} {v['ppl']:.3f} ({v['seconds']:.1f} s)" for k, v in r.items()
                                     if not k.startswith("types")), flush=True)

    print(f"\n{machine()}; held-out PPL on {len(heldout)} x {args.seq_len} tokens "
          f"(f16 {rows['f16']['ppl']:.3f}); ratios depthcut / llama.cpp in this run")
    print(f"{'mix':8} {'depthcut':>9} {'llama.cpp':>9} {'ratio':>6} {'dc+im':>9} {'lc+im':>9} {'ratio':>6} "
          f"{'MiB dc/lc':>11} {'quant s dc/lc':>14} {'ratio':>6} {'+im s dc/lc':>12} {'ratio':>6}")
    for mix in mixes:
        r = rows[mix]
        d, l, di, li = r["depthcut"], r["llama.cpp"], r["depthcut+imatrix"], r["llama.cpp+imatrix"]
        print(f"{mix:8} {d['ppl']:9.3f} {l['ppl']:9.3f} {d['ppl'] / l['ppl']:6.3f} {di['ppl']:9.3f} {li['ppl']:9.3f} "
              f"{di['ppl'] / li['ppl']:6.3f} {d['mib']:5.1f}/{l['mib']:5.1f} {d['seconds']:6.1f}/{l['seconds']:6.1f} "
              f"{d['seconds'] / l['seconds']:6.2f} {di['seconds']:5.1f}/{li['seconds']:5.1f} "
              f"{di['seconds'] / li['seconds']:6.2f}")
        if r["types_differ"]:
            print(f"         tensor types differ: {r['types_differ']}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of the process (both quantisers, evaluation): {peak:.0f} MiB")
    result = {"written_by": WRITTEN_BY, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(),
              "threads": args.threads, "windows": len(heldout), "seq_len": args.seq_len,
              "calib_windows": args.calib_samples, "llama_cpp_python": llama_cpp.__version__,
              "peak_mib": peak, "results": rows}
    atomic_write(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
