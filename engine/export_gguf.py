"""Write an in-memory Hugging Face causal LM (dense or depth-pruned) as a GGUF file for llama.cpp.

The file is built with the official ``gguf`` package: tensors renamed through a per-architecture
table, quantised with ``gguf.quants.quantize``, the tokenizer (byte-level BPE, or SentencePiece-style
BPE with byte fallback as Llama-1/2, Mistral v0.1 and Gemma have) and the architecture
hyper-parameters written as metadata. Tensors are quantised and written one at a time, so peak
memory is the model plus one converted tensor, and the file appears only when it is complete.
The tokenizer conversion lives in ``gguf_tokenizer.py``. The tables here name gguf's enums by
member name, so that this module imports without the optional ``gguf`` package.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .gguf_tokenizer import GGUFExportError, add_tokenizer, check_name, gguf_tokenizer_pre, require_gguf
from .models import FAMILIES
from .outputs import GGUF_MARK_KEY, WRITTEN_BY, atomic_path

try:
    import gguf
except ImportError:  # optional: export_gguf calls require_gguf first
    gguf = None

__all__ = ["ARCHITECTURES", "QTYPES", "GGUFExportError", "export_gguf", "gguf_tokenizer_pre"]

# The types of 2-D weights; qtype "x" is GGMLQuantizationType.X and general.file_type LlamaFileType.MOSTLY_X.
QTYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

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
                tokenizer_pre: str | None = None, force: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` to ``path`` as GGUF and return the path.

    ``qtype`` sets the type of the 2-D weight matrices. 1-D tensors (norms, biases) stay f32, as
    llama.cpp expects; a matrix whose row length is not a multiple of the quantisation block falls
    back to f16 (with a warning). For the 4/5-bit types the output head (``token_embd`` when the
    embeddings are tied) is stored as q8_0, as llama.cpp's own quantiser does, since the logits are
    the most quantisation-sensitive product. ``tokenizer_pre`` overrides the llama.cpp
    pre-tokenizer name detected from the tokenizer (pass the source file's value when the model
    came from GGUF: transformers does not keep it). An existing file is replaced only when
    depthcut wrote it (its ``depthcut.written_by`` key), or with ``force``.
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
    weight_type = gguf.GGMLQuantizationType[qtype.upper()]
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"]
    plan = _tensor_plan(model, spec, weight_type)

    with atomic_path(path, force=force) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[spec.arch]])
        try:
            _write(writer, tmp, config, tokenizer, plan, name or path.stem, file_type, tokenizer_pre, family_meta)
        finally:
            writer.close()
    return path


def _write(writer, tmp, config, tokenizer, plan, name, file_type, tokenizer_pre, family_meta) -> None:
    writer.add_string(GGUF_MARK_KEY, WRITTEN_BY)  # right after the architecture: see outputs.py
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_hparams(writer, config, file_type)
    for method, value in family_meta:
        getattr(writer, method)(value)
    add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
    # Header first, then one tensor at a time: only one converted tensor is ever in memory.
    for gguf_name, _, _, shape, ttype, _ in plan:
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, ttype), raw_dtype=ttype)
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor, permute_heads, _, ttype, offset in plan:
        writer.write_tensor_data(_convert(tensor, permute_heads, ttype, offset))


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


def _tensor_plan(model, spec: ArchSpec, weight_type: gguf.GGMLQuantizationType):
    """[(gguf name, tensor, heads to un-rotate or None, numpy shape, ggml type, offset)] in file order."""
    Q = gguf.GGMLQuantizationType
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[spec.arch]]}
    patterns = [(re.compile(re.escape(hf).replace(r"\{bid\}", r"(\d+)") + r"\.(weight|bias)$"), t)
                for hf, t in spec.tensors.items()]
    config = model.config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head_type = Q.Q8_0 if weight_type not in (Q.F16, Q.BF16, Q.Q8_0) else weight_type
    plan, fallbacks = [], []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for the output, like its converter writes it
        for pattern, target in patterns:
            if m := pattern.fullmatch(hf_name):
                break
        else:
            raise GGUFExportError(f"no GGUF tensor for {hf_name!r} in architecture {config.model_type!r}")
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[target]]
        if base not in allowed:
            raise GGUFExportError(f"llama.cpp's {spec.arch.lower()} has no tensor {base!r} (from {hf_name})")
        gguf_name = base.format(bid=m.group(1)) + "." + m.groups()[-1]
        permute_heads = None
        if spec.interleaved_rope and target in ("ATTN_Q", "ATTN_K"):
            permute_heads = config.num_attention_heads if target == "ATTN_Q" else config.num_key_value_heads
        if tensor.dim() == 1:
            ttype = Q.F32
        else:
            is_head = target == "OUTPUT" or (tied and target == "TOKEN_EMBD")
            ttype = head_type if is_head else weight_type
            if tensor.shape[-1] % gguf.GGML_QUANT_SIZES[ttype][0]:
                fallbacks.append(gguf_name)
                ttype = Q.F16
        # the family's norm offset goes into the file: llama.cpp multiplies by the stored weight
        offset = FAMILIES[config.model_type].norm_offset if target in _NORMS else 0.0
        plan.append((gguf_name, tensor, permute_heads, tuple(tensor.shape), ttype, offset))
    if fallbacks:
        warnings.warn(f"{len(fallbacks)} tensors stored as f16: row length not a multiple of the "
                      f"{weight_type.name} block ({', '.join(fallbacks[:4])}{', ...' if len(fallbacks) > 4 else ''})")
    return plan


def _nbytes(shape, ttype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    return int(np.prod(shape[:-1])) * shape[-1] // block * size


def _convert(tensor: torch.Tensor, permute_heads: int | None, ttype: gguf.GGMLQuantizationType,
             offset: float = 0.0) -> np.ndarray:
    data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if offset:
        data = data + np.float32(offset)
    if permute_heads is not None:
        data = _interleave_rope_rows(data, permute_heads)
    return gguf.quants.quantize(data, ttype)


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
