"""Log-likelihood throughput: the depthcut lm-eval model type against lm-eval's own `hf` model.

Both score the same requests of a local multiple-choice task built here from the bundled
text (4 choices per question) with the real SmolLM2-135M (fp32, CPU), the same batch size,
each in its own process so that peak RSS is its own. Prints the ratio measured in this run,
the accuracies (which must be identical), the largest log-likelihood difference and peak RSS.

    .venv/bin/python benchmarks/bench_loglikelihood.py [--docs 100] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    match = re.search(r"model name\s*:\s*(.+)", text)
    return f"{match.group(1).strip() if match else platform.processor()}, {os.cpu_count()} cores"


def write_task(folder: Path, docs: int, seed: int = 0) -> None:
    """bench_mc: a sentence of the bundled text as the question, four phrases as the choices."""
    from depthcut import default_text

    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", default_text()) if 40 <= len(s.strip()) <= 240]
    rng = random.Random(seed)
    rows = []
    for _ in range(docs):
        question = rng.choice(sentences)
        choices = [" ".join(rng.choice(sentences).split()[: rng.randint(3, 12)]) for _ in range(4)]
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    (folder / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = "    aggregation: mean\n    higher_is_better: true\n"
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'bench.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n" + mean + "  - metric: acc_norm\n" + mean)


def run_one(runner: str, folder: Path, batch_size: int) -> dict:
    """Load SmolLM2, warm up on 4 documents, then time the whole task once."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from depthcut import load_model
    from depthcut.lm_eval_model import DepthcutLM

    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    cls = DepthcutLM if runner == "depthcut" else HFLM
    lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    def evaluate(limit=None):
        return lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, limit=limit,
                                       log_samples=True, bootstrap_iters=0)

    evaluate(limit=4)
    t0 = time.perf_counter()
    out = evaluate()
    seconds = time.perf_counter() - t0
    samples = out["samples"]["bench_mc"]
    return {"runner": runner, "seconds": seconds, "requests": sum(len(s["resps"]) for s in samples),
            "acc": out["results"]["bench_mc"]["acc,none"], "acc_norm": out["results"]["bench_mc"]["acc_norm,none"],
            "loglikelihoods": [r[0][0] for s in samples for r in s["resps"]],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runner", choices=("depthcut", "hf"), help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        print(json.dumps(run_one(args.runner, Path(args.folder), args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), args.docs)
        runs = {}
        for runner in ("hf", "depthcut"):
            proc = subprocess.run([sys.executable, __file__, "--runner", runner, "--folder", tmp,
                                   "--batch-size", str(args.batch_size)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{runner} run failed:\n{proc.stderr[-3000:]}")
            runs[runner] = json.loads(proc.stdout.strip().splitlines()[-1])
    hf, dc = runs["hf"], runs["depthcut"]
    diff = max(abs(a - b) for a, b in zip(hf["loglikelihoods"], dc["loglikelihoods"]))
    print(f"{cpu_name()}; SmolLM2-135M fp32; {hf['requests']} requests ({args.docs} questions x 4 choices), "
          f"batch size {args.batch_size}")
    for r in (hf, dc):
        print(f"  {r['runner']:<9} {r['seconds']:7.2f} s  {r['requests'] / r['seconds']:7.1f} requests/s  "
              f"acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"throughput ratio depthcut / hf: {hf['seconds'] / dc['seconds']:.2f}x; "
          f"accuracies identical: {hf['acc'] == dc['acc'] and hf['acc_norm'] == dc['acc_norm']}; "
          f"max |log-likelihood difference|: {diff:.2e}; peak RSS ratio: {dc['peak_rss_mib'] / hf['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
