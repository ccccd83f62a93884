"""The ``depthcut`` command line: score, prune, retrain, eval, generate, export, bench."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .distributed import close as close_process_group, is_main  # noqa: E402
from .errors import DepthcutError  # noqa: E402

# One dtype vocabulary for every flag; "auto" is the device default when loading, the
# model's own dtype for the fused pass, and runtime.default_weight_dtype for the runtime.
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return getattr(torch, DTYPES[name]) if DTYPES.get(name) else None


def _bounded(kind, low, high=None, low_open=False, high_open=False):
    """An argparse type: a finite int or float within the bounds, so that a bad count or
    rate is one usage line naming the flag (exit 2), before anything is loaded."""
    if high is None:
        rule = f"> {low}" if low_open else f"at least {low}"
    else:
        rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: '{text}'") from None
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        if not (above and below and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


_positive_int = _bounded(int, 1)
_non_negative_int = _bounded(int, 0)
_window = _bounded(int, 2)  # tokens per window: one to predict from, one to predict
_seed = _bounded(int, 0, 2**32 - 1)
_positive = _bounded(float, 0, low_open=True)
_non_negative = _bounded(float, 0)
_fraction = _bounded(float, 0, 1)


def _int_list(low: int):
    """An argparse type: comma-separated integers, each at least ``low``, none twice."""
    item = _bounded(int, low)

    def parse(text: str) -> list[int]:
        values = [item(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"no values in '{text}'")
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"'{text}' names a value twice")
        return values

    return parse


def _size(text: str) -> int:
    """'8GiB', '512MiB', '2e9' -> bytes, at least one."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    number, mult = text.strip().lower(), 1
    for unit, unit_bytes in units.items():
        if number.endswith(unit):
            number, mult = number[: -len(unit)], unit_bytes
            break
    try:
        size = float(number) * mult
    except ValueError:
        size = math.nan
    if not (math.isfinite(size) and size >= 1):
        raise argparse.ArgumentTypeError(f"not a positive size such as 8GiB, 512MiB or 2e9: '{text}'")
    return int(size)


def _add_model(p):
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder, hub name or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype when loading")


def _add_calibration(p):
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", help="text or jsonl file (default: CPython's pydoc_data.topics)")
    g.add_argument("--n-samples", type=_positive_int, default=10)
    g.add_argument("--seq-len", type=_window, default=128)
    g.add_argument("--seed", type=_seed, default=1234)


def _add_scoring(p):
    from .models import DEVICE_MAPS
    from .scoring import ANGULAR_TOKENS

    g = p.add_argument_group("scoring")
    g.add_argument("--scorer", choices=("fused", "reference"), default="fused",
                   help="fused: every criterion in one pass; reference: the straightforward implementations")
    g.add_argument("--compute-dtype", choices=sorted(DTYPES), default="auto",
                   help="precision of the fused pass; auto: bf16 on CPUs with native bf16 (AVX512-BF16, AMX "
                        "or Arm BF16; ~1.8x faster there, several times slower where emulated), else fp32; "
                        "on a GPU the model's dtype. fp16 is GPU-only")
    g.add_argument("--window", type=_positive_int, action="append", default=[],
                   help="angular-distance window (repeatable)")
    g.add_argument("--angular-tokens", choices=ANGULAR_TOKENS, default="all",
                   help="angular distance over every token, or PruneMe's last token of each window (with the "
                        "final norm on the last block's output)")
    g.add_argument("--max-memory", type=_size, default=None, help="memory budget of the pass, e.g. 8GiB")
    g.add_argument("--offload", choices=("cpu", "disk"),
                   help="stream each block's weights in just before it runs: from the folder's safetensors (disk) "
                        "or from host memory for a GPU pass (cpu); for models larger than memory")
    g.add_argument("--device-map", choices=DEVICE_MAPS,
                   help="spread the blocks over several GPUs by accelerate's placement of that name; the walk "
                        "carries the variant stack from GPU to GPU")
    g.add_argument("--keep-first", type=_non_negative_int, default=4, help="'+' heuristic: first blocks never pruned")
    g.add_argument("--keep-last", type=_non_negative_int, default=2, help="'+' heuristic: last blocks never pruned")
    g.add_argument("--no-protect", action="store_true", help="switch the '+' heuristic off")


def torch_oom() -> type:
    import torch

    return torch.OutOfMemoryError


def build_parser() -> argparse.ArgumentParser:
    from .retrain import METHODS
    from .zero_shot import PAPER_TASKS

    parser = argparse.ArgumentParser(prog="depthcut", description="Depth pruning of decoder LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every block on calibration text")
    _add_model(p)
    _add_calibration(p)
    _add_scoring(p)
    p.add_argument("--criteria", default="ppl,taylor,magnitude", help="from ppl,taylor,magnitude,bi,angular")
    p.add_argument("--iterative", type=_non_negative_int, default=0, metavar="K",
                   help="also SLEB iterative PPL for K removals")
    p.add_argument("--out", default="scores.json", help="JSON out; the PNG chart goes beside it")
    _add_force(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="remove blocks and save the shallower model")
    _add_model(p)
    _add_calibration(p)
    _add_scoring(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=_positive_int, help="number of blocks to remove")
    how.add_argument("--ratio", type=float, help="fraction of blocks to remove")
    how.add_argument("--blocks", type=_int_list(0), help="explicit comma-separated block indices")
    p.add_argument("--criterion", default="ppl", help="ppl, taylor, magnitude, bi, angular<n> or ppl_iterative")
    p.add_argument("--scores", help="reuse a scores JSON instead of scoring")
    p.add_argument("--eval", action="store_true", help="report dense and pruned perplexity on held-apart windows")
    p.add_argument("--eval-windows", type=_positive_int, default=40)
    _add_eval_tasks(p)
    p.add_argument("--out", required=True, help="output folder")
    _add_gguf(p, required=False)
    p.add_argument("--retrain", choices=METHODS, help="retrain the cut model before saving (lora or full)")
    _add_training(p, prefix="retrain-")
    _add_force(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("retrain", help="heal a cut model: LoRA or full retraining, optionally distilled")
    _add_model(p)
    p.add_argument("--method", choices=METHODS, default="lora", help="lora (merged at the end) or full (CPT)")
    _add_training(p, prefix="")
    p.add_argument("--out", required=True, help="output folder (a plain transformers model)")
    _add_eval_tasks(p)
    _add_gguf(p, required=False)
    _add_force(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("export", help="write a model (e.g. a pruned folder) as a GGUF file for llama.cpp")
    _add_model(p)
    _add_gguf(p, required=True)
    p.add_argument("--offload", choices=("disk",), help="read one block at a time from the folder's safetensors "
                                                       "(a model larger than memory)")
    _add_force(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("imatrix", help="importance matrix (mean x^2 per input channel) for K-quant GGUF exports "
                                       "and llama-quantize --imatrix")
    _add_model(p)
    _add_calibration(p)
    p.add_argument("--out", required=True, metavar="FILE", help="llama.cpp's GGUF imatrix format (.dat: legacy)")
    _add_force(p)
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("eval", help="perplexity by the paper's protocol; zero-shot accuracy with --tasks")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="HF folders, hub names or .gguf files, a table row each "
                        "(default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype when loading")
    p.add_argument("--text", help="text or jsonl file (default: CPython's pydoc_data.topics); without --tasks/--ppl")
    p.add_argument("--seq-len", type=_window, default=128, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=_non_negative_int, default=0,
                   help="evaluate only the first N windows (0 = all)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated; 'paper': " + ",".join(PAPER_TASKS))
    p.add_argument("--ppl", help="perplexity corpora, comma-separated: wikitext2, ptb or .txt/.jsonl files")
    p.add_argument("--limit", type=_positive_int, help="at most N documents per task")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="requests per forward")
    p.add_argument("--num-fewshot", type=_non_negative_int, default=0)
    p.add_argument("--include-path", metavar="FOLDER", help="folder of local lm-eval task definitions (YAML)")
    p.add_argument("--out", default="eval.json", help="with --tasks/--ppl: JSON out; the PNG chart goes beside it")
    _add_force(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text; prints prefill time and decode tokens/s")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--runner", choices=("runtime", "hf"), default="runtime",
                   help="depthcut's static-cache runtime, or Hugging Face generate to compare")
    p.add_argument("--runtime-dtype", choices=sorted(DTYPES), default="auto",
                   help="runtime weight dtype; auto: fp16 on the CPU (fp32 arithmetic, half the bytes) "
                        "when the weights fit, else the model's")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="the paper's speed protocol: runtime vs HF generate, dense vs pruned")
    _add_model(p)
    p.add_argument("--shape", choices=("llama7b", "smollm2"), help="random-weight model of this shape instead")
    p.add_argument("--keep", type=_positive_int, help="blocks the pruned variant keeps (default: 80%%)")
    p.add_argument("--batch-sizes", type=_int_list(1), help="e.g. 1,8,16 (default: 1,8,16,32,64,128,256 on GPU, 1 on CPU)")
    p.add_argument("--new-tokens", type=_int_list(1), help="e.g. 128,512")
    p.add_argument("--warmup", type=_non_negative_int)
    p.add_argument("--runs", type=_positive_int)
    p.add_argument("--runtime-dtypes", default=None, help="comma list of runtime weight dtypes (auto,fp32,bf16,fp16; default: "
                   "auto on GPUs, fp32,fp16 on CPUs)")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    p.add_argument("--out", default="bench", help="folder for speed.json and speed.png")
    _add_force(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole job on the bundled SmolLM2: score, prune 3 ways, evaluate, "
                                    "heal the PPL-pruned model with LoRA")
    p.add_argument("--out", default="out")
    p.add_argument("--remove", type=_positive_int, default=6)
    p.add_argument("--no-heal", action="store_true", help="skip the LoRA retraining (about two minutes)")
    _add_force(p)
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
    g.add_argument(f"{f}seq-len", type=_window, default=128, help="tokens per packed training window")
    g.add_argument(f"{f}batch-size", type=_positive_int, default=8, help="windows per process per forward")
    g.add_argument(f"{f}grad-accum", type=_positive_int, default=1, help="forwards per optimiser step")
    g.add_argument(f"{f}global-batch", type=_positive_int,
                   help="windows per optimiser step; sets --grad-accum from the batch size and process count")
    how = g.add_mutually_exclusive_group()
    how.add_argument(f"{f}tokens", type=_positive_int, help="train on this many tokens")
    how.add_argument(f"{f}steps", type=_positive_int, help="train for this many optimiser steps")
    g.add_argument(f"{f}lr", type=_positive, help="peak learning rate (default 1e-4, as the paper)")
    g.add_argument(f"{f}warmup", type=_non_negative_int, help="warm-up steps (default 5%% of the run, at most 100)")
    g.add_argument(f"{f}weight-decay", type=_non_negative, help="AdamW weight decay (default: lora 0, full 0.1)")
    g.add_argument(f"{f}max-grad-norm", type=_non_negative, default=1.0, help="gradient clipping (0: off)")
    g.add_argument(f"{f}lora-rank", type=_positive_int, default=8)
    g.add_argument(f"{f}lora-alpha", type=_positive, default=16.0)
    g.add_argument(f"{f}lora-dropout", type=_bounded(float, 0, 1, high_open=True), default=0.05)
    g.add_argument(f"{f}seed", type=_seed, default=1234, help="data order and adapter initialisation")
    g.add_argument(f"{f}eval-every", type=_non_negative_int, default=0,
                   help="evaluate perplexity every N steps (0: at the end)")
    g.add_argument(f"{f}eval-windows", type=_non_negative_int, default=40, help="windows kept apart for evaluation")
    g.add_argument(f"{f}save-every", type=_non_negative_int, default=0, help="checkpoint every N steps (0: never)")
    g.add_argument(f"{f}resume", action="store_true", help="continue from the last checkpoint")
    g.add_argument(f"{f}save-adapter", action="store_true", help="also keep the LoRA adapter folder")
    g.add_argument(f"{f}gradient-checkpointing", action="store_true", help="recompute block activations")
    g.add_argument(f"{f}loss", choices=LOSSES, default="fused",
                   help="fused: depthcut's kernels, no logits; hf: the model's own logits (to compare)")
    g.add_argument(f"{f}distill-weight", type=_fraction, default=0.0,
                   help="a in a*KL(teacher||student) + (1-a)*NLL; the teacher is the dense model")
    if not prefix:
        g.add_argument("--teacher", help="dense model to distil from (folder, hub name or .gguf)")


def _training_args(args, prefix: str) -> dict:
    """The retraining flags of `args` without their prefix."""
    key = prefix.replace("-", "_")
    return {name[len(key):]: value for name, value in vars(args).items() if name.startswith(key)} if key else vars(args)


def _add_force(p):
    p.add_argument("--force", action="store_true",
                   help="replace outputs depthcut did not write (a folder's other files are deleted)")


def _check_outputs(args, folders=(), files=(), inputs=()) -> None:
    """Before any slow work: every output may be written without losing anything, and no two
    outputs, or an output and an input, are the same path (see docs/DESIGN.md, "Safety")."""
    from .outputs import check_output

    if getattr(args, "gguf", None):
        from .gguf_tokenizer import require_gguf

        require_gguf()

    given = [p for p in inputs if p is not None]
    outs = [(check_output(p, folder=True, inputs=given, force=args.force), True) for p in folders if p is not None]
    outs += [(check_output(p, folder=False, inputs=given, force=args.force), False) for p in files if p is not None]
    for i, (a, _) in enumerate(outs):
        for b, b_folder in outs[i + 1:] + outs[:i]:
            if a == b or (b_folder and b in a.parents):
                raise DepthcutError(f"outputs collide: {a} and {b}; give them separate paths")


def _check_precision(args, training_loss: str | None = None) -> None:
    """Precisions this machine cannot run, refused before the slow load."""
    import torch

    from .models import compute_dtype, default_device
    from .retrain import check_training_dtype

    device = default_device()
    if getattr(args, "compute_dtype", None):
        compute_dtype(device, torch.float32, _dtype(args.compute_dtype))
    if training_loss:
        check_training_dtype(torch.empty(0, device=device, dtype=_dtype(args.dtype) or torch.float32), training_loss)


def _run_dir(out) -> Path:
    """Where retraining keeps its checkpoints and live log: beside the output folder."""
    out = Path(out)
    return out.with_name(out.name + ".train")


def _add_gguf(p, required: bool):
    from .export_gguf import QTYPES

    p.add_argument("--gguf", required=required, metavar="OUT.gguf", help="also write a GGUF file")
    p.add_argument("--type", default="f16", choices=QTYPES, help="GGUF tensor type, or a K-quant mix (q4_k_m ...)")
    p.add_argument("--imatrix", metavar="FILE", type=_existing_file, help="importance matrix (depthcut imatrix or "
                                                                         "llama.cpp's) weighting the quantisation error")


def _existing_file(text: str) -> str:
    """Checked when parsing, so that a mistyped path fails before the model loads."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _export(args, model, tokenizer, imatrix=None):
    from collections import Counter

    from .export_gguf import export_gguf, tensor_types
    from .gguf_tokenizer import gguf_tokenizer_pre
    from .models import default_model_path

    source = str(args.model) if args.model else str(default_model_path())
    pre = gguf_tokenizer_pre(source) if source.endswith(".gguf") else None
    path = export_gguf(model, tokenizer, args.gguf, args.type, tokenizer_pre=pre, force=args.force,
                       imatrix=imatrix if imatrix is not None else args.imatrix)
    counts = Counter(tensor_types(path).values())
    print(f"wrote {path} ({args.type}, {path.stat().st_size / 2**20:.1f} MiB; tensors: "
          f"{', '.join(f'{n} {t.lower()}' for t, n in counts.most_common())})")


def _protect(args):
    from .scores import Protect

    return Protect.none() if args.no_protect else Protect(args.keep_first, args.keep_last)


def _calibration(args, tokenizer):
    from .calibration import Calibration

    return Calibration.load(tokenizer, args.calib, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)


def _load(args):
    from .models import load_model

    t0 = time.perf_counter()
    offload, device_map = getattr(args, "offload", None), getattr(args, "device_map", None)
    if offload and device_map:
        raise DepthcutError("--offload and --device-map exclude each other: stream the blocks through one device, "
                            "or spread them over several")
    if offload or device_map:
        from .models import compute_dtype, default_device, default_dtype
        from .offload import load_streamed

        device = default_device()  # loaded in the pass's dtype: a streamed or spread model is never copied
        dtype = _dtype(args.dtype)
        if dtype is None and hasattr(args, "compute_dtype"):  # export has no pass: load_streamed's default
            dtype = compute_dtype(device, default_dtype(device), _dtype(args.compute_dtype))[0]
        if offload:
            model, tokenizer = load_streamed(args.model, offload, dtype=dtype, device=device)
        else:
            model, tokenizer = load_model(args.model, dtype=dtype, device_map=device_map)
    else:
        model, tokenizer = load_model(args.model, dtype=_dtype(args.dtype))
    print(f"loaded {model.config.model_type} with {model.config.num_hidden_layers} blocks "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tokenizer


def _score(args, model, calibration, criteria, iterative=0, importance=False):
    from .scoring import parse_criteria, score

    if args.offload:
        from .offload import check_streaming_fits

        wanted = set(parse_criteria(criteria)) | ({"ppl"} if iterative else set())
        print(check_streaming_fits(model, args.seq_len, wanted), file=sys.stderr)
    n = model.config.num_hidden_layers
    if not _protect(args).allowed(n):
        raise DepthcutError(f"--keep-first {args.keep_first} and --keep-last {args.keep_last} protect all {n} blocks; "
                            "nothing could be pruned")
    return score(model, calibration, criteria, scorer=args.scorer, windows=args.window, iterative=iterative,
                 protect=_protect(args), max_memory=args.max_memory, dtype=_dtype(args.compute_dtype),
                 angular_tokens=args.angular_tokens, progress=is_main(), importance=importance)


def _join_ranks(args) -> None:
    """Under torchrun, scoring splits the calibration windows over the processes
    (docs/DESIGN.md, "Several processes and nodes"); what follows scoring runs on rank 0."""
    from .distributed import init, launched
    from .models import default_device

    if not launched():
        return
    if args.scorer == "reference":
        raise DepthcutError("--scorer reference runs in one process; under torchrun use the fused scorer")
    if getattr(args, "retrain", None):
        raise DepthcutError("prune --retrain under torchrun: prune first, then run depthcut retrain on the folder")
    init(default_device())


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
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        raise DepthcutError(f"--out names the scores JSON; the chart goes beside it ({out.with_suffix('.json')} "
                            f"and {out})")
    _check_outputs(args, files=[out, out.with_suffix(".png")], inputs=[args.model, args.calib])
    _check_precision(args)
    _join_ranks(args)
    model, tokenizer = _load(args)
    calibration = _calibration(args, tokenizer)
    scores = _score(args, model, calibration, args.criteria, args.iterative)
    if not is_main():
        return  # under torchrun every rank scored its share; rank 0 writes
    protect = _protect(args)
    scores.save_json(out, protect, force=args.force)
    scores.plot(out.with_suffix(".png"), protect, force=args.force)
    _print_scores(scores, protect)
    meta = scores.meta
    if "taylor_ppl_estimate_spearman" in meta:
        print(f"first-order PPL estimate from the Taylor backward: Spearman {meta['taylor_ppl_estimate_spearman']:.3f} "
              f"against the exact PPL criterion")
    if "iterative" in meta:
        steps = ", ".join(f"{b} ({p:.2f})" for b, p in zip(meta["iterative"]["order"], meta["iterative"]["ppl_after_each"]))
        print(f"iterative PPL removal order (perplexity after each): {steps}")
    print(f"scored {scores.num_blocks} blocks on {calibration.num_tokens} tokens in {scores.meta['seconds']:.1f} s "
          f"({meta['scorer']}{'; ' + meta['compute_dtype'] if 'compute_dtype' in meta else ''}); "
          f"wrote {out} and {out.with_suffix('.png')}")


def cmd_prune(args):
    from .evaluate import perplexity
    from .gguf_mixes import K_MIXES
    from .pruner import blocks_for_ratio, check_ratio, prune_blocks, save_model
    from .scores import BlockScores, window_width

    if args.ratio is not None:
        check_ratio(args.ratio)  # before the slow load
    if args.offload:
        given = [flag for flag, on in (("--eval", args.eval), ("--eval-tasks", args.eval_tasks),
                                       ("--retrain", args.retrain)) if on]
        if given:
            raise DepthcutError(f"{', '.join(given)} with --offload: these need the whole model in memory; prune "
                                "and save first, then run them on the saved folder")
    if args.device_map and args.retrain:
        raise DepthcutError("--retrain with --device-map: retraining runs on one device; prune and save first, "
                            "then retrain the saved folder")
    t = _training_args(args, "retrain-")
    plan = _training_plan(t, args.retrain) if args.retrain else None
    if not args.retrain:
        defaults = _training_args(build_parser().parse_args(["prune", "--remove", "1", "--out", "-"]), "retrain-")
        stray = sorted(f"--retrain-{k.replace('_', '-')}" for k, v in t.items() if v != defaults[k])
        if stray:
            raise DepthcutError(f"{', '.join(stray)} given without --retrain lora|full")
    _check_outputs(args, folders=[args.out, _run_dir(args.out) if args.retrain else None], files=[args.gguf],
                   inputs=[args.model, args.calib, args.scores, args.imatrix, *t["data"]])
    _check_precision(args, t["loss"] if args.retrain else None)
    tasks = _load_eval_tasks(args.eval_tasks, args.eval_include_path)  # an unavailable task fails before the load
    _join_ranks(args)
    model, tokenizer = _load(args)
    n = model.config.num_hidden_layers
    protect = _protect(args)
    calibration = scores = None
    if args.blocks:
        blocks = sorted(args.blocks)
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
                args.window = [window_width(criterion)]
            pass_importance = bool(args.gguf) and args.type in K_MIXES and not args.imatrix
            scores = _score(args, model, calibration, [base], iterative, importance=pass_importance)
        blocks = scores.select(criterion, count, protect)
    if not is_main():
        return  # under torchrun every rank scored its share; rank 0 cuts, evaluates and writes
    heldout = None
    dense_ppl = None
    if args.eval:
        calibration = calibration or _calibration(args, tokenizer)
        heldout = calibration.heldout_ids[: args.eval_windows]
        dense_ppl = perplexity(model, heldout, progress="dense perplexity")
    dense_zero_shot = _zero_shot(tasks, model, tokenizer, args.eval_limit, args.eval_batch_size)
    teacher = copy.deepcopy(model) if args.retrain and t["distill_weight"] > 0 else None
    imatrix = None  # the dense model's importance, renumbered for the pruned one
    if args.gguf and args.imatrix:
        from .imatrix import Imatrix

        imatrix = Imatrix.load(args.imatrix).for_pruned(blocks)
    elif args.gguf and args.type in K_MIXES:
        from .imatrix import collect_imatrix

        calibration = calibration or _calibration(args, tokenizer)
        imatrix = scores.importance if scores is not None else None  # collected by the scoring pass
        if imatrix is None:  # no pass ran (--blocks, --scores, magnitude): one forward on the calibration
            imatrix = collect_imatrix(model, calibration.input_ids, dataset=calibration.source)
        else:
            imatrix.datasets = [calibration.source]
        imatrix = imatrix.for_pruned(blocks)
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
    if tasks:
        label = "pruned" + (f"+{args.retrain}" if args.retrain else "")
        card["zero_shot"] = _before_after(args, tasks, ("dense", label), dense_zero_shot, model, tokenizer)
    save_model(model, tokenizer, args.out, card, extra=extra, force=args.force)
    print(_table(rows, ["", "dense", "pruned"]))
    print(f"removed blocks {blocks} by {criterion}; saved to {args.out}")
    if args.gguf:
        _export(args, model, tokenizer, imatrix)


def _training_plan(t: dict, method: str):
    """(accelerator, RetrainConfig) from the retraining flags in `t`, checked before any slow load
    (each flag's own range by its argparse type, their combinations here)."""
    from .retrain import RetrainConfig, make_accelerator

    if t["tokens"] is None and t["steps"] is None:
        raise DepthcutError("say how long to retrain: --tokens N or --steps N (with the prefix under prune)")
    if t["data"] and t["dataset"]:
        raise DepthcutError("give training data as files (--data) or a dataset (--dataset), not both")
    accelerator = make_accelerator()
    grad_accum = t["grad_accum"]
    if t["global_batch"] is not None:
        per_step = t["batch_size"] * accelerator.num_processes
        if t["global_batch"] % per_step:
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
    return retrain(model, data, cfg, _run_dir(args.out), teacher=teacher, resume=t["resume"],
                   accelerator=accelerator, keep_adapter=t["save_adapter"], force=args.force)


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
    _check_outputs(args, folders=[args.out, _run_dir(args.out)], files=[args.gguf],
                   inputs=[args.model, args.teacher, args.imatrix, *args.data])
    _check_precision(args, args.loss)
    tasks = _load_eval_tasks(args.eval_tasks, args.eval_include_path)
    model, tokenizer = _load(args)
    teacher = None
    if args.teacher:
        teacher, t_tok = load_model(args.teacher, dtype=next(model.parameters()).dtype,
                                    device=next(model.parameters()).device)
        if t_tok.get_vocab() != tokenizer.get_vocab():
            raise DepthcutError(f"the teacher's tokenizer differs from the student's: {args.teacher}")
    before = _zero_shot(tasks, model, tokenizer, args.eval_limit, args.eval_batch_size)
    result = _retrain(args, _training_args(args, ""), plan, model, tokenizer, teacher)
    if not result.main_process:
        return
    card = _source_card(args.model)
    card.update(name=Path(args.out).name, retraining=result.summary)
    if tasks:
        card["zero_shot"] = _before_after(args, tasks, ("before", "after"), before, result.model, tokenizer)
    save_model(result.model, tokenizer, args.out, card, extra=lambda d: write_outputs(result, d), force=args.force)
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
    _check_outputs(args, files=[args.gguf], inputs=[args.model, args.imatrix])
    model, tokenizer = _load(args)
    _export(args, model, tokenizer)


def cmd_imatrix(args):
    from .gguf_tokenizer import require_gguf
    from .imatrix import collect_imatrix

    require_gguf()
    _check_outputs(args, files=[args.out], inputs=[args.model, args.calib])
    model, tokenizer = _load(args)
    calibration = _calibration(args, tokenizer)
    t0 = time.perf_counter()
    imatrix = collect_imatrix(model, calibration.input_ids, dataset=calibration.source)
    imatrix.save(args.out, force=args.force)
    print(f"wrote {args.out}: Σx² of {len(imatrix.sums)} linear layers over {calibration.num_tokens} tokens "
          f"({calibration.source}) in {time.perf_counter() - t0:.1f} s")


def cmd_eval(args):
    if args.tasks or args.ppl:
        return _eval_table(args)
    if len(args.models) > 1:
        raise DepthcutError("several models are compared with --tasks and/or --ppl")
    from .calibration import default_text, read_text, tokenize_windows
    from .evaluate import perplexity

    args.model = args.models[0] if args.models else None
    text = read_text(args.text) if args.text else default_text()  # a bad file fails before the slow load
    model, tokenizer = _load(args)
    windows = tokenize_windows(text, tokenizer, args.seq_len)
    if args.max_windows:
        windows = windows[: args.max_windows]
    if len(windows) == 0:
        raise DepthcutError(f"text shorter than one {args.seq_len}-token window")
    t0 = time.perf_counter()
    ppl = perplexity(model, windows, progress="perplexity")
    print(json.dumps({"perplexity": ppl, "windows": len(windows), "seq_len": args.seq_len,
                      "seconds": round(time.perf_counter() - t0, 2)}))


def _eval_table(args):
    """Zero-shot accuracy and perplexity of every model, as the paper's table, JSON and chart."""
    from .zero_shot import corpus_perplexity, corpus_text, parse_list, save, summary

    if args.text:
        raise DepthcutError("--text is the plain perplexity run; with --tasks give text files to --ppl")
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        raise DepthcutError(f"--out names the JSON; the chart goes beside it ({out.with_suffix('.json')} and {out})")
    _check_outputs(args, files=[out, out.with_suffix(".png")], inputs=args.models)
    # data first: an unavailable task or corpus is one line before any model loads
    tasks = _load_eval_tasks(args.tasks, args.include_path)
    corpora = [corpus_text(name) for name in parse_list(args.ppl)] if args.ppl else []
    rows = []
    for spec in args.models or [None]:
        args.model = spec
        model, tokenizer = _load(args)
        results = _zero_shot(tasks, model, tokenizer, args.limit, args.batch_size, args.num_fewshot)
        for label, text in corpora:
            results[label] = corpus_perplexity(model, tokenizer, text, label, args.seq_len, args.max_windows)
        rows.append({"name": Path(spec).name if spec else "SmolLM2-135M-Instruct", "source": spec or "bundled",
                     "results": results})
        del model
    _print_zero_shot(rows)
    data = summary(rows, tasks=tasks[0] if tasks else [], num_fewshot=args.num_fewshot, limit=args.limit,
                   ppl_seq_len=args.seq_len)
    json_path, png = save(out, data, force=args.force)
    print(f"wrote {json_path} and {png}")


def _load_eval_tasks(text, include_path):
    """(task names, lm-eval task manager), or None without tasks."""
    if not text:
        return None
    from .zero_shot import PAPER_TASKS, load_tasks, parse_list

    names = parse_list(text, PAPER_TASKS)
    return names, load_tasks(names, include_path)


def _zero_shot(tasks, model, tokenizer, limit, batch_size, num_fewshot=0) -> dict:
    from .zero_shot import run_tasks

    return run_tasks(model, tokenizer, tasks[0], tasks[1], limit, batch_size, num_fewshot) if tasks else {}


def _print_zero_shot(rows: list[dict]) -> None:
    from .zero_shot import table

    header, cells = table(rows)
    print(_table(cells, header))


def _add_eval_tasks(p):
    g = p.add_argument_group("zero-shot accuracy before and after (lm-evaluation-harness)")
    g.add_argument("--eval-tasks", metavar="LIST", help="lm-eval tasks, comma-separated, or 'paper'")
    g.add_argument("--eval-limit", type=_positive_int, help="at most N documents per task")
    g.add_argument("--eval-batch-size", type=_positive_int, default=8, help="requests per forward")
    g.add_argument("--eval-include-path", metavar="FOLDER", help="folder of local lm-eval task definitions (YAML)")


def _before_after(args, tasks, labels, before, model, tokenizer) -> dict:
    """Print the before/after zero-shot table; return the model card's entry."""
    from .zero_shot import summary

    after = _zero_shot(tasks, model, tokenizer, args.eval_limit, args.eval_batch_size)
    rows = [{"name": labels[0], "results": before}, {"name": labels[1], "results": after}]
    _print_zero_shot(rows)
    return summary(rows, tasks=tasks[0], num_fewshot=0, limit=args.eval_limit)


class _TokenClock:
    """A ``generate`` streamer that notes when each step's tokens arrive (its first call brings
    the prompt): the time to the first new token, and the decode rate of the rest after it."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, tokens):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def cmd_generate(args):
    import torch

    from .models import check_context
    from .runtime import check_generation

    if not args.prompt:
        raise DepthcutError("--prompt is empty")
    check_generation(args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p)
    model, tokenizer = _load(args)
    text = args.prompt
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DepthcutError("--chat: the model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    check_context(model.config, ids.shape[1] + args.max_new_tokens,
                  f"{ids.shape[1]} prompt tokens and --max-new-tokens {args.max_new_tokens}")
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.runner == "runtime":
        from .runtime import Runtime, default_weight_dtype

        weights = _dtype(args.runtime_dtype) or default_weight_dtype(model)
        try:
            runtime = Runtime.from_hf(model, dtype=weights)
        except ValueError as e:
            raise DepthcutError(f"{e} (use --runner hf)") from None
        generator = torch.Generator(device=ids.device).manual_seed(args.seed)
        eos = tokenizer.eos_token_id
        tokens, stats = runtime.generate(ids, max_new_tokens=args.max_new_tokens,
                                         stop_token_ids=None if eos is None else [eos],
                                         pad_token_id=tokenizer.pad_token_id or eos, generator=generator, **sampling)
        new = tokens[0]
        prefill_s, decode_tok_s = stats["prefill_s"], stats["decode_tok_s"]
        label = f"runtime, {str(weights).replace('torch.', '')} weights"
    else:
        clock = _TokenClock()
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=clock, **sampling)
        new = out[0, ids.shape[1]:]
        first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, handed over before the prefill
        prefill_s, steps = first - t0, len(clock.times) - 2
        decode_tok_s = steps / (last - first) if steps and last > first else math.nan
        label = "hf"
    decode = f"{decode_tok_s:.1f} tok/s" if math.isfinite(decode_tok_s) else "n/a, a single new token"
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"prefill {ids.shape[1]} tokens: {prefill_s * 1e3:.1f} ms; decode: {decode} ({label})", file=sys.stderr)


def cmd_bench(args):
    from .runtime import default_weight_dtype
    from .speed import random_model, speed_protocol, tail_blocks

    if args.shape and args.model:
        raise DepthcutError("give a MODEL or --shape, not both")
    _check_outputs(args, folders=[args.out], inputs=[args.model])
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
                            hf=not args.no_hf, out_dir=args.out, force=args.force)
    print(f"\n{result['machine']}: ratios measured in this run")
    for r in result["ratios"]:
        print(f"  {r['what']:<24} {r.get('model', r.get('runner')):>12} B={r['batch']:<4} "
              f"n={r['new_tokens']:<4} {r['ratio']:6.2f}x")
    print(f"wrote {args.out}/speed.json and {args.out}/speed.png")


def cmd_demo(args):
    from .demo import HEAL, render_report, run_demo

    _check_outputs(args, folders=[args.out])
    print(render_report(run_demo(args.out, args.remove, heal=None if args.no_heal else HEAL, force=args.force)))
    print(f"wrote {args.out}/: scores.json, scores.png, pruned-*/ and healed-ppl/ models, report.md")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next runs so that it unwinds like Ctrl-C: temporary
    outputs are removed and nothing half-written is left."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args.func(args)
    except DepthcutError as e:
        print(f"depthcut: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"depthcut: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (MemoryError, torch_oom()):
        print("depthcut: error: out of memory; lower --max-memory or --n-samples", file=sys.stderr)
        return 3
    except OSError as e:  # a full disk, a read-only or vanished folder: the system's words and the path
        where = f": {e.filename}" if e.filename else ""
        print(f"depthcut: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
