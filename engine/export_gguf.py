"""Write an in-memory Hugging Face causal LM (dense or depth-pruned) as a GGUF file for llama.cpp.

The file is built with the official ``gguf`` package: tensors renamed through a per-architecture
table, quantised with ``gguf.quants.quantize`` (legacy types) or ``kquants.quantize`` (K types,
weighted by an importance matrix when one is given; per-tensor types from ``gguf_mixes``), the
tokenizer (byte-level BPE, or SentencePiece-style BPE with byte fallback as Llama-1/2, Mistral
v0.1 and Gemma have) and the architecture hyper-parameters written as metadata. Tensors are quantised and written one at a time, so peak
memory is the model plus one converted tensor, and the file appears only when it is complete.
The tokenizer conversion lives in ``gguf_tokenizer.py``. The tables here name gguf's enums by
member name, so that this module imports without the optional ``gguf`` package.
"""
from __future__ import annotations

import functools
import itertools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from . import legacy_quants
from .gguf_mixes import K_MIXES, LEGACY_TYPES, TensorRole, tensor_type
from .gguf_tokenizer import (GGUFExportError, add_tokenizer, check_name, gguf_tokenizer_pre, new_writer,
                             require_gguf)
from .legacy_quants import LEGACY_QUANT_TYPES, WEIGHTED_TYPES
from .models import FAMILIES
from .offload import loaded, stream_of
from .outputs import GGUF_MARK_KEY, WRITTEN_BY, atomic_path

try:
    import gguf
except ImportError:  # optional: export_gguf calls require_gguf first
    gguf = None

__all__ = ["ARCHITECTURES", "QTYPES", "GGUFExportError", "export_gguf", "gguf_tokenizer_pre", "gguf_weight_name",
           "tensor_types"]

# The types of 2-D weights: a legacy qtype "x" is GGMLQuantizationType.X for every matrix, a K mix
# assigns types per tensor (gguf_mixes.py); general.file_type is LlamaFileType.MOSTLY_X.
QTYPES = LEGACY_TYPES + tuple(K_MIXES)
FALLBACKS_KEY = "depthcut.quantization_fallbacks"  # tensors a K mix stored in a legacy type

# Hugging Face module path (``{bid}`` = block index) -> gguf.MODEL_TENSOR member name; ``.weight``/``.bias`` follow.
# These names are shared by every Llama-style family transformers implements.
_LLAMA_STYLE_TENSORS = {
    "model.embed_tokens": "TOKEN_EMBD",
    "model.norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
    "model.layers.{bid}.input_layernorm": "ATTN_NORM",
    "model.layers.{bid}.self_attn.q_proj": "ATTN_Q",
    "model.layers.{bid}.self_attn.k_proj": "ATTN_K",
    "model.layers.{bid}.self_attn.v_proj": "ATTN_V",
    "model.layers.{bid}.self_attn.o_proj": "ATTN_OUT",
    "model.layers.{bid}.self_attn.q_norm": "ATTN_Q_NORM",
    "model.layers.{bid}.self_attn.k_norm": "ATTN_K_NORM",
    "model.layers.{bid}.post_attention_layernorm": "FFN_NORM",
    "model.layers.{bid}.mlp.gate_proj": "FFN_GATE",
    "model.layers.{bid}.mlp.up_proj": "FFN_UP",
    "model.layers.{bid}.mlp.down_proj": "FFN_DOWN",
}


# Gemma 2/3 and OLMo2 norm the sublayer outputs too; Gemma 3 and OLMo2 norm q and k.
_GEMMA_TENSORS = {k: v for k, v in _LLAMA_STYLE_TENSORS.items() if "_norm" not in k}
_GEMMA2_TENSORS = {
    **_GEMMA_TENSORS,
    "model.layers.{bid}.post_attention_layernorm": "ATTN_POST_NORM",
    "model.layers.{bid}.pre_feedforward_layernorm": "FFN_NORM",
    "model.layers.{bid}.post_feedforward_layernorm": "FFN_POST_NORM",
}
_GEMMA3_TENSORS = {
    **_GEMMA2_TENSORS,
    "model.layers.{bid}.self_attn.q_norm": "ATTN_Q_NORM",
    "model.layers.{bid}.self_attn.k_norm": "ATTN_K_NORM",
}
# OLMo2 has no pre-norms: it norms the attention and MLP outputs (and the whole q and k projections).
_OLMO2_TENSORS = {
    **{k: v for k, v in _LLAMA_STYLE_TENSORS.items() if "layernorm" not in k},
    "model.layers.{bid}.post_attention_layernorm": "ATTN_POST_NORM",
    "model.layers.{bid}.post_feedforward_layernorm": "FFN_POST_NORM",
}
# Phi3 fuses q|k|v and gate|up; llama.cpp takes both fused as they are (its SwiGLU gates with the
# first half of ffn_up, as Phi3MLP does).
_PHI3_TENSORS = {
    **{k: v for k, v in _LLAMA_STYLE_TENSORS.items()
       if v not in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_Q_NORM", "ATTN_K_NORM", "FFN_GATE", "FFN_UP")},
    "model.layers.{bid}.self_attn.qkv_proj": "ATTN_QKV",
    "model.layers.{bid}.mlp.gate_up_proj": "FFN_UP",
}
_NORMS = {"ATTN_NORM", "FFN_NORM", "OUTPUT_NORM", "ATTN_POST_NORM", "FFN_POST_NORM", "ATTN_Q_NORM", "ATTN_K_NORM"}


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` becomes a llama.cpp architecture.

    ``interleaved_rope``: llama.cpp runs this architecture with RoPE on adjacent pairs (2i, 2i+1)
    while transformers rotates the two halves of each head (i, i + d/2), so q/k rows are reordered.
    ``metadata``: config -> [(GGUFWriter method, value)] for the family's own keys; it raises
    GGUFExportError for a configuration llama.cpp's graph cannot reproduce.
    ``sliding_window``: llama.cpp's graph for this architecture applies the window (per layer).
    """

    arch: str  # a gguf.MODEL_ARCH member name
    interleaved_rope: bool
    tensors: dict
    metadata: Callable | None = None
    sliding_window: bool = False


def _refuse(family: str, what: str):
    raise GGUFExportError(f"GGUF export of {family}: {what}")


def _sliding_pattern(config, family: str) -> list:
    """Window and per-layer flags (True = sliding) from ``layer_types``, written as the per-layer
    array llama.cpp reads for ``attention.sliding_window_pattern``: a pruned model's pattern is no
    longer periodic, so the period llama.cpp would assume for the family must not be left to it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or types is None:
        _refuse(family, "needs sliding_window and layer_types in the config")
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != config.num_hidden_layers:
        _refuse(family, f"layer_types must list sliding/full attention for each of the "
                        f"{config.num_hidden_layers} blocks, not {types}")
    return [("add_sliding_window", int(window)),
            ("add_sliding_window_pattern", [t == "sliding_attention" for t in types])]


# llama.cpp's gemma2/gemma3 scale q by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads) when the block
# count says "27B"; it does not read attention.scale for them (measured: a file stating another
# scale runs with the size rule, logits off by ~50%).
_LLAMA_CPP_27B_BLOCKS = {"gemma2": 46, "gemma3": 62}


def _query_scale(config, family: str) -> list:
    """transformers scales q by query_pre_attn_scalar ** -0.5; refuse a model for which llama.cpp's
    rule gives another scale (a pruned Gemma 2/3 27B: its block count no longer says 27B)."""
    wanted = config.query_pre_attn_scalar
    is_27b = config.num_hidden_layers == _LLAMA_CPP_27B_BLOCKS[family]
    used = config.hidden_size // config.num_attention_heads if is_27b else config.head_dim
    if wanted != used:
        _refuse(family, f"transformers scales queries by query_pre_attn_scalar = {wanted} but llama.cpp "
                        f"would use {used} ({'hidden / heads, its 27B rule' if is_27b else 'head_dim'}, from the "
                        f"block count {config.num_hidden_layers}) and reads no scale from the file")
    return [("add_attention_scale", float(wanted) ** -0.5)]  # for readers that honour it


def _gemma2_metadata(config) -> list:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is None:
            _refuse("gemma2", f"llama.cpp's gemma2 always soft-caps; {key} = None cannot be written")
    return [("add_attn_logit_softcapping", float(config.attn_logit_softcapping)),
            ("add_final_logit_softcapping", float(config.final_logit_softcapping)),
            *_query_scale(config, "gemma2"), *_sliding_pattern(config, "gemma2")]


def _gemma3_metadata(config) -> list:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            _refuse("gemma3", f"llama.cpp's gemma3 graph does not soft-cap ({key} = {getattr(config, key)})")
    local = (config.rope_parameters or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        _refuse("gemma3", f"llama.cpp applies no RoPE scaling to sliding layers, not {local.get('rope_type')!r}")
    return [("add_rope_freq_base_swa", float(local.get("rope_theta", 10000.0))),
            *_query_scale(config, "gemma3"), *_sliding_pattern(config, "gemma3")]


def _phi3_metadata(config) -> list:
    meta = []
    if getattr(config, "original_max_position_embeddings", None):
        meta.append(("add_rope_scaling_orig_ctx_len", int(config.original_max_position_embeddings)))
    if getattr(config, "sliding_window", None):
        meta.append(("add_sliding_window", int(config.sliding_window)))  # llama.cpp reads it and disables it
    return meta


def _granite_metadata(config) -> list:
    # llama.cpp's granite graph: embeddings * embedding_scale, q.k * attention_scale, each block's
    # output * residual_scale before the residual add, logits / logit_scale: transformers' four.
    return [("add_embedding_scale", float(config.embedding_multiplier)),
            ("add_residual_scale", float(config.residual_multiplier)),
            ("add_attention_scale", float(config.attention_multiplier)),
            ("add_logit_scale", float(config.logits_scaling))]


# Add a family with a row here (and a tensor table if its module names differ).
ARCHITECTURES = {
    "llama": ArchSpec("LLAMA", True, _LLAMA_STYLE_TENSORS),
    # llama.cpp runs Mistral as "llama"; its graph has no sliding window (see _check_config).
    "mistral": ArchSpec("LLAMA", True, _LLAMA_STYLE_TENSORS),
    "qwen2": ArchSpec("QWEN2", False, _LLAMA_STYLE_TENSORS),
    "qwen3": ArchSpec("QWEN3", False, _LLAMA_STYLE_TENSORS),
    "gemma": ArchSpec("GEMMA", False, _GEMMA_TENSORS),
    "gemma2": ArchSpec("GEMMA2", False, _GEMMA2_TENSORS, _gemma2_metadata, True),
    "gemma3_text": ArchSpec("GEMMA3", False, _GEMMA3_TENSORS, _gemma3_metadata, True),
    # llama.cpp's phi3 graph has no sliding window (it reads the key and switches it off).
    "phi3": ArchSpec("PHI3", False, _PHI3_TENSORS, metadata=_phi3_metadata),
    "olmo2": ArchSpec("OLMO2", False, _OLMO2_TENSORS),
    "granite": ArchSpec("GRANITE", True, _LLAMA_STYLE_TENSORS, metadata=_granite_metadata),
}


def export_gguf(model, tokenizer, path, qtype: str = "f16", *, name: str | None = None,
                tokenizer_pre: str | None = None, imatrix=None, force: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` to ``path`` as GGUF and return the path.

    ``qtype`` sets the types of the 2-D weight matrices (gguf_mixes.py has the rules). 1-D tensors
    (norms, biases) stay f32, as llama.cpp expects. Legacy types: a matrix whose row length is not
    a multiple of the quantisation block falls back to f16 (with a warning), and for the 4/5-bit
    types the output head (``token_embd`` when the embeddings are tied) is stored as q8_0. K mixes:
    types per tensor as llama.cpp's mixes of the same names, rows off the 256 grid in a legacy type
    (a warning, and the list under ``depthcut.quantization_fallbacks``). ``imatrix`` (an
    ``imatrix.Imatrix`` or the path of an imatrix file) weights the quantisation error per input
    channel (K types, and Q4_0/Q5_0/Q5_1 through ``legacy_quants``).
    ``tokenizer_pre`` overrides the llama.cpp pre-tokenizer name detected from the tokenizer (pass
    the source file's value when the model came from GGUF: transformers does not keep it). An
    existing file is replaced only when depthcut wrote it (its ``depthcut.written_by`` key), or
    with ``force``.
    """
    require_gguf()
    if qtype not in QTYPES:
        raise GGUFExportError(f"unknown GGUF type {qtype!r}; supported: {', '.join(QTYPES)}")
    config = model.config
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise GGUFExportError(f"GGUF export does not support model_type {config.model_type!r}; "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
    _check_config(config, spec)
    family_meta = spec.metadata(config) if spec.metadata else []
    path = Path(path)
    check_name(name or path.stem, tokenizer)
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]
    plan, fallbacks = _tensor_plan(model, spec, qtype, _load_imatrix(imatrix, config.num_hidden_layers))
    if fallbacks:
        family_meta = [*family_meta, ("add_array", FALLBACKS_KEY, fallbacks)]

    with atomic_path(path, force=force) as tmp:
        writer = new_writer(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[spec.arch]])
        try:
            _write(writer, tmp, model, tokenizer, plan, name or path.stem, file_type, tokenizer_pre, family_meta)
        finally:
            writer.close()
    return path


def _load_imatrix(imatrix, n_blocks: int):
    if imatrix is None:
        return None
    from .imatrix import Imatrix

    imatrix = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
    imatrix.check_blocks(n_blocks)
    return imatrix


def _write(writer, tmp, model, tokenizer, plan, name, file_type, tokenizer_pre, family_meta) -> None:
    config = model.config
    writer.add_string(GGUF_MARK_KEY, WRITTEN_BY)  # right after the architecture: see outputs.py
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_hparams(writer, config, file_type)
    for method, *values in family_meta:
        getattr(writer, method)(*values)
    add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
    # Header first, then one tensor at a time: only one converted tensor is ever in memory.
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.ttype), raw_dtype=t.ttype)
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    slow = any(t.ttype.name.endswith("_K") or t.ttype.name.startswith("IQ") for t in plan)  # searched types
    for t in tqdm(_in_memory(model, plan), total=len(plan), desc="quantising", unit="tensor", disable=not slow,
                  leave=False):
        writer.write_tensor_data(_convert(t))


def _in_memory(model, plan: list[_Planned]):
    """The planned tensors with their weights in memory: a streamed model's blocks are loaded
    one at a time while their tensors are written (docs/DESIGN.md, "Models larger than memory")."""
    stream = stream_of(model)
    if stream is None:
        yield from plan
        return
    origin = {id(layer): i for i, layer in enumerate(stream.layers)}
    for block, group in itertools.groupby(plan, key=lambda t: t.block):
        if block is None:
            yield from group
            continue
        layer = model.model.layers[block]
        with loaded(model, origin[id(layer)]):
            params = dict(layer.named_parameters())
            for t in group:
                yield t._replace(tensor=params[t.source.split(".", 3)[3]])


def _rope(config) -> dict:
    """The RoPE parameters of the full-attention layers (Gemma 3 keeps one dict per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _check_config(config, spec: ArchSpec) -> None:
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise GGUFExportError(f"GGUF export supports default and linear RoPE, not {rope.get('rope_type')!r}")
    window = getattr(config, "sliding_window", None)
    if window and not spec.sliding_window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        warnings.warn(f"llama.cpp ignores the sliding window ({window}): outputs match only up to {window} tokens")


class _Planned(NamedTuple):
    name: str  # gguf name
    tensor: torch.Tensor
    permute_heads: int | None  # q/k heads to un-rotate
    shape: tuple
    ttype: "gguf.GGMLQuantizationType"
    offset: float  # added before quantising (the family's norm offset)
    importance: torch.Tensor | None  # [cols] mean x^2 per input channel, for the K types
    source: str  # Hugging Face parameter name
    block: int | None  # the block it belongs to, in the file's numbering


@functools.lru_cache(maxsize=None)
def _patterns(model_type: str) -> list:
    """[(regex over HF parameter names, gguf.MODEL_TENSOR member name)] of one architecture."""
    return [(re.compile(re.escape(hf).replace(r"\{bid\}", r"(\d+)") + r"\.(weight|bias)$"), t)
            for hf, t in ARCHITECTURES[model_type].tensors.items()]


def _match(model_type: str, hf_name: str):
    """(gguf name, gguf.MODEL_TENSOR member name, block index or None), or None if no table row matches."""
    for pattern, target in _patterns(model_type):
        if m := pattern.fullmatch(hf_name):
            block = m.group(1) if m.re.groups == 2 else None
            base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[target]]
            return base.format(bid=block) + "." + m.groups()[-1], target, None if block is None else int(block)
    return None


def gguf_weight_name(model_type: str, module_name: str) -> str | None:
    """The gguf tensor name of a linear module's weight ("model.layers.3.self_attn.q_proj" ->
    "blk.3.attn_q.weight"), or None when the architecture's table has no row for it."""
    found = _match(model_type, module_name + ".weight")
    return found[0] if found else None


def _tensor_plan(model, spec: ArchSpec, qtype: str, imatrix) -> tuple[list[_Planned], list[str]]:
    """The tensors in file order, and the fallback notes of a K mix."""
    Q = gguf.GGMLQuantizationType
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[spec.arch]]}
    config = model.config
    n_blocks = config.num_hidden_layers
    n_gqa = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plan, fallbacks, missing = [], [], []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output, like its converter writes it
        found = _match(config.model_type, hf_name)
        if found is None:
            raise GGUFExportError(f"no GGUF tensor for {hf_name!r} in architecture {config.model_type!r}")
        gguf_name, target, block = found
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[target]]
        if base not in allowed:
            raise GGUFExportError(f"llama.cpp's {spec.arch.lower()} has no tensor {base!r} (from {hf_name})")
        permute_heads = None
        if spec.interleaved_rope and target in ("ATTN_Q", "ATTN_K"):
            permute_heads = config.num_attention_heads if target == "ATTN_Q" else config.num_key_value_heads
        importance = None
        if tensor.dim() == 1:
            ttype = Q.F32
        else:
            is_head = target == "OUTPUT" or (tied and target == "TOKEN_EMBD")
            role = TensorRole(base.split(".")[-1], tensor.shape[-1], block, is_head)
            name, note = tensor_type(qtype, role, n_blocks, n_gqa, has_imatrix=imatrix is not None)
            ttype = Q[name]
            if note:
                fallbacks.append(f"{gguf_name}: {note}")
            if imatrix is not None and (name.endswith("_K") or name.startswith("IQ4") or name in WEIGHTED_TYPES):
                importance = imatrix.importance(gguf_name, tensor.shape[-1])
                if importance is None and block is not None:
                    missing.append(gguf_name)
        # the family's norm offset goes into the file: llama.cpp multiplies by the stored weight
        offset = FAMILIES[config.model_type].norm_offset if target in _NORMS else 0.0
        plan.append(_Planned(gguf_name, tensor, permute_heads, tuple(tensor.shape), ttype, offset, importance,
                             hf_name, block))
    if fallbacks:
        legacy = qtype in LEGACY_TYPES
        what = f"stored as f16: row length not a multiple of the {qtype.upper()} block" if legacy else \
            "stored in a fallback type: row length not a multiple of the type's block (256 for K types)"
        warnings.warn(f"{len(fallbacks)} tensors {what} ({', '.join(fallbacks[:4])}{', ...' if len(fallbacks) > 4 else ''})")
    if missing:
        warnings.warn(f"the importance matrix has no entry for {len(missing)} tensors ({', '.join(missing[:4])}"
                      f"{', ...' if len(missing) > 4 else ''}): quantised without it")
    return plan, ([] if qtype in LEGACY_TYPES else fallbacks)


def tensor_types(path) -> dict[str, str]:
    """gguf tensor name -> GGML type name of a GGUF file (what a mix chose)."""
    require_gguf()
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _nbytes(shape, ttype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    return int(np.prod(shape[:-1])) * shape[-1] // block * size


def _convert(t: _Planned) -> np.ndarray:
    data = t.tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if t.offset:
        data = data + np.float32(t.offset)
    if t.permute_heads is not None:
        data = _interleave_rope_rows(data, t.permute_heads)
    if t.ttype.name.startswith("IQ4"):
        from . import iquants

        return iquants.quantize(torch.from_numpy(np.ascontiguousarray(data)), t.ttype.name.lower(), t.importance)
    if t.ttype.name.endswith("_K"):
        from . import kquants

        return kquants.quantize(torch.from_numpy(np.ascontiguousarray(data)), t.ttype.name.lower(), t.importance)
    if t.ttype.name in LEGACY_QUANT_TYPES:
        return legacy_quants.quantize(np.ascontiguousarray(data), t.ttype.name, t.importance)
    return gguf.quants.quantize(data, t.ttype)  # F16, BF16, F32


def _interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from (first half, second half) to interleaved pairs.

    transformers' RoPE rotates dimension i of a head together with i + d/2; llama.cpp's "normal"
    RoPE rotates 2i with 2i+1. Moving row i to 2i and row i + d/2 to 2i+1 in both q and k makes
    llama.cpp rotate the same pairs; q.k sums over the same products in another order, so the
    attention scores are unchanged. Works for weights (rows, cols) and biases (rows,).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_hparams(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
