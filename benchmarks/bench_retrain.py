"""Retraining: depthcut's fused loss vs Hugging Face + peft, and recovery vs domain adaptation.

Every ratio is measured in this one run, on this machine:
  1. speed and memory: the same LoRA recipe on the same pruned model, once with the model's
     own logits and loss (Hugging Face + peft) and once with depthcut's fused head kernels,
     each in a fresh process so its peak resident memory is its own;
  2. where the time goes: the LM head alone (forward + backward), logits vs fused;
  3. recovery: the demo's LoRA recipe on the pruned model AND on the dense model. The text
     is in-domain for the evaluation, so the dense model's gain is domain adaptation; only
     the pruned model's gain beyond it is recovery.

  python benchmarks/bench_retrain.py                  # CPU, real SmolLM2 (30 blocks, PPL-pruned to 24)
  python benchmarks/bench_retrain.py --speed-steps 6 --skip-recovery
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import depthcut  # noqa: E402
from depthcut.demo import HEAL  # noqa: E402
from depthcut.ops import linear_nll_sum  # noqa: E402
from depthcut.retrain import RetrainConfig, retrain  # noqa: E402
from depthcut.speed import machine  # noqa: E402
from depthcut.train_data import TrainingSet  # noqa: E402


def pruned_smollm2(remove: int):
    """SmolLM2 fp32 on the CPU, cut by the PPL criterion on the default calibration."""
    model, tokenizer = depthcut.load_model(dtype=torch.float32, device="cpu")
    calib = depthcut.Calibration.load(tokenizer)
    blocks = depthcut.score(model, calib, ["ppl"], progress=False).select("ppl", remove)
    dense = copy.deepcopy(model)
    return dense, depthcut.prune_blocks(model, blocks), tokenizer, blocks


def worker(folder: str, loss: str, steps: int, batch: int, checkpointing: bool) -> dict:
    """One training run in this process; prints tokens/s (first step excluded) and peak RSS."""
    model, tokenizer = depthcut.load_model(folder, dtype=torch.float32, device="cpu")
    data = TrainingSet.from_default_text(tokenizer, eval_windows=1)  # the before/after perplexity costs ~nothing
    cfg = RetrainConfig(steps=steps, batch_size=batch, lr=1e-3, loss=loss, gradient_checkpointing=checkpointing)
    with tempfile.TemporaryDirectory() as run_dir:
        result = retrain(model, data, cfg, run_dir, progress=False)
    timed = [e for e in result.log if "loss" in e][1:]
    return {"loss": loss, "gradient_checkpointing": checkpointing, "steps": steps, "batch": batch,
            "tokens_per_second": round(sum(batch * data.seq_len for _ in timed) / sum(e["seconds"] for e in timed), 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "final_loss": result.log[-1]["loss"]}


def head_alone(hidden_size: int, vocab: int, tokens: int, reps: int = 5) -> dict:
    """The frozen LM head's forward + backward (LoRA): logits and cross-entropy vs the training loss's kernel."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden_size, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5
    t = torch.randint(0, vocab, (tokens,), generator=g)

    def hf():
        F.cross_entropy(h @ w.T, t, reduction="sum").backward()

    def fused():
        linear_nll_sum(h, w, t).backward()

    out = {}
    for name, fn in (("logits", hf), ("fused", fused)):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[f"{name}_ms"] = round((time.perf_counter() - t0) / reps * 1e3, 1)
    out["ratio"] = round(out["logits_ms"] / out["fused_ms"], 2)
    return out


def recovery(dense, pruned, tokenizer) -> dict:
    data = TrainingSet.from_default_text(tokenizer)
    rows = {}
    for name, model in (("pruned", pruned), ("dense", dense)):
        with tempfile.TemporaryDirectory() as run_dir:
            s = retrain(copy.deepcopy(model), data, HEAL, run_dir).summary
        rows[name] = {"ppl_before": round(s["perplexity_before"], 2), "ppl_after": round(s["perplexity_after"], 2),
                      "train_seconds": s["train_seconds"], "tokens": s["tokens"]}
    rows["pruned_after_over_dense_before"] = round(rows["pruned"]["ppl_after"] / rows["dense"]["ppl_before"], 3)
    rows["pruned_after_over_dense_after"] = round(rows["pruned"]["ppl_after"] / rows["dense"]["ppl_after"], 3)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--remove", type=int, default=6)
    p.add_argument("--speed-steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--skip-recovery", action="store_true")
    p.add_argument("--out", default="benchmarks/retrain_cpu_smollm2.json")
    p.add_argument("--worker", nargs=3, metavar=("FOLDER", "LOSS", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        folder, loss, ckpt = args.worker
        print(json.dumps(worker(folder, loss, args.speed_steps, args.batch, ckpt == "1")))
        return

    dense, pruned, tokenizer, blocks = pruned_smollm2(args.remove)
    report = {"machine": machine(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "model": f"SmolLM2-135M-Instruct fp32, blocks {blocks} removed by PPL", "speed": []}
    with tempfile.TemporaryDirectory() as tmp:
        depthcut.save_model(pruned, tokenizer, Path(tmp) / "pruned")
        for ckpt in ("0", "1"):
            for loss in ("hf", "fused"):
                cmd = [sys.executable, __file__, "--worker", str(Path(tmp) / "pruned"), loss, ckpt,
                       "--speed-steps", str(args.speed_steps), "--batch", str(args.batch)]
                row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                report["speed"].append(row)
                print(f"LoRA, {loss:>5} loss, checkpointing {ckpt}: {row['tokens_per_second']} tokens/s, "
                      f"peak RSS {row['peak_rss_gib']} GiB", flush=True)
    for ckpt in (False, True):
        hf, fused = (next(r for r in report["speed"] if r["loss"] == x and r["gradient_checkpointing"] == ckpt)
                     for x in ("hf", "fused"))
        report.setdefault("ratios", []).append({
            "gradient_checkpointing": ckpt,
            "tokens_per_second_fused_over_hf": round(fused["tokens_per_second"] / hf["tokens_per_second"], 3),
            "peak_rss_fused_over_hf": round(fused["peak_rss_gib"] / hf["peak_rss_gib"], 3)})
    cfg = pruned.config
    report["head_alone"] = head_alone(cfg.hidden_size, cfg.vocab_size, args.batch * 127)
    print(f"LM head alone ({args.batch * 127} tokens): {report['head_alone']}", flush=True)
    if not args.skip_recovery:
        report["recovery"] = recovery(dense, pruned, tokenizer)
        print(f"recovery: {report['recovery']}", flush=True)
    print(json.dumps(report["ratios"], indent=1))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
