"""Deleting blocks and saving the shallower model so stock transformers loads it (docs/DESIGN.md, "Pruning and the saved model")."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from .errors import DepthcutError
from .models import ModelAdapter, drop_quantization_config
from .offload import save_streamed, stream_of
from .outputs import atomic_path


def check_ratio(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise DepthcutError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
    return ratio


def blocks_for_ratio(num_blocks: int, ratio: float) -> int:
    """How many blocks a pruning ratio removes (rounded to the nearest block)."""
    return max(1, round(num_blocks * check_ratio(ratio)))


def prune_blocks(model, blocks: Iterable[int]):
    """Delete the given blocks in place and make the config and caches agree; returns the model.

    Renumbers every ``layer_idx`` (the KV cache indexes by it), sets ``num_hidden_layers``
    and cuts every per-layer list in the config (``layer_types`` and the like); block-index
    scalars follow the family's table row (see ``models.Family``).
    """
    adapter = ModelAdapter(model)
    n = adapter.num_blocks
    remove = sorted(set(int(b) for b in blocks))
    if not remove:
        raise DepthcutError("no blocks to remove")
    if remove[0] < 0 or remove[-1] >= n:
        raise DepthcutError(f"block index out of range: the model has blocks 0..{n - 1}")
    if len(remove) >= n:
        raise DepthcutError(f"cannot remove {len(remove)} of {n} blocks: at least one must stay")
    keep = [i for i in range(n) if i not in set(remove)]
    model.model.layers = nn.ModuleList(adapter.layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and not _is_token_list(key):
            setattr(config, key, type(value)(value[i] for i in keep))
    for key in adapter.family.leading_blocks_attrs:
        if isinstance(count := getattr(config, key, None), int):
            setattr(config, key, sum(i < count for i in keep))
    for key in adapter.family.block_period_attrs:
        if key in vars(config):
            delattr(config, key)
    config.num_hidden_layers = len(keep)
    return model


def _is_token_list(key: str) -> bool:
    return key == "architectures" or key.endswith(("token_id", "token_ids", "_ids"))


def save_model(model, tokenizer, out_dir: str | Path, card: dict | None = None,
               extra: Callable[[Path], None] | None = None, force: bool = False) -> Path:
    """``save_pretrained`` plus tokenizer (and a model card), written aside then swapped in.

    ``extra(folder)`` adds files (a training log, a plot) inside the same atomic write. An
    existing folder is replaced only when depthcut wrote it, or with ``force``.
    """
    drop_quantization_config(model)
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True, force=force) as tmp:
        if stream_of(model) is not None:
            save_streamed(model, tmp)  # a model larger than memory, tensor by tensor
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "depthcut.json").write_text(json.dumps(card, indent=2))
            (tmp / "README.md").write_text(model_card(card))
        if extra is not None:
            extra(tmp)
    return out_dir


_LOADS = ["", "Loads with stock `transformers`: `AutoModelForCausalLM.from_pretrained(folder)`.", ""]


def model_card(card: dict) -> str:
    """A short README saying what was removed, by which criterion, on what data, at what cost."""
    if "removed" not in card:  # retrained, not cut by depthcut
        return "\n".join([f"# {card.get('name', 'retrained model')}", "",
                          f"Retrained with depthcut from `{card.get('source', '?')}`."]
                         + _retraining_lines(card.get("retraining"))
                         + _zero_shot_lines(card.get("zero_shot"))
                         + _LOADS)
    lines = [
        f"# {card.get('name', 'depth-pruned model')}",
        "",
        f"Depth-pruned with depthcut from `{card.get('source', '?')}`: "
        f"{len(card.get('removed', []))} of {card.get('num_blocks', '?')} Transformer blocks removed.",
        "",
        f"- criterion: {card.get('criterion', 'explicit list')}",
        f"- removed blocks: {card.get('removed')}",
        f"- protected (never pruned): first {card.get('protect', {}).get('first', '?')}, "
        f"last {card.get('protect', {}).get('last', '?')}",
    ]
    calib = card.get("calibration")
    if calib:
        lines.append(f"- calibration: {calib['n_samples']} x {calib['seq_len']} tokens of "
                     f"{calib['source']} (seed {calib['seed']})")
    ppl = card.get("perplexity")
    if ppl:
        lines.append(f"- perplexity ({ppl.get('text', 'held-apart text')}): dense {ppl['dense']:.2f}, "
                     f"pruned {ppl['pruned']:.2f}")
    lines += _retraining_lines(card.get("retraining"))
    lines += _zero_shot_lines(card.get("zero_shot"))
    lines += _LOADS
    return "\n".join(lines)


def _zero_shot_lines(z: dict | None) -> list[str]:
    """The before/after zero-shot table (lm-evaluation-harness), in Markdown."""
    if not z:
        return []
    from .zero_shot import table

    header, cells = table(z["models"])
    limit = f", first {z['limit']} documents per task" if z.get("limit") else ""
    return (["", "## Zero-shot accuracy", "", f"{z['harness']}, {z['num_fewshot']}-shot{limit}:", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in cells])


def _retraining_lines(r: dict | None) -> list[str]:
    """The retraining recipe and its result, for the model card."""
    if not r:
        return []
    recipe, data = r["recipe"], r["data"]
    lines = ["", "## Retraining", "",
             f"- method: {recipe['method']}" + (f" (rank {recipe['lora_rank']}, alpha {recipe['lora_alpha']:g}, "
                                                 f"dropout {recipe['lora_dropout']:g}, merged into the weights)"
                                                 if recipe["method"] == "lora" else " (all parameters)"),
             f"- data: {data.get('source')}; {data['train_windows']} training windows of {data['seq_len']} tokens; "
             f"evaluation windows: {data.get('rule')}",
             f"- {r['steps']} steps x {r['global_batch']} windows = {r['tokens']:,} tokens; lr {recipe['lr']:g}, "
             f"cosine, warm-up {recipe['warmup'] if recipe['warmup'] is not None else 'default'}, "
             f"weight decay {recipe['weight_decay']:g}, seed {recipe['seed']}"]
    if recipe.get("distill_weight"):
        lines.append(f"- distilled from the {recipe['teacher_blocks']}-block teacher, "
                     f"weight {recipe['distill_weight']:g} on KL(teacher || student)")
    if r.get("final_loss") is not None:
        lines.append(f"- final training loss {r['final_loss']:.4f}")
    lines.append(f"- perplexity on the evaluation windows: {r['perplexity_before']:.2f} before, "
                 f"{r['perplexity_after']:.2f} after")
    return lines
