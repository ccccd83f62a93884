"""Fast runtime for dense or depth-pruned Llama-family decoders.

Hugging Face ``generate`` spends most of a small-batch decode step in Python and
per-layer cache bookkeeping, so deleting blocks barely shows up in tokens/s. This
runtime keeps only what a decode step needs: merged QKV and gate/up weights, RoPE
tables computed once, a static KV cache per (batch bucket, max length), and on CUDA
a decode step captured as one CUDA graph (per batch bucket) over the fused Triton
kernels of ``triton_kernels.decode``. On the CPU, where a step costs per-op dispatch
plus weight bandwidth, a lean step with the fewest PyTorch calls runs instead, with
optional bf16/fp16 weights over an fp32 residual stream. Blocks are a plain list, so a
pruned model is just a shorter one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_FROM_MODEL = ("linear", "llama3", "yarn")  # static inv_freq: reuse HF's computation
_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _ops(device: torch.device):
    """Fused Triton kernels on CUDA, their references elsewhere (same signatures)."""
    from triton_kernels import decode as K

    if device.type == "cuda":
        return K.add_rmsnorm, K.rope_cache_write, K.decode_attention, K.swiglu
    return K.add_rmsnorm_ref, K.rope_cache_write_ref, K.decode_attention_ref, K.swiglu_ref


def _lin(x, w, b=None):
    """Linear in the weights' dtype, result back in the activation dtype (bf16 weights
    with an fp32 residual stream on CPU keeps greedy tokens closer to fp32)."""
    return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def _lin_wide(x, w, b=None):
    """Prefill on the CPU with fp16 weights: many-row fp16 GEMMs are slow there (no
    native fp16 arithmetic), so upcast the weight and multiply in the activation dtype."""
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


@dataclass
class _Block:
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    window: int | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D]: q_norm rows then k_norm rows (CPU step)


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
        self.cos, self.sin = rt._rope_tables(max_len)
        self.graph = None
        self.logits = None


class Runtime:
    """A compact decoder built from a loaded HF CausalLM; see :meth:`from_hf`."""

    def __init__(self, *, embed, blocks, norm, lm_head, n_q, n_kv, head_dim, eps, scale,
                 inv_freq, rope_scaling, act_dtype, use_cuda_graph=True):
        self.embed, self.blocks, self.norm, self.lm_head = embed, blocks, norm, lm_head
        self.n_q, self.n_kv, self.head_dim = n_q, n_kv, head_dim
        self.eps, self.scale = eps, scale
        self.inv_freq, self.rope_scaling = inv_freq, rope_scaling
        self.device = embed.device
        self.dtype = embed.dtype
        self.act_dtype = act_dtype
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self._add_rmsnorm, self._rope_cache, self._attention, self._swiglu = _ops(self.device)
        self._qk_scale = torch.ones(n_q + n_kv, 1, dtype=act_dtype, device=self.device)
        self._qk_scale[:n_q] = scale
        self._sessions: dict[int, _Session] = {}
        self._pool = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_hf(cls, model, dtype=None, device=None, act_dtype=None, use_cuda_graph=True):
        """Copy a HF Llama/Mistral/Qwen2/Qwen3 CausalLM (dense or pruned) into merged
        tensors. ``dtype`` is the weight dtype; ``act_dtype`` (default: ``dtype`` on CUDA,
        fp32 on CPU) is the residual stream, KV cache and attention dtype."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"model_type {cfg.model_type!r} is not supported by the runtime; "
                             f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} not supported (SwiGLU/silu only)")
        if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        base = model.model
        dtype = dtype or next(model.parameters()).dtype
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if act_dtype is None:
            act_dtype = dtype if device.type == "cuda" else torch.float32

        def t(x, dt=dtype):
            return None if x is None else x.detach().to(device=device, dtype=dt).contiguous()

        def norm(x):  # norm weights live in the activation dtype (tiny, and closer to HF fp32)
            return t(x, act_dtype)

        def cat(mods, attr):
            parts = [getattr(m, attr) for m in mods]
            return None if parts[0] is None else t(torch.cat([p.detach() for p in parts]))

        n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        blocks = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            window = cfg.sliding_window if cfg.model_type == "mistral" else getattr(a, "sliding_window", None)
            blocks.append(_Block(
                wqkv=cat((a.q_proj, a.k_proj, a.v_proj), "weight"),
                bqkv=cat((a.q_proj, a.k_proj, a.v_proj), "bias"),
                wo=t(a.o_proj.weight), bo=t(a.o_proj.bias),
                wgu=cat((m.gate_proj, m.up_proj), "weight"), bgu=cat((m.gate_proj, m.up_proj), "bias"),
                wd=t(m.down_proj.weight), bd=t(m.down_proj.bias),
                ln1=norm(layer.input_layernorm.weight), ln2=norm(layer.post_attention_layernorm.weight),
                q_norm=norm(a.q_norm.weight) if hasattr(a, "q_norm") else None,
                k_norm=norm(a.k_norm.weight) if hasattr(a, "k_norm") else None,
                qk_norm=norm(torch.cat((a.q_norm.weight.expand(n_q, -1), a.k_norm.weight.expand(n_kv, -1))))
                if hasattr(a, "q_norm") else None,
                window=int(window) if window else None))
        embed = t(base.embed_tokens.weight)
        head = model.lm_head.weight
        lm_head = embed if head.data_ptr() == base.embed_tokens.weight.data_ptr() else t(head)
        attn0 = base.layers[0].self_attn if len(base.layers) else None
        head_dim = getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None) \
            or cfg.hidden_size // cfg.num_attention_heads
        inv_freq, rope_scaling = _inv_freq(model, head_dim)
        return cls(embed=embed, blocks=blocks, norm=norm(base.norm.weight), lm_head=lm_head,
                   n_q=n_q, n_kv=n_kv, head_dim=head_dim,
                   eps=cfg.rms_norm_eps, scale=getattr(attn0, "scaling", head_dim ** -0.5),
                   inv_freq=inv_freq.to(device), rope_scaling=rope_scaling, act_dtype=act_dtype,
                   use_cuda_graph=use_cuda_graph)

    @classmethod
    def from_pretrained(cls, path, gguf_file=None, dtype=None, device=None, **kw):
        """Load a folder (or a GGUF file inside it) with transformers, then :meth:`from_hf`."""
        from transformers import AutoModelForCausalLM

        load_dtype = torch.float32 if gguf_file else (dtype or "auto")
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=load_dtype)
        return cls.from_hf(model, dtype=dtype, device=device, **kw)

    def _rope_tables(self, n):
        """cos/sin [n, head_dim] in fp32, computed like HF's rotary embedding."""
        f = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((f, f), dim=-1)
        return (emb.cos() * self.rope_scaling).contiguous(), (emb.sin() * self.rope_scaling).contiguous()

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
        causal = (i[None, :] <= i[:, None])[None] & mask.bool()[:, None, :]
        causal |= torch.eye(T, dtype=torch.bool, device=ids.device)  # fully padded rows stay finite
        cos, sin = s.cos[pos].to(self.act_dtype)[:, None], s.sin[pos].to(self.act_dtype)[:, None]
        rep = self.n_q // self.n_kv
        lin = _lin_wide if self.device.type == "cpu" and self.dtype == torch.float16 else _lin
        x = F.embedding(ids, self.embed).to(self.act_dtype)
        for li, b in enumerate(self.blocks):
            h = self._add_rmsnorm(x, None, b.ln1, self.eps)[0]
            qkv = lin(h, b.wqkv, b.bqkv).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k, v = qkv.split([self.n_q, self.n_kv, self.n_kv], dim=1)
            if b.q_norm is not None:
                q = self._add_rmsnorm(q, None, b.q_norm, self.eps)[0]
                k = self._add_rmsnorm(k, None, b.k_norm, self.eps)[0]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            s.k[li, :, :, :T] = k
            s.v[li, :, :, :T] = v
            allowed = causal
            if b.window:
                allowed = causal & (i[None, :] > i[:, None] - b.window)[None] | torch.eye(T, dtype=torch.bool, device=ids.device)
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                               attn_mask=allowed[:, None], scale=self.scale)
            x = x + lin(o.transpose(1, 2).reshape(B, T, -1), b.wo, b.bo)
            h = self._add_rmsnorm(x, None, b.ln2, self.eps)[0]
            x = x + lin(self._swiglu(lin(h, b.wgu, b.bgu)), b.wd, b.bd)
        x = self._add_rmsnorm(x if all_logits else x[:, -1], None, self.norm, self.eps)[0]
        s.cache_pos.fill_(T)
        s.pos.copy_(pos[:, -1] + 1)
        s.start.copy_(T - mask.sum(-1))
        return (lin if all_logits else _lin)(x, self.lm_head).float()  # one row: stay narrow

    def _step(self, s):
        """One decode step for every row of the session; logits [B, vocab] fp32."""
        x = F.embedding(s.tok, self.embed).to(self.act_dtype)
        res = None
        for li, b in enumerate(self.blocks):
            h, res = self._add_rmsnorm(x, res, b.ln1, self.eps)
            qkv = _lin(h, b.wqkv, b.bqkv)
            q = self._rope_cache(qkv, s.cos, s.sin, s.pos, s.k[li], s.v[li], s.cache_pos,
                                 self.n_q, self.n_kv, b.q_norm, b.k_norm, self.eps)
            o = self._attention(q, s.k[li], s.v[li], s.start, s.cache_pos, b.window, self.scale)
            x = _lin(o.reshape(s.batch, -1), b.wo, b.bo)
            h, res = self._add_rmsnorm(x, res, b.ln2, self.eps)
            x = _lin(self._swiglu(_lin(h, b.wgu, b.bgu)), b.wd, b.bd)
        h = self._add_rmsnorm(x, res, self.norm, self.eps)[0]
        return _lin(h, self.lm_head).float()

    def _step_cpu(self, s):
        """The same step with as few PyTorch calls as possible: on the CPU a decode step
        is dominated by per-op dispatch, not arithmetic. RoPE tables, the attention scale
        and the padding/window masks are prepared once per step instead of per layer."""
        B, D, nq, nkv = s.batch, self.head_dim, self.n_q, self.n_kv
        p = int(s.cache_pos)
        L = p + 1
        act = self.act_dtype
        cos, sin = s.cos[s.pos].to(act)[:, None], s.sin[s.pos].to(act)[:, None]
        cos, sin = cos * self._qk_scale, sin * self._qk_scale  # softmax scale folded into q's RoPE
        j = torch.arange(L)
        masks = {}
        for w in {b.window for b in self.blocks}:
            bad = j[None] < s.start[:, None]
            if w:
                bad |= (j <= p - w)[None]
            masks[w] = (torch.zeros(B, 1, 1, L, dtype=act).masked_fill(bad[:, None, None], float("-inf"))
                        if bool(bad.any()) else None)
        x = F.embedding(s.tok, self.embed).to(act)
        for li, b in enumerate(self.blocks):
            h = F.rms_norm(x, x.shape[-1:], b.ln1, self.eps)
            qkv = _lin(h, b.wqkv, b.bqkv).view(B, nq + 2 * nkv, D)
            qk = qkv[:, :nq + nkv]
            if b.q_norm is not None:
                qk = F.rms_norm(qk, (D,), eps=self.eps) * b.qk_norm
            qk = qk * cos + torch.cat((-qk[..., D // 2:], qk[..., :D // 2]), -1) * sin
            kc, vc = s.k[li], s.v[li]
            kc[:, :, p] = qk[:, nq:]
            vc[:, :, p] = qkv[:, nq + nkv:]
            att = torch.matmul(qk[:, :nq].view(B, nkv, nq // nkv, D), kc[:, :, :L].transpose(-1, -2))
            if masks[b.window] is not None:
                att += masks[b.window]
            o = torch.matmul(att.softmax(-1), vc[:, :, :L])
            x = x + _lin(o.view(B, nq * D), b.wo, b.bo)
            gu = _lin(F.rms_norm(x, x.shape[-1:], b.ln2, self.eps), b.wgu, b.bgu)
            x = x + _lin(F.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:], b.wd, b.bd)
        return _lin(F.rms_norm(x, x.shape[-1:], self.norm, self.eps), self.lm_head).float()

    def _decode(self, s):
        if self.device.type == "cpu":
            logits = self._step_cpu(s)
        elif self.use_cuda_graph:
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
        ids, mask = _prep(input_ids, attention_mask, self.device)
        return self._prefill(self._session(ids.shape[0], ids.shape[1]), ids, mask, all_logits=True)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_k=None, top_p=None, stop_token_ids=None, pad_token_id=None,
                 generator=None, check_every=16):
        """Prefill then decode ``max_new_tokens`` for a left-padded batch [B, T].

        Sampling stays on the device; finished rows are masked to ``pad_token_id`` and the
        host looks at the stop flags only every ``check_every`` steps. Returns
        (tokens [B, n_new] on the runtime device, stats dict)."""
        ids, mask = _prep(input_ids, attention_mask, self.device)
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


def _inv_freq(model, head_dim):
    cfg = model.config
    rp = getattr(cfg, "rope_parameters", None) or {}
    if any(isinstance(v, dict) for v in rp.values()):
        raise ValueError("per-layer-type RoPE parameters are not supported")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    if rope_type in _ROPE_FROM_MODEL:
        rot = model.model.rotary_emb
        return rot.inv_freq.detach().float(), float(rot.attention_scaling)
    raise ValueError(f"RoPE type {rope_type!r} is not implemented by the runtime "
                     f"(supported: default, {', '.join(_ROPE_FROM_MODEL)})")


def _prep(input_ids, attention_mask, device):
    ids = torch.as_tensor(input_ids, device=device).long()
    if ids.dim() == 1:
        ids = ids[None]
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
