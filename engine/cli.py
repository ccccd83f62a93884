"""The ``depthcut`` command line: score, prune, retrain, eval, generate, export, bench."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .errors import DepthcutError  # noqa: E402

# One dtype vocabulary for every flag; "auto" is the device default when loading, the
# model's own dtype for the fused pass, and runtime.default_weight_dtype for the runtime.
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return getattr(torch, DTYPES[name]) if DTYPES.get(name) else None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _size(text: str) -> int:
    """'8GiB', '512MiB', '2e9' -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    low = text.strip().lower()
    for unit, mult in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * mult)
    return int(float(low))


def _add_model(p):
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder, hub name or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype when loading")


def _add_calibration(p):
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", help="text or jsonl file (default: CPython's pydoc_data.topics)")
    g.add_argument("--n-samples", type=int, default=10)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--seed", type=int, default=1234)


def _add_scoring(p):
    g = p.add_argument_group("scoring")
    g.add_argument("--backend", choices=("fused", "reference"), default="fused")
    g.add_argument("--compute-dtype", choices=sorted(DTYPES), default="auto",
                   help="precision of the fused pass (bf16 is ~3x faster on CPUs)")
    g.add_argument("--window", type=int, action="append", default=[], help="angular-distance window (repeatable)")
    g.add_argument("--max-memory", type=_size, default=None, help="memory budget of the pass, e.g. 8GiB")
    g.add_argument("--keep-first", type=int, default=4, help="'+' heuristic: first blocks never pruned")
    g.add_argument("--keep-last", type=int, default=2, help="'+' heuristic: last blocks never pruned")
    g.add_argument("--no-protect", action="store_true", help="switch the '+' heuristic off")


def torch_oom() -> type:
    import torch

    return torch.OutOfMemoryError


def build_parser() -> argparse.ArgumentParser:
    from .retrain import METHODS

    parser = argparse.ArgumentParser(prog="depthcut", description="Depth pruning of decoder LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every block on calibration text")
    _add_model(p)
    _add_calibration(p)
    _add_scoring(p)
    p.add_argument("--criteria", default="ppl,taylor,magnitude", help="from ppl,taylor,magnitude,bi,angular")
    p.add_argument("--iterative", type=int, default=0, metavar="K", help="also SLEB iterative PPL for K removals")
    p.add_argument("--out", default="scores.json", help="JSON out; the PNG chart goes beside it")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="remove blocks and save the shallower model")
    _add_model(p)
    _add_calibration(p)
    _add_scoring(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=int, help="number of blocks to remove")
    how.add_argument("--ratio", type=float, help="fraction of blocks to remove")
    how.add_argument("--blocks", help="explicit comma-separated block indices")
    p.add_argument("--criterion", default="ppl", help="ppl, taylor, magnitude, bi, angular<n> or ppl_iterative")
    p.add_argument("--scores", help="reuse a scores JSON instead of scoring")
    p.add_argument("--eval", action="store_true", help="report dense and pruned perplexity on held-apart windows")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--out", required=True, help="output folder")
    _add_gguf(p, required=False)
    p.add_argument("--retrain", choices=METHODS, help="retrain the cut model before saving (lora or full)")
    _add_training(p, prefix="retrain-")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("retrain", help="heal a cut model: LoRA or full retraining, optionally distilled")
    _add_model(p)
    p.add_argument("--method", choices=METHODS, default="lora", help="lora (merged at the end) or full (CPT)")
    _add_training(p, prefix="")
    p.add_argument("--out", required=True, help="output folder (a plain transformers model)")
    _add_gguf(p, required=False)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("export", help="write a model (e.g. a pruned folder) as a GGUF file for llama.cpp")
    _add_model(p)
    _add_gguf(p, required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="perplexity by the paper's protocol")
    _add_model(p)
    p.add_argument("--text", help="text or jsonl file (default: CPython's pydoc_data.topics)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=0, help="evaluate only the first N windows (0 = all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text; prints prefill time and decode tokens/s")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--backend", choices=("runtime", "hf"), default="runtime",
                   help="depthcut's static-cache runtime, or Hugging Face generate to compare")
    p.add_argument("--runtime-dtype", choices=sorted(DTYPES), default="auto",
                   help="runtime weight dtype; auto: fp16 on the CPU (fp32 arithmetic, half the bytes) "
                        "when the weights fit, else the model's")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="the paper's speed protocol: runtime vs HF generate, dense vs pruned")
    _add_model(p)
    p.add_argument("--shape", choices=("llama7b", "smollm2"), help="random-weight model of this shape instead")
    p.add_argument("--keep", type=int, help="blocks the pruned variant keeps (default: 80%%)")
    p.add_argument("--batch-sizes", type=_ints, help="e.g. 1,8,16 (default: SPEC grid on GPU, 1 on CPU)")
    p.add_argument("--new-tokens", type=_ints, help="e.g. 128,512")
    p.add_argument("--warmup", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--runtime-dtypes", default=None, help="comma list of runtime weight dtypes (auto,fp32,bf16,fp16; default: "
                   "auto on GPUs, fp32,fp16 on CPUs)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--out", default="bench", help="folder for speed.json and speed.png")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole job on the bundled SmolLM2: score, prune 3 ways, evaluate, "
                                    "heal the PPL-pruned model with LoRA")
    p.add_argument("--out", default="out")
    p.add_argument("--remove", type=int, default=6)
    p.add_argument("--no-heal", action="store_true", help="skip the LoRA retraining (about two minutes)")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_training(p, prefix: str):
    """Retraining flags; `prune` takes them with a "retrain-" prefix (its --seq-len and --seed
    are the calibration's)."""
    from .retrain import LOSSES

    g = p.add_argument_group("retraining")
    f = f"--{prefix}"
    g.add_argument(f"{f}data", action="append", default=[], metavar="FILE",
                   help="text, jsonl (text or chat messages) or parquet file, repeatable "
                        "(default: CPython's pydoc text, minus calibration and evaluation windows)")
    g.add_argument(f"{f}dataset", metavar="NAME[:CONFIG]", help="a Hugging Face dataset (train split, streamed)")
    g.add_argument(f"{f}seq-len", type=int, default=128, help="tokens per packed training window")
    g.add_argument(f"{f}batch-size", type=int, default=8, help="windows per process per forward")
    g.add_argument(f"{f}grad-accum", type=int, default=1, help="forwards per optimiser step")
    g.add_argument(f"{f}global-batch", type=int,
                   help="windows per optimiser step; sets --grad-accum from the batch size and process count")
    how = g.add_mutually_exclusive_group()
    how.add_argument(f"{f}tokens", type=int, help="train on this many tokens")
    how.add_argument(f"{f}steps", type=int, help="train for this many optimiser steps")
    g.add_argument(f"{f}lr", type=float, help="peak learning rate (default 1e-4, as the paper)")
    g.add_argument(f"{f}warmup", type=int, help="warm-up steps (default 5%% of the run, at most 100)")
    g.add_argument(f"{f}weight-decay", type=float, help="AdamW weight decay (default: lora 0, full 0.1)")
    g.add_argument(f"{f}max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument(f"{f}lora-rank", type=int, default=8)
    g.add_argument(f"{f}lora-alpha", type=float, default=16.0)
    g.add_argument(f"{f}lora-dropout", type=float, default=0.05)
    g.add_argument(f"{f}seed", type=int, default=1234, help="data order and adapter initialisation")
    g.add_argument(f"{f}eval-every", type=int, default=0, help="evaluate perplexity every N steps (0: at the end)")
    g.add_argument(f"{f}eval-windows", type=int, default=40, help="windows kept apart for evaluation")
    g.add_argument(f"{f}save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    g.add_argument(f"{f}resume", action="store_true", help="continue from the last checkpoint")
    g.add_argument(f"{f}save-adapter", action="store_true", help="also keep the LoRA adapter folder")
    g.add_argument(f"{f}gradient-checkpointing", action="store_true", help="recompute block activations")
    g.add_argument(f"{f}loss", choices=LOSSES, default="fused",
                   help="fused: depthcut's kernels, no logits; hf: the model's own logits (to compare)")
    g.add_argument(f"{f}distill-weight", type=float, default=0.0,
                   help="a in a*KL(teacher||student) + (1-a)*NLL; the teacher is the dense model")
    if not prefix:
        g.add_argument("--teacher", help="dense model to distil from (folder, hub name or .gguf)")


def _training_args(args, prefix: str) -> dict:
    """The retraining flags of `args` without their prefix."""
    key = prefix.replace("-", "_")
    return {name[len(key):]: value for name, value in vars(args).items() if name.startswith(key)} if key else vars(args)


def _add_gguf(p, required: bool):
    from .export_gguf import QTYPES

    p.add_argument("--gguf", required=required, metavar="OUT.gguf", help="also write a GGUF file")
    p.add_argument("--type", default="f16", choices=sorted(QTYPES), help="GGUF tensor type")


def _export(args, model, tokenizer):
    from .export_gguf import export_gguf, gguf_tokenizer_pre
    from .models import default_model_path

    source = str(args.model) if args.model else str(default_model_path())
    pre = gguf_tokenizer_pre(source) if source.endswith(".gguf") else None
    path = export_gguf(model, tokenizer, args.gguf, args.type, tokenizer_pre=pre)
    print(f"wrote {path} ({args.type}, {path.stat().st_size / 2**20:.1f} MiB)")


def _protect(args):
    from .scores import Protect

    return Protect.none() if args.no_protect else Protect(args.keep_first, args.keep_last)


def _calibration(args, tokenizer):
    from .calibration import Calibration

    return Calibration.load(tokenizer, args.calib, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)


def _load(args):
    from .models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=_dtype(args.dtype))
    print(f"loaded {model.config.model_type} with {model.config.num_hidden_layers} blocks "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tokenizer


def _score(args, model, calibration, criteria, iterative=0):
    from .scoring import score

    return score(model, calibration, criteria, backend=args.backend, windows=args.window, iterative=iterative,
                 protect=_protect(args), max_memory=args.max_memory, dtype=_dtype(args.compute_dtype))


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _print_scores(scores, protect):
    names = list(scores)
    rows = [[i] + [_fmt(scores[n][i]) if i < len(scores[n]) else "" for n in names]
            for i in range(scores.num_blocks)]
    print(_table(rows, ["block"] + names))
    for n in names:
        print(f"{n}: prune first {scores.ranking(n, protect)[:8]}")


def _fmt(v) -> str:
    return "nan" if v is None or v != v else f"{v:.5g}"


def cmd_score(args):
    model, tokenizer = _load(args)
    calibration = _calibration(args, tokenizer)
    scores = _score(args, model, calibration, args.criteria, args.iterative)
    protect = _protect(args)
    out = Path(args.out)
    scores.save_json(out, protect)
    scores.plot(out.with_suffix(".png"), protect)
    _print_scores(scores, protect)
    meta = scores.meta
    if "taylor_ppl_estimate_spearman" in meta:
        print(f"first-order PPL estimate from the Taylor backward: Spearman {meta['taylor_ppl_estimate_spearman']:.3f} "
              f"against the exact PPL criterion")
    if "iterative" in meta:
        steps = ", ".join(f"{b} ({p:.2f})" for b, p in zip(meta["iterative"]["order"], meta["iterative"]["ppl_after_each"]))
        print(f"iterative PPL removal order (perplexity after each): {steps}")
    print(f"scored {scores.num_blocks} blocks on {calibration.num_tokens} tokens in {scores.meta['seconds']:.1f} s "
          f"({scores.meta['backend']}); wrote {out} and {out.with_suffix('.png')}")


def cmd_prune(args):
    from .evaluate import perplexity
    from .pruner import blocks_for_ratio, check_ratio, prune_blocks, save_model
    from .scores import BlockScores

    if args.ratio is not None:
        check_ratio(args.ratio)  # before the slow load
    t = _training_args(args, "retrain-")
    plan = _training_plan(t, args.retrain) if args.retrain else None
    if not args.retrain:
        defaults = _training_args(build_parser().parse_args(["prune", "--remove", "1", "--out", "-"]), "retrain-")
        stray = sorted(f"--retrain-{k.replace('_', '-')}" for k, v in t.items() if v != defaults[k])
        if stray:
            raise DepthcutError(f"{', '.join(stray)} given without --retrain lora|full")
    model, tokenizer = _load(args)
    n = model.config.num_hidden_layers
    protect = _protect(args)
    calibration = None
    if args.blocks:
        try:
            blocks = sorted({int(b) for b in args.blocks.split(",") if b.strip()})
        except ValueError:
            raise DepthcutError(f"--blocks must be comma-separated integers, got '{args.blocks}'") from None
        criterion = "explicit list"
    else:
        count = args.remove if args.remove is not None else blocks_for_ratio(n, args.ratio)
        criterion = args.criterion
        if args.scores:
            scores = BlockScores.load_json(args.scores)
            if scores.num_blocks != n:
                raise DepthcutError(f"{args.scores} scores {scores.num_blocks} blocks but the model has {n}")
        else:
            calibration = _calibration(args, tokenizer)
            iterative = count if criterion == "ppl_iterative" else 0
            base = "ppl" if iterative else criterion.rstrip("0123456789")
            if base.startswith("angular"):
                args.window = [int(criterion[len("angular"):] or 1)]
            scores = _score(args, model, calibration, [base], iterative)
        blocks = scores.select(criterion, count, protect)
    heldout = None
    dense_ppl = None
    if args.eval:
        calibration = calibration or _calibration(args, tokenizer)
        heldout = calibration.heldout_ids[: args.eval_windows]
        dense_ppl = perplexity(model, heldout, progress="dense perplexity")
    teacher = copy.deepcopy(model) if args.retrain and t["distill_weight"] > 0 else None
    prune_blocks(model, blocks)
    card = {"name": f"{Path(args.out).name}", "source": args.model or "SmolLM2-135M-Instruct (bundled)",
            "num_blocks": n, "removed": blocks, "criterion": criterion,
            "protect": {"first": protect.first, "last": protect.last},
            "calibration": calibration.describe() if calibration is not None else None}
    rows = [["blocks", n, n - len(blocks)], ["removed", "", ",".join(map(str, blocks))]]
    if args.eval:
        pruned_ppl = perplexity(model, heldout, progress="pruned perplexity")
        card["perplexity"] = {"dense": dense_ppl, "pruned": pruned_ppl,
                              "text": f"{len(heldout)} held-apart windows of {calibration.source}"}
        rows.append(["perplexity", f"{dense_ppl:.2f}", f"{pruned_ppl:.2f}"])
    extra = None
    if args.retrain:
        from .retrain import write_outputs

        result = _retrain(args, t, plan, model, tokenizer, teacher, calibration)
        if not result.main_process:
            return
        model = result.model
        card["retraining"] = result.summary
        rows += [[f"{row[0]} (retraining windows)", row[1], row[2]] for row in _report_retraining(result)]
        extra = lambda d: write_outputs(result, d)  # noqa: E731
    save_model(model, tokenizer, args.out, card, extra=extra)
    print(_table(rows, ["", "dense", "pruned"]))
    print(f"removed blocks {blocks} by {criterion}; saved to {args.out}")
    if args.gguf:
        _export(args, model, tokenizer)


def _training_plan(t: dict, method: str):
    """(accelerator, RetrainConfig) from the retraining flags in `t`, checked before any slow load."""
    from .retrain import RetrainConfig, make_accelerator

    if t["tokens"] is None and t["steps"] is None:
        raise DepthcutError("say how long to retrain: --tokens N or --steps N (with the prefix under prune)")
    if t["eval_windows"] < 0:
        raise DepthcutError(f"--eval-windows must be >= 0, got {t['eval_windows']}")
    if t["seq_len"] < 2:
        raise DepthcutError(f"--seq-len must be at least 2, got {t['seq_len']}")
    if t["data"] and t["dataset"]:
        raise DepthcutError("give training data as files (--data) or a dataset (--dataset), not both")
    accelerator = make_accelerator()
    grad_accum = t["grad_accum"]
    if t["global_batch"] is not None:
        per_step = t["batch_size"] * accelerator.num_processes
        if t["global_batch"] < 1 or per_step < 1 or t["global_batch"] % per_step:
            raise DepthcutError(f"--global-batch {t['global_batch']} is not a multiple of batch size x processes "
                                f"({per_step})")
        grad_accum = t["global_batch"] // per_step
    cfg = RetrainConfig(method=method, steps=t["steps"], tokens=t["tokens"], batch_size=t["batch_size"],
                        grad_accum=grad_accum, lr=t["lr"], warmup=t["warmup"], weight_decay=t["weight_decay"],
                        max_grad_norm=t["max_grad_norm"], lora_rank=t["lora_rank"], lora_alpha=t["lora_alpha"],
                        lora_dropout=t["lora_dropout"], distill_weight=t["distill_weight"],
                        eval_every=t["eval_every"], save_every=t["save_every"], seed=t["seed"],
                        gradient_checkpointing=t["gradient_checkpointing"], loss=t["loss"])
    return accelerator, cfg


def _retrain(args, t: dict, plan, model, tokenizer, teacher=None, calibration=None):
    """Build the training data from the flags in `t` and run the planned retraining."""
    from .retrain import retrain
    from .train_data import TrainingSet, read_documents, stream_dataset

    accelerator, cfg = plan
    seq_len = t["seq_len"]
    global_batch = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    needed = cfg.total_steps(global_batch, seq_len) * global_batch
    if t["data"]:
        docs = [d for path in t["data"] for d in read_documents(path)]
        data = TrainingSet.from_documents(docs, tokenizer, seq_len, ", ".join(t["data"]), t["eval_windows"], t["seed"])
    elif t["dataset"]:
        data = TrainingSet.from_documents(stream_dataset(t["dataset"]), tokenizer, seq_len, t["dataset"],
                                          t["eval_windows"], t["seed"], max_windows=needed)
    else:
        calib = calibration.describe() if calibration is not None else {"n_samples": 10, "seed": 1234}
        data = TrainingSet.from_default_text(tokenizer, seq_len, t["eval_windows"], seed=calib["seed"],
                                             calib_samples=calib["n_samples"])
    out = Path(args.out)
    return retrain(model, data, cfg, out.with_name(out.name + ".train"), teacher=teacher, resume=t["resume"],
                   accelerator=accelerator, keep_adapter=t["save_adapter"])


def _report_retraining(result) -> list[list]:
    s = result.summary
    print(f"retrained {s['steps']} steps ({s['tokens']:,} tokens) in {s['train_seconds']} s, "
          f"{s['tokens_per_second']} tokens/s; final loss {s['final_loss']:.4f}", file=sys.stderr)
    return [["perplexity", f"{s['perplexity_before']:.2f}", f"{s['perplexity_after']:.2f}"]]


def cmd_retrain(args):
    from .models import load_model
    from .pruner import save_model
    from .retrain import write_outputs

    plan = _training_plan(_training_args(args, ""), args.method)
    if args.distill_weight > 0 and not args.teacher:
        raise DepthcutError("--distill-weight needs a teacher: --teacher DENSE_MODEL")
    model, tokenizer = _load(args)
    teacher = None
    if args.teacher:
        teacher, t_tok = load_model(args.teacher, dtype=next(model.parameters()).dtype,
                                    device=next(model.parameters()).device)
        if t_tok.get_vocab() != tokenizer.get_vocab():
            raise DepthcutError(f"the teacher's tokenizer differs from the student's: {args.teacher}")
    result = _retrain(args, _training_args(args, ""), plan, model, tokenizer, teacher)
    if not result.main_process:
        return
    card = _source_card(args.model)
    card.update(name=Path(args.out).name, retraining=result.summary)
    save_model(result.model, tokenizer, args.out, card, extra=lambda d: write_outputs(result, d))
    print(_table(_report_retraining(result), ["", "before", "after"]))
    print(f"saved to {args.out} (train_log.jsonl, loss.png, model card)")
    if args.gguf:
        _export(args, result.model, tokenizer)


def _source_card(model_spec) -> dict:
    """The depthcut card of the model being retrained (what was cut), when it has one."""
    path = Path(model_spec) / "depthcut.json" if model_spec else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return {"source": str(model_spec or "SmolLM2-135M-Instruct (bundled)")}


def cmd_export(args):
    model, tokenizer = _load(args)
    _export(args, model, tokenizer)


def cmd_eval(args):
    from .calibration import default_text, read_text, tokenize_windows
    from .evaluate import perplexity

    model, tokenizer = _load(args)
    text = read_text(args.text) if args.text else default_text()
    windows = tokenize_windows(text, tokenizer, args.seq_len)
    if args.max_windows:
        windows = windows[: args.max_windows]
    if len(windows) == 0:
        raise DepthcutError(f"text shorter than one {args.seq_len}-token window")
    t0 = time.perf_counter()
    ppl = perplexity(model, windows, progress="perplexity")
    print(json.dumps({"perplexity": ppl, "windows": len(windows), "seq_len": args.seq_len,
                      "seconds": round(time.perf_counter() - t0, 2)}))


def cmd_generate(args):
    import torch

    model, tokenizer = _load(args)
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.backend == "runtime":
        from .runtime import Runtime, default_weight_dtype

        weights = _dtype(args.runtime_dtype) or default_weight_dtype(model)
        try:
            runtime = Runtime.from_hf(model, dtype=weights)
        except ValueError as e:
            raise DepthcutError(f"{e} (use --backend hf)") from None
        generator = torch.Generator(device=ids.device).manual_seed(args.seed)
        tokens, stats = runtime.generate(ids, max_new_tokens=args.max_new_tokens, stop_token_ids=[tokenizer.eos_token_id],
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                         generator=generator, **sampling)
        new = tokens[0]
        prefill_s, decode_tok_s = stats["prefill_s"], stats["decode_tok_s"]
        label = f"runtime, {str(weights).replace('torch.', '')} weights"
    else:
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids)  # prefill alone, timed separately like llama.cpp reports it
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, **sampling)
            elapsed = time.perf_counter() - t0
        new = out[0, ids.shape[1]:]
        decode_tok_s = max(len(new) - 1, 1) / max(elapsed - prefill_s, 1e-9)
        label = "hf"
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"prefill {ids.shape[1]} tokens: {prefill_s * 1e3:.1f} ms; decode: {decode_tok_s:.1f} tok/s "
          f"({label})", file=sys.stderr)


def cmd_bench(args):
    from .runtime import default_weight_dtype
    from .speed import random_model, speed_protocol, tail_blocks

    model = random_model(args.shape) if args.shape else _load(args)[0]
    on_gpu = next(model.parameters()).device.type == "cuda"
    names = (args.runtime_dtypes or ("auto" if on_gpu else "fp32,fp16")).split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise DepthcutError(f"unknown runtime dtype {unknown}; choose from {', '.join(DTYPES)}")
    n = model.config.num_hidden_layers
    result = speed_protocol(model, tail_blocks(n, args.keep or round(0.8 * n)), batch_sizes=args.batch_sizes,
                            new_tokens=args.new_tokens, warmup=args.warmup, runs=args.runs,
                            dtypes=list(dict.fromkeys(_dtype(x) or default_weight_dtype(model) for x in names)),
                            hf=not args.no_hf, out_dir=args.out)
    print(f"\n{result['machine']}: ratios measured in this run")
    for r in result["ratios"]:
        print(f"  {r['what']:<24} {r.get('model', r.get('backend')):>12} B={r['batch']:<4} "
              f"n={r['new_tokens']:<4} {r['ratio']:6.2f}x")
    print(f"wrote {args.out}/speed.json and {args.out}/speed.png")


def cmd_demo(args):
    from .demo import HEAL, render_report, run_demo

    print(render_report(run_demo(args.out, args.remove, heal=None if args.no_heal else HEAL)))
    print(f"wrote {args.out}/: scores.json, scores.png, pruned-*/ and healed-ppl/ models, report.md")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DepthcutError as e:
        print(f"depthcut: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthcut: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, torch_oom()):
        print("depthcut: error: out of memory; lower --max-memory or --n-samples", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
