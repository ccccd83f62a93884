"""The runtime's forward math: one decoder block serves the prefill and the decode step.

A block is attention then an MLP, each sublayer's output joining the residual stream
after its post-norm and Granite's multiplier, where the family has them. The residual
add is fused into the next RMSNorm (``add_rmsnorm``), so a block maps (sublayer output,
residual stream) to the same pair. Only attention depends on the pass. A decode step
(one token per row) runs the fused kernels of ``depthcut.kernels.decode`` against the
static KV cache: Triton on CUDA, their C++ twins in ``depthcut._C`` on the CPU, a
handful of calls per block instead of dozens of ATen ops. A prefill rotates and caches
the whole prompt and attends with a causal mask.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .ops import decode_linear as linear
from .runtime_weights import BlockWeights, Weights


class Ops(NamedTuple):
    """The decode kernels in the order engine/ops.py ``decode_ops`` returns them for a
    device and activation dtype; the prefill uses add_rmsnorm and swiglu too."""
    add_rmsnorm: Callable
    rope_cache: Callable
    attention: Callable
    swiglu: Callable


class Cache:
    """Static KV cache of one batch bucket, with the positions the next pass reads."""

    def __init__(self, w: Weights, batch: int, max_len: int):
        kv = (len(w.blocks), batch, w.n_kv, max_len, w.head_dim)
        self.batch, self.max_len = batch, max_len
        self.k = torch.zeros(kv, dtype=w.act_dtype, device=w.device)
        self.v = torch.zeros(kv, dtype=w.act_dtype, device=w.device)
        self.start = torch.zeros(batch, dtype=torch.int32, device=w.device)  # left-pad count
        self.cache_pos = torch.zeros(1, dtype=torch.int32, device=w.device)  # slot written next
        self.pos = torch.zeros(batch, dtype=torch.long, device=w.device)  # RoPE position
        self.cos, self.sin = w.rope_tables(max_len)  # [tables, max_len, head_dim]

    def advance(self):
        """Move past the slot a decode step wrote. Kept out of the step so that a CUDA
        graph's warm-up and capture never move the state."""
        self.cache_pos += 1
        self.pos += 1


class Decoder:
    """The forward passes over :class:`Weights` with the kernels of :class:`Ops`."""

    def __init__(self, w: Weights, ops: Ops):
        self.w, self.ops = w, ops

    def prefill(self, c: Cache, ids, mask, all_logits=False):
        """The left-padded prompt [B, T] through every block; fills cache slots [0, T) and
        the positions the first step reads. fp32 logits at the last position [B, vocab],
        or with ``all_logits`` at every position [B, T, vocab]."""
        T = ids.shape[1]
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        attend = partial(self._attend_prefill, c, *self._prefill_inputs(c, pos, mask))
        x = self._blocks(self.embed(ids), attend, last=not all_logits)
        c.cache_pos.fill_(T)
        c.pos.copy_(pos[:, -1] + 1)
        c.start.copy_(T - mask.sum(-1))
        return self.logits(x)

    def step(self, c: Cache, tok):
        """One decode step for tokens ``tok`` [B]: fp32 logits [B, vocab]. Writes cache
        slot ``cache_pos`` and moves nothing (:meth:`Cache.advance` does)."""
        return self.logits(self._blocks(self.embed(tok), partial(self._attend_step, c)))

    def block(self, li: int, b: BlockWeights, x, res, attend):
        """Block ``li`` on the previous sublayer output ``x`` [..., hidden] and the residual
        stream ``res`` (None before the first block); returns the pair for the next block.
        ``attend(li, b, qkv)`` is the pass's attention: merged QKV [..., (Hq+2Hkv)*D] to
        the attention output [..., Hq*D]."""
        h, res = self._add_norm(x, res, b.ln1)
        qkv = linear(h, b.wqkv, b.bqkv)
        if b.q_norm_all is not None:
            qkv = self._qk_norm_all(qkv, b)
        x = self._post(linear(attend(li, b, qkv), b.wo, b.bo), b.post_attn)
        h, res = self._add_norm(x, res, b.ln2)
        x = self._post(linear(self.ops.swiglu(linear(h, b.wgu, b.bgu), self.w.gelu), b.wd, b.bd), b.post_mlp)
        return x, res

    def _blocks(self, x, attend, last=False):
        """Embedded tokens through every block and the final norm; ``last``: only at the
        last position of [B, T, hidden]."""
        res = None
        for li, b in enumerate(self.w.blocks):
            x, res = self.block(li, b, x, res, attend)
        if last:
            x, res = x[:, -1], None if res is None else res[:, -1]
        return self.ops.add_rmsnorm(x, res, self.w.norm, self.w.eps)[0]

    # ------------------------------------------------------------------ attention of each pass
    def _attend_step(self, c: Cache, li, b, qkv):
        """One query per row: per-head q/k norms, RoPE and the cache write at slot
        ``cache_pos`` in one kernel, then attention over each row's valid slots."""
        w = self.w
        q = self.ops.rope_cache(qkv, c.cos[b.rope], c.sin[b.rope], c.pos, c.k[li], c.v[li], c.cache_pos,
                                w.n_q, w.n_kv, b.q_norm, b.k_norm, w.eps)
        o = self.ops.attention(q, c.k[li], c.v[li], c.start, c.cache_pos, b.window, w.scale, b.softcap)
        return o.reshape(c.batch, -1)

    def _prefill_inputs(self, c: Cache, pos, mask):
        """Per prefill, shared by its blocks: the cos/sin rows of every RoPE table at the
        prompt positions, and the boolean attention mask [B, T, T] per sliding window."""
        T = mask.shape[1]
        i = torch.arange(T, device=mask.device)
        eye = torch.eye(T, dtype=torch.bool, device=mask.device)
        causal = (i[None, :] <= i[:, None])[None] & mask.bool()[:, None, :] | eye  # fully padded rows stay finite
        masks = {win: causal & (i[None, :] > i[:, None] - win)[None] | eye if win else causal
                 for win in {b.window for b in self.w.blocks}}
        act = self.w.act_dtype
        ropes = [(cos[pos].to(act)[:, None], sin[pos].to(act)[:, None]) for cos, sin in zip(c.cos, c.sin)]
        return ropes, masks

    def _attend_prefill(self, c: Cache, ropes, masks, li, b, qkv):
        """Every prompt position: q/k norms and RoPE, the cache write of slots [0, T),
        masked attention over the prompt."""
        w = self.w
        B, T = qkv.shape[:2]
        q, k, v = qkv.view(B, T, -1, w.head_dim).transpose(1, 2).split([w.n_q, w.n_kv, w.n_kv], dim=1)
        if b.q_norm is not None:
            q = self._rms(q, b.q_norm)
            k = self._rms(k, b.k_norm)
        cos, sin = ropes[b.rope]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        c.k[li, :, :, :T] = k
        c.v[li, :, :, :T] = v
        rep = w.n_q // w.n_kv
        o = _masked_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), masks[b.window],
                              w.scale, b.softcap)
        return o.transpose(1, 2).reshape(B, T, -1)

    # ------------------------------------------------------------------ pieces of a block
    def embed(self, ids):
        x = F.embedding(ids, self.w.embed)
        if self.w.embed_scale != 1.0:  # in the weight dtype, as HF does
            x = x * self.w.embed_scale
        return x.to(self.w.act_dtype)

    def logits(self, h):
        """The head, then Granite's logit divisor and Gemma's final softcap; fp32."""
        w = self.w
        x = linear(h, w.lm_head)
        if w.logit_divisor != 1.0:
            x = x / w.logit_divisor
        if w.logit_softcap:
            x = torch.tanh(x / w.logit_softcap) * w.logit_softcap
        return x.float()

    def _rms(self, x, weight):
        return self.ops.add_rmsnorm(x, None, weight, self.w.eps)[0]

    def _add_norm(self, x, res, weight):
        """Residual add fused with the next pre-norm: (normed input, residual stream).
        Without a pre-norm (OLMo2) the sublayer reads the residual stream itself."""
        if weight is None:
            h = x if res is None else x + res
            return h, h
        return self.ops.add_rmsnorm(x, res, weight, self.w.eps)

    def _post(self, x, weight):
        """A sublayer output as it joins the residual stream: its post-norm (Gemma2/3,
        OLMo2) and Granite's residual multiplier, where the family has them."""
        if weight is not None:
            x = self._rms(x, weight)
        if self.w.residual_scale != 1.0:
            x = x * self.w.residual_scale
        return x

    def _qk_norm_all(self, qkv, b):
        """OLMo2: RMSNorm over all q heads and over all k heads of merged QKV [..., W]."""
        nq, nk = self.w.n_q * self.w.head_dim, self.w.n_kv * self.w.head_dim
        q, k, v = qkv.split([nq, nk, nk], dim=-1)
        return torch.cat((self._rms(q, b.q_norm_all), self._rms(k, b.k_norm_all), v), dim=-1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _masked_attention(q, k, v, allowed, scale, softcap):
    """Attention over [B, H, T, D] with a boolean mask [B, T, T]; with ``softcap`` the
    scaled logits are capped like HF's eager Gemma2 code (SDPA cannot)."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    s = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
