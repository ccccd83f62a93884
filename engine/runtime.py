"""Fast runtime for dense or depth-pruned decoder LLMs of every supported family.

Hugging Face ``generate`` spends most of a small-batch decode step in Python and
per-layer cache bookkeeping, so deleting blocks barely shows up in tokens/s. This
runtime keeps only what a decode step needs: merged QKV and gate/up weights, RoPE
tables computed once, a static KV cache per (batch bucket, max length), and on CUDA
a decode step captured as one CUDA graph (per batch bucket) over the fused Triton
kernels of ``depthcut.kernels.decode``. On the CPU the same step runs over their C++
twins in ``depthcut._C`` (a handful of calls per block instead of dozens of ATen ops), with
fp32 activations over fp32, bf16 or fp16 weights that the decode GEMV widens in
registers. Blocks are a plain list, so a pruned model is just a shorter one.

One block code serves every family; what differs is data on the runtime and its blocks:
which RMSNorms a block has (before and/or after each sublayer, q/k norms per head or
over all heads, Gemma's ``1 + w`` folded into the weights), the MLP activation (SwiGLU
or GeGLU), attention and final logit softcaps, embedding/residual/logit multipliers,
and one RoPE table per layer type (Gemma3's local and global layers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._ext import HAS_EXT
from .calibration import check_token_ids
from .errors import DepthcutError
from .ops import decode_linear as linear
from .ops import decode_ops
from .models import FAMILIES, ModelAdapter

SUPPORTED_FAMILIES = tuple(FAMILIES)
_GEMMA_NORM = ("gemma", "gemma2", "gemma3_text")  # RMSNorm scales by (1 + w)
_ACTIVATIONS = {"silu": False, "gelu_pytorch_tanh": True}  # MLP activation -> GeGLU (else SwiGLU)
_ROPE_FROM_MODEL = ("linear", "llama3", "yarn")  # static inv_freq: reuse HF's computation
_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def default_weight_dtype(model, device=None) -> torch.dtype:
    """Weight dtype for a runtime when the user names none. On the CPU with the compiled
    ops: fp16, when every weight fits it. A CPU step streams all weights per token, fp16
    halves the bytes of fp32, and the arithmetic stays fp32 (11-bit weights: SmolLM2's
    greedy tokens equal the fp32 model's; bf16's 8 bits changed them). Elsewhere, and
    for weights beyond fp16's range, the model's own dtype."""
    dtype = next(model.parameters()).dtype
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cpu" or not HAS_EXT or dtype == torch.float16:
        return dtype
    big = max(float(p.detach().abs().max()) for p in model.parameters() if p.numel())
    return torch.float16 if big < torch.finfo(torch.float16).max else dtype


@dataclass
class _Block:
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


class _Session:
    """Static state for one batch bucket: KV cache, positions, decode graph."""

    def __init__(self, rt: "Runtime", batch: int, max_len: int):
        kv = (len(rt.blocks), batch, rt.n_kv, max_len, rt.head_dim)
        self.batch, self.max_len = batch, max_len
        self.k = torch.zeros(kv, dtype=rt.act_dtype, device=rt.device)
        self.v = torch.zeros(kv, dtype=rt.act_dtype, device=rt.device)
        self.start = torch.zeros(batch, dtype=torch.int32, device=rt.device)  # left-pad count
        self.cache_pos = torch.zeros(1, dtype=torch.int32, device=rt.device)  # slot written next
        self.pos = torch.zeros(batch, dtype=torch.long, device=rt.device)  # RoPE position
        self.tok = torch.zeros(batch, dtype=torch.long, device=rt.device)
        self.cos, self.sin = rt._rope_tables(max_len)  # [tables, max_len, head_dim]
        self.graph = None
        self.logits = None


class Runtime:
    """A compact decoder built from a loaded HF CausalLM; see :meth:`from_hf`."""

    def __init__(self, *, embed, blocks, norm, lm_head, n_q, n_kv, head_dim, eps, scale, ropes, act_dtype,
                 gelu=False, embed_scale=1.0, residual_scale=1.0, logit_divisor=1.0, logit_softcap=None,
                 use_cuda_graph=True):
        self.embed, self.blocks, self.norm, self.lm_head = embed, blocks, norm, lm_head
        self.n_q, self.n_kv, self.head_dim = n_q, n_kv, head_dim
        self.eps, self.scale = eps, scale
        self.ropes = ropes  # [(inv_freq, attention scaling)], one per RoPE table
        self.gelu = gelu  # GeGLU (Gemma) instead of SwiGLU
        self.embed_scale = embed_scale  # Gemma: sqrt(hidden); Granite: embedding_multiplier
        self.residual_scale = residual_scale  # Granite: sublayer outputs scaled before the residual add
        self.logit_divisor, self.logit_softcap = logit_divisor, logit_softcap  # Granite; Gemma2/3
        self.device = embed.device
        self.dtype = embed.dtype
        self.act_dtype = act_dtype
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self._add_rmsnorm, self._rope_cache, self._attention, self._swiglu = decode_ops(self.device, act_dtype)
        self._sessions: dict[int, _Session] = {}
        self._pool = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_hf(cls, model, dtype=None, device=None, act_dtype=None, use_cuda_graph=True):
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
        offset = 1.0 if cfg.model_type in _GEMMA_NORM else 0.0

        def t(x, dt=dtype):
            return None if x is None else x.detach().to(device=device, dtype=dt).contiguous()

        def norm(mod):
            """Norm weights in the activation dtype (tiny, and closer to HF fp32), with
            Gemma's offset folded in."""
            return None if mod is None else t(mod.weight.detach().float() + offset, act_dtype)

        def cat(mods, attr):
            parts = [getattr(m, attr) for m in mods]
            return None if parts[0] is None else t(torch.cat([p.detach() for p in parts]))

        n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
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
            blocks.append(_Block(
                wqkv=cat(qkv, "weight"), bqkv=cat(qkv, "bias"),
                wo=t(a.o_proj.weight), bo=t(a.o_proj.bias),
                wgu=cat(gu, "weight"), bgu=cat(gu, "bias"),
                wd=t(m.down_proj.weight), bd=t(m.down_proj.bias),
                ln1=norm(ln1), ln2=norm(ln2), post_attn=norm(post_attn), post_mlp=norm(post_mlp),
                q_norm=qn if per_head else None, k_norm=kn if per_head else None,
                q_norm_all=None if per_head else qn, k_norm_all=None if per_head else kn,
                window=int(window) if window else None,
                # Gemma3 keeps attn_logit_softcapping in its config but never applies it
                softcap=getattr(a, "attn_logit_softcapping", None) if cfg.model_type == "gemma2" else None,
                rope=rope_of[i]))
        emb = base.embed_tokens
        embed = t(emb.weight)
        head = model.lm_head.weight
        lm_head = embed if head.data_ptr() == emb.weight.data_ptr() else t(head)
        # Gemma multiplies by sqrt(hidden) cast to the weight dtype, Granite by its multiplier
        embed_scale = float(emb.embed_scale.to(dtype)) if hasattr(emb, "embed_scale") \
            else float(getattr(cfg, "embedding_multiplier", 1.0))
        adapter = ModelAdapter(model)
        return cls(embed=embed, blocks=blocks, norm=norm(base.norm), lm_head=lm_head,
                   n_q=n_q, n_kv=n_kv, head_dim=head_dim,
                   eps=cfg.rms_norm_eps, scale=getattr(attn0, "scaling", head_dim ** -0.5),
                   ropes=[(f.to(device), scaling) for f, scaling in ropes], act_dtype=act_dtype,
                   gelu=_ACTIVATIONS[act], embed_scale=embed_scale,
                   residual_scale=float(getattr(cfg, "residual_multiplier", 1.0)),
                   logit_divisor=adapter.logit_divisor, logit_softcap=adapter.logit_softcap,
                   use_cuda_graph=use_cuda_graph)

    def _rope_tables(self, n):
        """cos/sin [tables, n, head_dim] in fp32, computed like HF's rotary embedding."""
        p = torch.arange(n, device=self.device, dtype=torch.float32)[:, None]
        emb = torch.stack([torch.cat((p * f, p * f), dim=-1) for f, _ in self.ropes])
        scaling = torch.tensor([sc for _, sc in self.ropes], device=self.device)[:, None, None]
        return emb.cos() * scaling, emb.sin() * scaling

    # ------------------------------------------------------------------ pieces of a block
    def _embed(self, ids):
        x = F.embedding(ids, self.embed)
        if self.embed_scale != 1.0:  # in the weight dtype, as HF does
            x = x * self.embed_scale
        return x.to(self.act_dtype)

    def _rms(self, x, w):
        """RMSNorm through the op table (fused: Triton on CUDA, C++ on the CPU)."""
        return self._add_rmsnorm(x, None, w, self.eps)[0]

    def _add_norm(self, x, res, w):
        """Residual add fused with the next pre-norm: (normed input, residual stream).
        Without a pre-norm (OLMo2) the sublayer reads the residual stream itself."""
        if w is None:
            h = x if res is None else x + res
            return h, h
        return self._add_rmsnorm(x, res, w, self.eps)

    def _post(self, x, w):
        """A sublayer output as it joins the residual stream: its post-norm (Gemma2/3,
        OLMo2) and Granite's residual multiplier, where the family has them."""
        if w is not None:
            x = self._rms(x, w)
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        return x

    def _qk_norm_all(self, qkv, b):
        """OLMo2: RMSNorm over all q heads and over all k heads of merged QKV [..., W]."""
        nq, nk = self.n_q * self.head_dim, self.n_kv * self.head_dim
        q, k, v = qkv.split([nq, nk, nk], dim=-1)
        return torch.cat((self._rms(q, b.q_norm_all), self._rms(k, b.k_norm_all), v), dim=-1)

    def _logits(self, h):
        """The head, then Granite's logit divisor and Gemma's final softcap; fp32."""
        x = linear(h, self.lm_head)
        if self.logit_divisor != 1.0:
            x = x / self.logit_divisor
        if self.logit_softcap:
            x = torch.tanh(x / self.logit_softcap) * self.logit_softcap
        return x.float()

    # ------------------------------------------------------------------ forward passes
    def _session(self, batch, max_len):
        s = self._sessions.get(batch)
        if s is None or s.max_len < max_len:
            self._sessions.pop(batch, None)
            size = -(-max_len // 128) * 128
            try:
                s = _Session(self, batch, size)
            except torch.cuda.OutOfMemoryError:  # other buckets' caches may be what is in the way
                self.reset()
                torch.cuda.empty_cache()
                s = _Session(self, batch, size)
            self._sessions[batch] = s
        return s

    def _prefill(self, s, ids, mask, all_logits=False):
        """Full-sequence pass over the left-padded prompt; fills the cache slots [0, T)."""
        B, T = ids.shape
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        i = torch.arange(T, device=ids.device)
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)
        causal = (i[None, :] <= i[:, None])[None] & mask.bool()[:, None, :] | eye  # fully padded rows stay finite
        ropes = [(c[pos].to(self.act_dtype)[:, None], sn[pos].to(self.act_dtype)[:, None])
                 for c, sn in zip(s.cos, s.sin)]
        rep = self.n_q // self.n_kv
        x = self._embed(ids)
        for li, b in enumerate(self.blocks):
            h = x if b.ln1 is None else self._rms(x, b.ln1)
            qkv = linear(h, b.wqkv, b.bqkv)
            if b.q_norm_all is not None:
                qkv = self._qk_norm_all(qkv, b)
            qkv = qkv.view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=1)
            if b.q_norm is not None:
                q = self._rms(q, b.q_norm)
                k = self._rms(k, b.k_norm)
            cos, sin = ropes[b.rope]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            s.k[li, :, :, :T] = k
            s.v[li, :, :, :T] = v
            allowed = causal
            if b.window:
                allowed = causal & (i[None, :] > i[:, None] - b.window)[None] | eye
            o = _prefill_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), allowed,
                                   self.scale, b.softcap)
            x = x + self._post(linear(o.transpose(1, 2).reshape(B, T, -1), b.wo, b.bo), b.post_attn)
            h = x if b.ln2 is None else self._rms(x, b.ln2)
            x = x + self._post(linear(self._swiglu(linear(h, b.wgu, b.bgu), self.gelu), b.wd, b.bd), b.post_mlp)
        x = self._rms(x if all_logits else x[:, -1], self.norm)
        s.cache_pos.fill_(T)
        s.pos.copy_(pos[:, -1] + 1)
        s.start.copy_(T - mask.sum(-1))
        return self._logits(x)

    def _step(self, s):
        """One decode step for every row of the session; logits [B, vocab] fp32."""
        x = self._embed(s.tok)
        res = None
        for li, b in enumerate(self.blocks):
            h, res = self._add_norm(x, res, b.ln1)
            qkv = linear(h, b.wqkv, b.bqkv)
            if b.q_norm_all is not None:
                qkv = self._qk_norm_all(qkv, b)
            q = self._rope_cache(qkv, s.cos[b.rope], s.sin[b.rope], s.pos, s.k[li], s.v[li], s.cache_pos,
                                 self.n_q, self.n_kv, b.q_norm, b.k_norm, self.eps)
            o = self._attention(q, s.k[li], s.v[li], s.start, s.cache_pos, b.window, self.scale, b.softcap)
            x = self._post(linear(o.reshape(s.batch, -1), b.wo, b.bo), b.post_attn)
            h, res = self._add_norm(x, res, b.ln2)
            x = self._post(linear(self._swiglu(linear(h, b.wgu, b.bgu), self.gelu), b.wd, b.bd), b.post_mlp)
        return self._logits(self._add_rmsnorm(x, res, self.norm, self.eps)[0])

    def _decode(self, s):
        if self.use_cuda_graph:
            if s.graph is None:
                self._capture(s)
            s.graph.replay()
            logits = s.logits
        else:
            logits = self._step(s)
        s.cache_pos += 1  # outside the graph: warm-up and capture never move the state
        s.pos += 1
        return logits

    def _capture(self, s):
        """Warm up (Triton compiles) on a side stream, then capture one decode step. The
        step only writes cache slot ``cache_pos``, which the first real step rewrites."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(s)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph, pool=self._pool):
            s.logits = self._step(s)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None):
        """Logits for every prompt position [B, T, vocab] (fp32), for checks against HF."""
        ids, mask = _prep(input_ids, attention_mask, self.device, self.embed.shape[0])
        return self._prefill(self._session(ids.shape[0], ids.shape[1]), ids, mask, all_logits=True)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_k=None, top_p=None, stop_token_ids=None, pad_token_id=None,
                 generator=None, check_every=16):
        """Prefill then decode ``max_new_tokens`` for a left-padded batch [B, T].

        Sampling stays on the device; finished rows are masked to ``pad_token_id`` and the
        host looks at the stop flags only every ``check_every`` steps. Returns
        (tokens [B, n_new] on the runtime device, stats dict)."""
        check_generation(max_new_tokens, do_sample, temperature, top_k, top_p)
        ids, mask = _prep(input_ids, attention_mask, self.device, self.embed.shape[0])
        B, T = ids.shape
        bucket = B
        if self.use_cuda_graph:  # one graph per bucket; extra rows repeat the last prompt
            bucket = next((c for c in _BUCKETS if c >= B), B)
            ids = torch.cat([ids, ids[-1:].expand(bucket - B, T)])
            mask = torch.cat([mask, mask[-1:].expand(bucket - B, T)])
        s = self._session(bucket, T + max_new_tokens)
        stops = None
        if stop_token_ids:
            stops = torch.tensor(list(stop_token_ids), device=self.device)
            pad_token_id = stop_token_ids[0] if pad_token_id is None else pad_token_id
        out = torch.full((bucket, max_new_tokens), pad_token_id or 0, dtype=torch.long, device=self.device)
        done = torch.zeros(bucket, dtype=torch.bool, device=self.device)
        sample = _sampler(do_sample, temperature, top_k, top_p, generator)

        _sync(self.device)
        t0 = time.perf_counter()
        logits = self._prefill(s, ids, mask)
        nxt = sample(logits)
        _sync(self.device)
        t1 = time.perf_counter()
        n = 0
        while True:
            if stops is not None:
                nxt = torch.where(done, pad_token_id, nxt)
                done |= torch.isin(nxt, stops)
            out[:, n] = nxt
            n += 1
            if n == max_new_tokens:
                break
            if stops is not None and n % check_every == 0 and bool(done[:B].all()):
                break
            s.tok.copy_(nxt)
            logits = self._decode(s)
            nxt = sample(logits)
        _sync(self.device)
        t2 = time.perf_counter()
        if not bool(torch.isfinite(logits[:B]).all()):
            raise RuntimeError(f"non-finite logits with {self.dtype} weights (fp16 overflow?): "
                               "use bf16 or fp32")
        steps = n - 1  # decode forwards actually run
        if stops is not None:  # drop trailing columns where every row had already stopped
            hit = torch.isin(out[:B, :n], stops)
            n = int(torch.where(hit.any(1), hit.int().argmax(1) + 1, n).max())
        stats = dict(batch=B, prompt_tokens=T, new_tokens=n, prefill_s=t1 - t0, decode_s=t2 - t1,
                     decode_tok_s=B * steps / (t2 - t1) if steps and t2 > t1 else float("nan"))
        return out[:B, :n], stats

    def memory_bytes(self):
        """Bytes held by the runtime: weights (tied head counted once) and KV caches."""
        ts = {t.data_ptr(): t for b in self.blocks for t in vars(b).values() if isinstance(t, torch.Tensor)}
        ts.update({t.data_ptr(): t for t in (self.embed, self.norm, self.lm_head)})
        ts.update({t.data_ptr(): t for s in self._sessions.values() for t in (s.k, s.v)})
        return sum(t.numel() * t.element_size() for t in ts.values())

    def reset(self):
        """Free every cached session (KV caches and graphs)."""
        self._sessions.clear()
        self._pool = None


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _norm_roles(layer):
    """A decoder layer's RMSNorms as (before attention, before MLP, after attention, after
    MLP). ``post_attention_layernorm`` is the pre-MLP norm of Llama-style blocks but the
    attention-output norm of blocks that also norm the MLP output (Gemma2/3, OLMo2)."""
    pre_attn = getattr(layer, "input_layernorm", None)
    post_mlp = getattr(layer, "post_feedforward_layernorm", None)
    if post_mlp is None:
        return pre_attn, layer.post_attention_layernorm, None, None
    return pre_attn, getattr(layer, "pre_feedforward_layernorm", None), layer.post_attention_layernorm, post_mlp


def _prefill_attention(q, k, v, allowed, scale, softcap):
    """Attention over [B, H, T, D] with a boolean mask [B, T, T]; with ``softcap`` the
    scaled logits are capped like HF's eager Gemma2 code (SDPA cannot)."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    s = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


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


def check_generation(max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None) -> None:
    """Refuse settings that would crash generation or silently sample from nonsense."""
    checks = [
        (max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {max_new_tokens}"),
        (not do_sample or 0 < temperature < float("inf"),
         f"--temperature must be a positive number with --do-sample, got {temperature}"),
        (top_k is None or top_k >= 1, f"--top-k must be at least 1, got {top_k}"),
        (top_p is None or 0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DepthcutError(message)


def _prep(input_ids, attention_mask, device, vocab_size):
    ids = torch.as_tensor(input_ids, device=device).long()
    if ids.dim() == 1:
        ids = ids[None]
    check_token_ids(ids, vocab_size=vocab_size)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, device=device).long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (zeros only before the prompt)")
    return ids, mask


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sampler(do_sample, temperature, top_k, top_p, generator):
    """Greedy argmax, or HF-order temperature -> top-k -> top-p, sampled by the
    exponential race argmax(p / E) so no host sync (multinomial) is needed."""
    if not do_sample:
        return lambda logits: logits.argmax(-1)

    def sample(logits):
        logits = logits / max(temperature, 1e-5)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, idx = torch.sort(logits, descending=False)
            drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[:, -1] = False
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, idx, drop), float("-inf"))
        probs = logits.softmax(-1)
        e = torch.empty_like(probs).exponential_(1.0, generator=generator)
        return (probs / e).argmax(-1)

    return sample
