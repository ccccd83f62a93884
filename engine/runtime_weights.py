"""The runtime's weights: per-block tensors converted once from a loaded HF CausalLM.

Merged QKV and gate/up matrices (one GEMV each in a decode step), norm weights in the
activation dtype with Gemma's ``1 + w`` folded in, and every family difference held as
data (docs/DESIGN.md, "Evaluation and speed protocols"): which RMSNorms a block has, the
MLP activation, softcaps, multipliers and one RoPE table per layer type. Blocks are a
plain tuple, so a pruned model is just a shorter one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .models import FAMILIES, ModelAdapter

SUPPORTED_FAMILIES = tuple(FAMILIES)
_ACTIVATIONS = {"silu": False, "gelu_pytorch_tanh": True}  # MLP activation -> GeGLU (else SwiGLU)
_ROPE_FROM_MODEL = ("linear", "llama3", "yarn")  # static inv_freq: reuse HF's computation


@dataclass(frozen=True, eq=False)
class BlockWeights:
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor  # [gate; up]
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    ln1: torch.Tensor | None  # norm before attention (OLMo2: none)
    ln2: torch.Tensor | None  # norm before the MLP (OLMo2: none)
    post_attn: torch.Tensor | None  # norm of the attention output before its residual add (Gemma2/3, OLMo2)
    post_mlp: torch.Tensor | None  # norm of the MLP output before its residual add (Gemma2/3, OLMo2)
    q_norm: torch.Tensor | None  # per-head q/k norms [D] (Qwen3, Gemma3), fused into RoPE
    k_norm: torch.Tensor | None
    q_norm_all: torch.Tensor | None  # OLMo2: q/k norms over all heads [Hq*D], [Hkv*D], before the head split
    k_norm_all: torch.Tensor | None
    window: int | None
    softcap: float | None  # attention logits -> softcap * tanh(logits / softcap) (Gemma2)
    rope: int  # index of the block's cos/sin table (Gemma3: local and global layers differ)


@dataclass(frozen=True, eq=False)
class Weights:
    """Everything a forward pass reads; see :meth:`from_hf`."""
    embed: torch.Tensor
    blocks: tuple[BlockWeights, ...]
    norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when tied
    ropes: tuple[tuple[torch.Tensor, float], ...]  # (inv_freq, attention scaling), one per RoPE table
    n_q: int
    n_kv: int
    head_dim: int
    eps: float
    scale: float  # attention logit scale
    act_dtype: torch.dtype  # residual stream, KV cache and attention
    gelu: bool = False  # GeGLU (Gemma) instead of SwiGLU
    embed_scale: float = 1.0  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    residual_scale: float = 1.0  # Granite: sublayer outputs scaled before the residual add
    logit_divisor: float = 1.0  # Granite
    logit_softcap: float | None = None  # Gemma2/3

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @classmethod
    def from_hf(cls, model, dtype=None, device=None, act_dtype=None) -> "Weights":
        """Copy a HF CausalLM of a supported family (dense or pruned) into merged tensors.
        ``dtype`` is the weight dtype; ``act_dtype`` (default: ``dtype`` on CUDA, fp32 on
        CPU) is the residual stream, KV cache and attention dtype."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type {cfg.model_type!r} is not supported by the runtime; "
                             f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        if act not in _ACTIVATIONS:
            raise ValueError(f"MLP activation {act!r} not supported ({', '.join(_ACTIVATIONS)} only)")
        base = model.model
        dtype = dtype or next(model.parameters()).dtype
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if act_dtype is None:
            act_dtype = dtype if device.type == "cuda" else torch.float32
        family = FAMILIES[cfg.model_type]
        offset = family.norm_offset

        def t(x, dt=dtype):
            return None if x is None else x.detach().to(device=device, dtype=dt).contiguous()

        def norm(mod):
            """Norm weights in the activation dtype (tiny, and closer to HF fp32), with
            Gemma's offset folded in."""
            return None if mod is None else t(mod.weight.detach().float() + offset, act_dtype)

        def cat(mods, attr):
            parts = [getattr(m, attr) for m in mods]
            return None if parts[0] is None else t(torch.cat([p.detach() for p in parts]))

        attn0 = base.layers[0].self_attn if len(base.layers) else None
        head_dim = getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None) \
            or cfg.hidden_size // cfg.num_attention_heads
        ropes, rope_of = _ropes(model, head_dim)
        layer_types = getattr(cfg, "layer_types", None)
        blocks = []
        for i, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            qkv = (a.qkv_proj,) if hasattr(a, "qkv_proj") else (a.q_proj, a.k_proj, a.v_proj)  # Phi3: merged
            gu = (m.gate_up_proj,) if hasattr(m, "gate_up_proj") else (m.gate_proj, m.up_proj)  # Phi3: [gate; up]
            ln1, ln2, post_attn, post_mlp = _norm_roles(layer)
            qn, kn = norm(getattr(a, "q_norm", None)), norm(getattr(a, "k_norm", None))
            per_head = qn is not None and qn.numel() == head_dim  # else OLMo2's, over all heads
            if layer_types:
                window = cfg.sliding_window if layer_types[i] == "sliding_attention" else None
            else:
                window = getattr(cfg, "sliding_window", None)
            blocks.append(BlockWeights(
                wqkv=cat(qkv, "weight"), bqkv=cat(qkv, "bias"),
                wo=t(a.o_proj.weight), bo=t(a.o_proj.bias),
                wgu=cat(gu, "weight"), bgu=cat(gu, "bias"),
                wd=t(m.down_proj.weight), bd=t(m.down_proj.bias),
                ln1=norm(ln1), ln2=norm(ln2), post_attn=norm(post_attn), post_mlp=norm(post_mlp),
                q_norm=qn if per_head else None, k_norm=kn if per_head else None,
                q_norm_all=None if per_head else qn, k_norm_all=None if per_head else kn,
                window=int(window) if window else None,
                softcap=getattr(a, family.attn_softcap_attr, None) if family.attn_softcap_attr else None,
                rope=rope_of[i]))
        emb = base.embed_tokens
        embed = t(emb.weight)
        head = model.lm_head.weight
        adapter = ModelAdapter(model)
        return cls(
            embed=embed, blocks=tuple(blocks), norm=norm(base.norm),
            lm_head=embed if head.data_ptr() == emb.weight.data_ptr() else t(head),
            ropes=tuple((f.to(device), scaling) for f, scaling in ropes),
            n_q=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads, head_dim=head_dim,
            eps=cfg.rms_norm_eps, scale=getattr(attn0, "scaling", head_dim ** -0.5), act_dtype=act_dtype,
            gelu=_ACTIVATIONS[act],
            # Gemma multiplies by sqrt(hidden) cast to the weight dtype, Granite by its multiplier
            embed_scale=float(emb.embed_scale.to(dtype)) if hasattr(emb, "embed_scale")
            else float(getattr(cfg, "embedding_multiplier", 1.0)),
            residual_scale=float(getattr(cfg, "residual_multiplier", 1.0)),
            logit_divisor=adapter.logit_divisor, logit_softcap=adapter.logit_softcap)

    def rope_tables(self, n):
        """cos/sin [tables, n, head_dim] in fp32, computed like HF's rotary embedding."""
        p = torch.arange(n, device=self.device, dtype=torch.float32)[:, None]
        emb = torch.stack([torch.cat((p * f, p * f), dim=-1) for f, _ in self.ropes])
        scaling = torch.tensor([sc for _, sc in self.ropes], device=self.device)[:, None, None]
        return emb.cos() * scaling, emb.sin() * scaling

    def tensors(self):
        """Every weight tensor once (a tied head is the embedding)."""
        ts = {t.data_ptr(): t for b in self.blocks for f in dataclasses.fields(b)
              if isinstance(t := getattr(b, f.name), torch.Tensor)}
        ts.update({t.data_ptr(): t for t in (self.embed, self.norm, self.lm_head)})
        return list(ts.values())


def _norm_roles(layer):
    """A decoder layer's RMSNorms as (before attention, before MLP, after attention, after
    MLP). ``post_attention_layernorm`` is the pre-MLP norm of Llama-style blocks but the
    attention-output norm of blocks that also norm the MLP output (Gemma2/3, OLMo2)."""
    pre_attn = getattr(layer, "input_layernorm", None)
    post_mlp = getattr(layer, "post_feedforward_layernorm", None)
    if post_mlp is None:
        return pre_attn, layer.post_attention_layernorm, None, None
    return pre_attn, getattr(layer, "pre_feedforward_layernorm", None), layer.post_attention_layernorm, post_mlp


def _ropes(model, head_dim):
    """The RoPE tables to build, [(inv_freq, attention scaling)], and each block's table:
    one table, or one per layer type when ``rope_parameters`` is keyed by it (Gemma3)."""
    cfg = model.config
    rp = getattr(cfg, "rope_parameters", None) or {}
    if not any(isinstance(v, dict) for v in rp.values()):
        return [_inv_freq(model, rp, head_dim)], [0] * len(model.model.layers)
    layer_types = cfg.layer_types[:len(model.model.layers)]
    types = sorted(set(layer_types))
    return [_inv_freq(model, rp[lt], head_dim, lt) for lt in types], [types.index(lt) for lt in layer_types]


def _inv_freq(model, rp, head_dim, layer_type=None):
    cfg = model.config
    if (rp.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported by the runtime")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    if rope_type in _ROPE_FROM_MODEL:  # HF's rotary module holds it (per layer type: prefixed)
        rot = model.model.rotary_emb
        prefix = f"{layer_type}_" if layer_type else ""
        return getattr(rot, prefix + "inv_freq").detach().float(), float(getattr(rot, prefix + "attention_scaling"))
    raise ValueError(f"RoPE type {rope_type!r} is not implemented by the runtime "
                     f"(supported: default, {', '.join(_ROPE_FROM_MODEL)})")
