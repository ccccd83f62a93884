"""The paper's comparison table: zero-shot accuracy (lm-evaluation-harness) and perplexity on
named corpora, one row per model (docs/DESIGN.md, "Zero-shot evaluation").

lm_eval is imported only here and in lm_eval_model.py, and only when a task is run, so the
command line starts fast.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from .errors import DepthcutError
from .outputs import WRITTEN_BY, atomic_write, save_chart

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ACCURACIES = ("acc_norm", "acc")  # the paper's metric where the harness reports it, else plain accuracy
# name: (dataset, config, text column, joiner), test split, as the paper's perplexity protocol
CORPORA = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", "\n\n"),
    "ptb": ("ptb-text-only/ptb_text_only", None, "sentence", " "),
}
_MAKE_AVAILABLE = ("run once with network access (HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0) to fill the Hugging Face "
                   "cache")


def parse_list(text: str, paper: tuple[str, ...] = ()) -> list[str]:
    """'a,b' -> ['a', 'b']; 'paper' -> the paper's list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    names = [x for n in names for x in (paper if paper and n == "paper" else [n])]
    if not names:
        raise DepthcutError(f"no names in '{text}'")
    return list(dict.fromkeys(names))


def harness_version() -> str:
    return version("lm-eval")


@contextmanager
def _quiet_harness():
    """lm-eval logs every step, and warns of each default it applies; a table is what was asked for."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tasks(names: list[str], include_path: str | None = None):
    """A lm-eval TaskManager after checking that every task is known and its data can be read:
    otherwise one line naming the task and how to make it available."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise DepthcutError(f"--include-path: not a folder: {include_path}")
    with _quiet_harness():
        # lm-eval's own thousands of task files take seconds to index: only when needed
        manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
        if manager is None or not all(n in manager.all_subtasks or n in manager.all_groups for n in names):
            manager = TaskManager(include_path=include_path)
        for name in names:
            if name not in manager.all_subtasks and name not in manager.all_groups:
                raise DepthcutError(f"unknown task '{name}': not an lm-eval task"
                                    + (f" nor one under {include_path}" if include_path else "; local task "
                                       "definitions (YAML) go in a folder given by --include-path"))
            try:
                manager.load([name])
            except Exception as e:  # datasets raises many types when data is neither cached nor reachable
                raise DepthcutError(f"task '{name}': its data is not available offline ({type(e).__name__}); "
                                    f"{_MAKE_AVAILABLE}, or define the task on local files with "
                                    "--include-path") from None
    return manager


def run_tasks(model, tokenizer, names: list[str], manager, limit: int | None = None, batch_size: int = 8,
              num_fewshot: int = 0) -> dict[str, dict]:
    """{task: {"metric", "value"}} for one loaded model, through the depthcut model type."""
    import lm_eval

    from .lm_eval_model import DepthcutLM

    lm = DepthcutLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _quiet_harness():
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, bootstrap_iters=0, log_samples=False)
    return {name: _headline(name, out["results"].get(name, {})) for name in names}


def _headline(task: str, metrics: dict) -> dict:
    """The paper's number of a task's results: acc_norm, else acc, else its first metric."""
    values = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
    named = [m for m in ACCURACIES if m in values] or [m for m in values if not m.endswith("_stderr")]
    if not named:
        raise DepthcutError(f"task '{task}' reported no metric")
    return {"metric": named[0], "value": float(values[named[0]])}


def corpus_text(name: str) -> tuple[str, str]:
    """(label, text) of a named corpus's test split, or of a .txt/.jsonl file."""
    from .calibration import read_text

    if name not in CORPORA:
        if not Path(name).is_file():
            raise DepthcutError(f"--ppl: '{name}' is neither a corpus ({', '.join(CORPORA)}) nor a file")
        return Path(name).name, read_text(name)
    import datasets

    path, config, column, joiner = CORPORA[name]
    datasets.logging.set_verbosity_error()
    try:
        rows = datasets.load_dataset(path, config, split="test")
    except Exception as e:  # offline and not cached: datasets' error types vary by version
        raise DepthcutError(f"--ppl {name}: the {path} test split is not available offline ({type(e).__name__}); "
                            f"{_MAKE_AVAILABLE}, or give a local .txt/.jsonl file instead") from None
    return name, joiner.join(rows[column])


def corpus_perplexity(model, tokenizer, text: str, label: str, seq_len: int, max_windows: int = 0) -> dict:
    """Perplexity by the paper's protocol (docs/DESIGN.md, "Evaluation and speed protocols")."""
    from .calibration import tokenize_windows
    from .evaluate import perplexity

    windows = tokenize_windows(text, tokenizer, seq_len)
    if max_windows:
        windows = windows[:max_windows]
    if len(windows) == 0:
        raise DepthcutError(f"{label}: shorter than one {seq_len}-token window")
    return {"metric": "perplexity", "value": perplexity(model, windows, progress=f"{label} perplexity"),
            "windows": len(windows), "seq_len": seq_len}


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, cells): a model per row, a column per task or corpus (metric named), and the
    average accuracy over the tasks when there are any."""
    columns = list(dict.fromkeys(k for r in rows for k in r["results"]))
    metric = {c: next(r["results"][c]["metric"] for r in rows if c in r["results"]) for c in columns}
    accuracy = [c for c in columns if metric[c] in ACCURACIES]
    header = ["model"] + [f"{c} ({metric[c]})" for c in columns] + (["average"] if accuracy else [])
    cells = []
    for r in rows:
        line = [r["name"]] + [_cell(r["results"].get(c)) for c in columns]
        if accuracy:
            line.append(f"{average(r, accuracy) * 100:.2f}")
        cells.append(line)
    return header, cells


def average(row: dict, columns: list[str]) -> float:
    """Mean of the row's values in these columns (those it has)."""
    values = [row["results"][c]["value"] for c in columns if c in row["results"]]
    return sum(values) / len(values) if values else math.nan


def _cell(result: dict | None) -> str:
    if result is None:
        return ""
    if result["metric"] in ACCURACIES:
        return f"{result['value'] * 100:.2f}"
    return f"{result['value']:.4g}"


def summary(rows: list[dict], **settings) -> dict:
    """Every number with the settings and the harness version: the JSON, and a model card's entry."""
    return {"harness": f"lm-eval {harness_version()}", **settings, "models": rows}


def save(path: str | Path, data: dict, force: bool = False) -> tuple[Path, Path]:
    """A summary as JSON at `path` and the grouped bar chart beside it (.png)."""
    path = Path(path)
    text = json.dumps({"written_by": WRITTEN_BY, **data}, indent=2, allow_nan=False)
    atomic_write(path, text.encode(), force=force)
    return path, plot(path.with_suffix(".png"), data["models"], force=force)


def plot(path: Path, rows: list[dict], force: bool = False) -> Path:
    """Grouped bars, one colour per model: accuracies in one panel, perplexities in another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(k for r in rows for k in r["results"]))
    panels = [(cols, label) for cols, label in (
        ([c for c in columns if _is_accuracy(rows, c)], "accuracy (%)"),
        ([c for c in columns if not _is_accuracy(rows, c)], "perplexity")) if cols]
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 0.6 * (len(columns) + 1) * len(rows)), 3.2 * len(panels)))
    width = 0.8 / len(rows)
    for ax, (cols, label) in zip(axes[:, 0], panels):
        accuracy = label.startswith("accuracy")
        names = cols + (["average"] if accuracy else [])
        for k, r in enumerate(rows):
            values = [r["results"][c]["value"] * (100 if accuracy else 1) if c in r["results"] else math.nan
                      for c in cols]
            if accuracy:
                values.append(average(r, cols) * 100)
            ax.bar([i + (k - (len(rows) - 1) / 2) * width for i in range(len(names))], values, width,
                   label=r["name"], color=f"C{k}")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel(label)
        if not accuracy:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.suptitle("depthcut eval")
    fig.tight_layout()
    return save_chart(fig, path, force=force)


def _is_accuracy(rows: list[dict], column: str) -> bool:
    return next(r["results"][column]["metric"] for r in rows if column in r["results"]) in ACCURACIES
