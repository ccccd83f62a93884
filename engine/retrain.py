"""Healing a cut model: LoRA or full-parameter retraining, optionally distilled from the dense model.

Our own loop on ``accelerate`` rather than transformers' ``Trainer``: the loss is computed
from the final hidden states through depthcut's fused head kernels (the [tokens x vocab]
logits are never held), the teacher runs beside the student, and resuming must restore
data position and RNG exactly. The same code runs on one CPU, one GPU, or under
``torchrun``/``accelerate launch`` with DDP (FSDP through accelerate's config); the global
batch is ``batch_size x grad_accum x processes``. docs/DESIGN.md, "Retraining", says why.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import check_token_ids, model_limits
from .errors import DepthcutError
from .evaluate import perplexity
from .ops import linear_kl, linear_nll_sum
from .models import ModelAdapter
from .outputs import atomic_path, atomic_write, working_folder
from .train_data import IGNORE_INDEX, TrainingSet

# The paper's recipes: LoRA as Alpaca-LoRA sets it, full retraining as its continued pretraining.
METHOD_DEFAULTS = {
    "lora": {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0},
    "full": {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1},
}
METHODS = tuple(METHOD_DEFAULTS)
LOSSES = ("fused", "hf")
_CKPT = re.compile(r"^step-(\d{8})$")
RUN_DIR_ENTRIES = ("checkpoints", "train_log.jsonl", "adapter")  # what retrain() keeps in its run folder


@dataclass
class RetrainConfig:
    """The whole recipe; it is recorded in the model card and checked when resuming."""

    method: str = "lora"
    steps: int | None = None  # optimiser steps; or derived from `tokens`
    tokens: int | None = None
    batch_size: int = 8  # windows per process per forward
    grad_accum: int = 1
    lr: float | None = None  # None: the method's default
    warmup: int | None = None  # steps; None: 5 % of the run, at most 100
    weight_decay: float | None = None
    max_grad_norm: float = 1.0  # 0: no clipping
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    distill_weight: float = 0.0  # a in a * KL(teacher || student) + (1 - a) * NLL
    eval_every: int = 0
    save_every: int = 0
    seed: int = 1234
    gradient_checkpointing: bool = False
    loss: str = "fused"  # "hf": the model's own logits and loss (the baseline the benchmark compares)

    def __post_init__(self):
        defaults = METHOD_DEFAULTS.get(self.method)
        if defaults is None:
            raise DepthcutError(f"unknown retraining method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.loss not in LOSSES:
            raise DepthcutError(f"unknown loss implementation '{self.loss}'; choose from {', '.join(LOSSES)}")
        self.lr = defaults["lr"] if self.lr is None else self.lr
        self.weight_decay = defaults["weight_decay"] if self.weight_decay is None else self.weight_decay
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}"),
            ((self.steps is None) != (self.tokens is None), "give exactly one of --steps and --tokens"),
            (self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
            (self.tokens is None or self.tokens >= 1, f"--tokens must be at least 1, got {self.tokens}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}"),
            (self.lora_rank >= 1, f"--lora-rank must be at least 1, got {self.lora_rank}"),
            (self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (0 <= self.distill_weight <= 1, f"--distill-weight must be in [0, 1], got {self.distill_weight}"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every and --save-every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise DepthcutError(message)

    def total_steps(self, global_batch: int, seq_len: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(self.tokens / (global_batch * seq_len)))

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else min(100, total // 20)

    def betas(self) -> tuple[float, float]:
        return METHOD_DEFAULTS[self.method]["betas"]


def make_accelerator(bf16_autocast: bool = False):
    """One Accelerator per process: DDP over gloo on CPUs under torchrun, NCCL on GPUs.
    `bf16_autocast` computes in bf16 over fp32 master weights (full retraining on GPUs)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16_autocast else "no")


def cosine_schedule(warmup: int, total: int):
    """Linear warm-up to the peak learning rate, then a cosine to zero at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class CausalLMLoss(nn.Module):
    """What DDP wraps: windows in, summed NLL (and KL to the teacher) out.

    The fused path runs the decoder body for the final hidden states and hands them with
    the head weight to depthcut's fused kernels; "hf" asks the model for its logits and
    loss, as Hugging Face training does.
    """

    def __init__(self, model, teacher=None, loss: str = "fused"):
        super().__init__()
        self.model = model
        self.adapter = ModelAdapter(model)
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, never trained
        self.teacher_adapter = ModelAdapter(teacher) if teacher is not None else None
        self.loss = loss

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:].reshape(-1)
        if self.loss == "hf":
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1).float()
            nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            kl = logits.new_zeros(())
            if self.teacher:
                with torch.no_grad():
                    t_logits = self.teacher[0](input_ids=ids, use_cache=False).logits[:, :-1].flatten(0, 1).float()
                per_token = F.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1)
                kl = per_token.masked_fill(targets == IGNORE_INDEX, 0.0).sum()
            return nll, kl
        hidden = self._final_hidden(self.model, ids)
        weight = self.adapter.lm_head_weight.to(hidden.dtype)
        nll = linear_nll_sum(hidden, weight, targets, self.adapter.logit_softcap)
        kl = nll.new_zeros(())
        if self.teacher:
            with torch.no_grad():
                t_hidden = self._final_hidden(self.teacher[0], ids)
                t_weight = self.teacher_adapter.lm_head_weight.to(t_hidden.dtype)
            kl = linear_kl(hidden, weight, t_hidden, t_weight, targets, self.adapter.logit_softcap,
                           self.teacher_adapter.logit_softcap).sum()
        return nll, kl

    @staticmethod
    def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm for positions 0..T-2, as [N*(T-1), H]."""
        out = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return out[:, :-1].reshape(-1, out.shape[-1])


def lora_targets(model) -> list[str]:
    """The names of every linear layer inside the blocks (q, k, v, o, gate, up, down, or merged)."""
    names = {name.rsplit(".", 1)[-1] for name, m in ModelAdapter(model).layers.named_modules()
             if isinstance(m, nn.Linear)}
    return sorted(names)


def _trainable(model, cfg: RetrainConfig):
    """(model to train, peft model or None): LoRA adapters on every block projection, or all weights."""
    torch.manual_seed(cfg.seed)  # the LoRA initialisation is part of the recipe
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=lora_targets(model), task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    return peft_model.get_base_model(), peft_model


def _optimizer(model, cfg: RetrainConfig) -> torch.optim.Optimizer:
    """AdamW; norms and biases (1-D tensors) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas())


def window_order(step: int, global_batch: int, n_windows: int, seed: int) -> torch.Tensor:
    """Window indices of one optimiser step: epochs in seeded random order, a pure function of
    the step, so a resumed run reads exactly what the interrupted one would have."""
    pos = torch.arange(step * global_batch, (step + 1) * global_batch)
    out = torch.empty_like(pos)
    for epoch in pos.div(n_windows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = pos.div(n_windows, rounding_mode="floor") == epoch
        out[sel] = perm[pos[sel] % n_windows]
    return out


def _trained_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: the adapter, or every (untied) weight."""
    named = dict(model.named_parameters())  # tied weights appear once
    return {k: v.detach().cpu().contiguous() for k, v in named.items() if v.requires_grad}


class Checkpoints:
    """``run_dir/checkpoints/step-NNNNNNNN/``, each written to a temporary sibling and renamed:
    trained weights (safetensors), optimiser and scheduler state, step, per-process RNG state."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        found = sorted(p for p in self.root.iterdir() if p.is_dir() and _CKPT.match(p.name))
        return found[-1] if found else None

    def drop_partial(self) -> None:
        """Remove what a killed run left half-written."""
        for path in self.root.glob(".step-*.tmp") if self.root.is_dir() else ():
            shutil.rmtree(path, ignore_errors=True)

    def clear(self) -> None:
        for path in self.root.iterdir():
            if _CKPT.match(path.name):
                shutil.rmtree(path)

    def save(self, accelerator, step: int, model, optimizer, scheduler, recipe: dict):
        from safetensors.torch import save_file

        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file(_trained_state(model), str(tmp / "trained.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save({"step": step, "scheduler": scheduler.state_dict()}, tmp / "state.pt")
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tmp.rename(final)
            for old in sorted(p for p in self.root.iterdir() if _CKPT.match(p.name))[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def load(self, path: Path, accelerator, model, optimizer, scheduler, recipe: dict) -> int:
        """Restore everything a checkpoint holds; returns its step. A damaged one is a one-line error."""
        try:
            return self._load(path, accelerator, model, optimizer, scheduler, recipe)
        except DepthcutError:
            raise
        except Exception as e:  # json, safetensors and torch.load fail in their own ways
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DepthcutError(f"cannot resume from {path}: damaged checkpoint ({first})") from None

    def _load(self, path: Path, accelerator, model, optimizer, scheduler, recipe: dict) -> int:
        from safetensors.torch import load_file

        saved = json.loads((path / "recipe.json").read_text())
        differ = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
        if differ:
            raise DepthcutError(f"cannot resume from {path}: it was written by another recipe "
                                f"({', '.join(differ)} differ)")
        rng_file = path / f"rng-{accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise DepthcutError(f"cannot resume from {path}: no RNG state for process {accelerator.process_index} "
                                "(was it written with another number of processes?)")
        weights = load_file(str(path / "trained.safetensors"))
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if weights.keys() != params.keys() or any(weights[k].shape != params[k].shape for k in params):
            raise DepthcutError(f"cannot resume from {path}: its trained tensors do not fit this model")
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        state = torch.load(path / "state.pt", weights_only=True)
        scheduler.load_state_dict(state["scheduler"])
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return int(state["step"])


@dataclass
class RetrainResult:
    model: nn.Module  # plain transformers model (LoRA merged)
    log: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    adapter_dir: Path | None = None  # the LoRA adapter saved before merging, when asked for
    main_process: bool = True  # under torchrun only the main process writes outputs


def _recipe(cfg: RetrainConfig, data: TrainingSet, model, world: int, teacher) -> dict:
    return {**{k: v for k, v in asdict(cfg).items() if k not in ("eval_every", "save_every")},
            "data": data.split.get("source"), "train_windows": len(data.train_ids), "seq_len": data.seq_len,
            "processes": world, "num_blocks": ModelAdapter(model).num_blocks,
            "teacher_blocks": ModelAdapter(teacher).num_blocks if teacher is not None else None}


def check_training_dtype(weight: torch.Tensor, loss: str) -> None:
    """The fused loss's CPU kernels compute in fp32 or bf16; fp16 weights there would fail mid-run."""
    if loss == "fused" and weight.device.type == "cpu" and weight.dtype == torch.float16:
        raise DepthcutError("fp16 training on the CPU is not supported by the fused loss; "
                            "load with --dtype fp32 or bf16 (or use --loss hf)")


def retrain(model, data: TrainingSet, cfg: RetrainConfig, run_dir: str | Path, teacher=None, resume: bool = False,
            accelerator=None, progress: bool = True, keep_adapter: bool = False, force: bool = False) -> RetrainResult:
    """Retrain `model` on `data` with `cfg`; checkpoints and the live log go to `run_dir`
    (refused when it holds files depthcut did not write, unless `force`).

    Returns the retrained plain model (LoRA merged), the per-step log and a summary with
    perplexity on the evaluation windows before and after.
    """
    if cfg.distill_weight > 0 and teacher is None:
        raise DepthcutError("--distill-weight needs a --teacher model")
    check_training_dtype(next(model.parameters()), cfg.loss)
    check_token_ids(data.train_ids, **model_limits(model))  # ids past the vocabulary, windows past the context
    accelerator = accelerator or make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    run_dir = Path(run_dir)
    checkpoints = Checkpoints(run_dir)
    if accelerator.is_main_process:
        working_folder(run_dir, RUN_DIR_ENTRIES, force=force)
        checkpoints.drop_partial()
    if not resume and checkpoints.latest() is not None:
        if not force:
            raise DepthcutError(f"{run_dir} holds an earlier run's checkpoints: --resume continues it, "
                                "--force starts over")
        if accelerator.is_main_process:
            checkpoints.clear()
    start_ckpt = checkpoints.latest() if resume else None
    if resume and start_ckpt is None:
        raise DepthcutError(f"--resume: no checkpoint in {checkpoints.root}")

    seq_len, n_windows = data.seq_len, len(data.train_ids)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    total = cfg.total_steps(global_batch, seq_len)
    recipe = _recipe(cfg, data, model, world, teacher)
    eval_ids = data.eval_ids
    ppl_before = perplexity(model, eval_ids) if len(eval_ids) else float("nan")

    if teacher is not None:
        teacher.eval().requires_grad_(False)
    model.requires_grad_(False)
    train_model, peft_model = _trainable(model, cfg)
    if cfg.gradient_checkpointing:
        train_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_model.train()
    optimizer = _optimizer(train_model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps(total), total))
    step = 0
    if start_ckpt is not None:
        step = checkpoints.load(start_ckpt, accelerator, train_model, optimizer, scheduler, recipe)
    loss_module = accelerator.prepare(CausalLMLoss(train_model, teacher, cfg.loss))

    log_path = run_dir / "train_log.jsonl"
    log = _read_log(log_path, step) if step else []
    if accelerator.is_main_process:
        atomic_write(log_path, "".join(json.dumps(e) + "\n" for e in log).encode(), force=True)
    if not log and accelerator.is_main_process:
        log.append(_append(log_path, {"step": 0, "tokens": 0, "eval_ppl": ppl_before}))

    a = cfg.distill_weight
    bar = tqdm(total=total, initial=step, desc=f"retrain ({cfg.method})", unit="step",
               disable=not (progress and accelerator.is_main_process))
    train_seconds = eval_seconds = 0.0  # this process's steps, and its evaluations apart
    tokens_timed = 0
    while step < total:
        t0 = time.perf_counter()
        order = window_order(step, global_batch, n_windows, cfg.seed)
        count = max(1, int((data.train_labels[order][:, 1:] != IGNORE_INDEX).sum()))  # the same on every process
        sums = _accumulate_gradients(loss_module, data, order.view(world, cfg.grad_accum, cfg.batch_size)[rank],
                                     a, world / count, accelerator)
        grad_norm = (accelerator.clip_grad_norm_(train_model.parameters(), cfg.max_grad_norm)
                     if cfg.max_grad_norm > 0 else None)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        nll_mean, kl_mean = (sums / count).tolist()
        dt = time.perf_counter() - t0
        tokens_timed += global_batch * seq_len
        train_seconds += dt
        entry = {"step": step, "tokens": step * global_batch * seq_len, "loss": (1 - a) * nll_mean + a * kl_mean,
                 "nll": nll_mean, "lr": lr, "tok_s": round(global_batch * seq_len / dt, 1), "seconds": round(dt, 3)}
        if a > 0:
            entry["kl"] = kl_mean
        if grad_norm is not None:
            entry["grad_norm"] = float(grad_norm)
        if not math.isfinite(entry["loss"]):
            raise DepthcutError(f"training loss became {entry['loss']} at step {step}; lower --lr")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total) and len(eval_ids):
            t_eval = time.perf_counter()
            entry["eval_ppl"] = _evaluate(train_model, eval_ids)
            eval_seconds += time.perf_counter() - t_eval
        if accelerator.is_main_process:
            log.append(_append(log_path, entry))
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tok_s']:.0f}")
        bar.update(1)
        if cfg.save_every and (step % cfg.save_every == 0) and step < total:
            checkpoints.save(accelerator, step, train_model, optimizer, scheduler, recipe)
    bar.close()

    train_model.eval()
    final, adapter_dir = train_model, None
    if peft_model is not None:
        if keep_adapter and accelerator.is_main_process:
            adapter_dir = run_dir / "adapter"
            with atomic_path(adapter_dir, is_dir=True, force=True) as tmp:
                peft_model.save_pretrained(tmp)
        final = peft_model.merge_and_unload()
    final.requires_grad_(False)
    ppl_after = perplexity(final, eval_ids) if len(eval_ids) else float("nan")
    losses = [e["loss"] for e in log if "loss" in e]
    summary = {"recipe": recipe, "data": data.describe(), "steps": total, "global_batch": global_batch,
               "tokens": total * global_batch * seq_len, "final_loss": losses[-1] if losses else None,
               "perplexity_before": ppl_before, "perplexity_after": ppl_after,
               "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
               "tokens_per_second": round(tokens_timed / train_seconds, 1) if tokens_timed else None,
               "resumed_from_step": int(_CKPT.match(start_ckpt.name).group(1)) if start_ckpt else None}
    return RetrainResult(final, log, summary, adapter_dir, accelerator.is_main_process)


def _accumulate_gradients(loss_module, data: TrainingSet, windows: torch.Tensor, a: float, scale: float,
                          accelerator) -> torch.Tensor:
    """Forward and backward this process's [grad_accum, batch] windows of one step; gradients
    are synchronised across processes on the last one only. Returns the summed (NLL, KL).

    The loss is scaled by processes / trained tokens of the whole global batch, because DDP
    averages gradients: the result is the global mean over trained tokens, on any layout.
    """
    sums = torch.zeros(2, dtype=torch.float64)
    for k, micro in enumerate(windows):
        last = k == len(windows) - 1
        with accelerator.no_sync(loss_module) if not last and accelerator.num_processes > 1 else nullcontext():
            nll, kl = loss_module(data.train_ids[micro].to(accelerator.device),
                                  data.train_labels[micro].to(accelerator.device))
            accelerator.backward(((1 - a) * nll + a * kl) * scale)
        sums += torch.stack([nll.detach(), kl.detach()]).double().cpu()
    return sums


def _evaluate(model, eval_ids: torch.Tensor) -> float:
    model.eval()
    try:
        return perplexity(model, eval_ids)
    finally:
        model.train()


def _append(path: Path, entry: dict) -> dict:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def _read_log(path: Path, upto_step: int) -> list[dict]:
    """The log of an interrupted run up to the checkpoint it resumes from."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if entry.get("step", 0) <= upto_step:
            entries.append(entry)
    return entries


def plot_loss(log: list[dict], path: str | Path) -> Path:
    """Training loss and evaluation perplexity over tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [e for e in log if "loss" in e]
    ax_loss.plot([e["tokens"] for e in train], [e["loss"] for e in train], lw=1.2)
    ax_loss.set(xlabel="tokens seen", ylabel="training loss", title="training loss")
    evals = [e for e in log if "eval_ppl" in e]
    ax_ppl.plot([e["tokens"] for e in evals], [e["eval_ppl"] for e in evals], "o-", color="tab:orange")
    ax_ppl.set(xlabel="tokens seen", ylabel="perplexity", title="held-apart perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: RetrainResult, out_dir: Path) -> None:
    """train_log.jsonl, loss.png and (when kept) the LoRA adapter, into a folder being saved."""
    (out_dir / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in result.log))
    plot_loss(result.log, out_dir / "loss.png")
    if result.adapter_dir is not None:
        shutil.copytree(result.adapter_dir, out_dir / "adapter")
