"""Fast runtime for dense or depth-pruned decoder LLMs of every supported family.

Hugging Face ``generate`` spends most of a small-batch decode step in Python and
per-layer cache bookkeeping, so deleting blocks barely shows up in tokens/s. This
runtime keeps only what a decode step needs, in three parts (docs/DESIGN.md,
"Evaluation and speed protocols"):

- ``runtime_weights.py``: the weights, converted once (merged QKV and gate/up, RoPE
  inverse frequencies, every family difference as data);
- ``runtime_block.py``: one block for the prefill and the decode step, whose attention
  and norms run over the fused kernels of ``depthcut.kernels.decode`` (on the CPU their
  C++ twins in ``depthcut._C``, fp32 activations over fp32, bf16 or fp16 weights);
- this module: generation. A static KV cache per (batch bucket, max length), on CUDA the
  decode step captured as one CUDA graph per batch bucket, sampling on the device.
"""
from __future__ import annotations

import time

import torch

from ._ext import HAS_EXT
from .calibration import check_token_ids
from .errors import DepthcutError
from .ops import decode_ops
from .runtime_block import Cache, Decoder, Ops
from .runtime_weights import Weights

__all__ = ["Runtime", "Weights", "check_generation", "default_weight_dtype"]

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


class _Session:
    """One batch bucket: its static KV cache, the decode step's input tokens and, on CUDA,
    the step captured as a graph with its output logits."""

    def __init__(self, w: Weights, batch: int, max_len: int):
        self.cache = Cache(w, batch, max_len)
        self.tok = torch.zeros(batch, dtype=torch.long, device=w.device)
        self.graph = None
        self.logits = None


class Runtime:
    """Generation over :class:`Weights` (see :meth:`from_hf`): sessions, CUDA graphs, sampling."""

    def __init__(self, weights: Weights, use_cuda_graph=True):
        self.weights = weights
        self.decoder = Decoder(weights, Ops(*decode_ops(weights.device, weights.act_dtype)))
        self.use_cuda_graph = use_cuda_graph and weights.device.type == "cuda"
        self._sessions: dict[int, _Session] = {}
        self._pool = None

    @classmethod
    def from_hf(cls, model, dtype=None, device=None, act_dtype=None, use_cuda_graph=True):
        """A runtime over a HF CausalLM's weights; ``dtype``, ``device`` and ``act_dtype`` as
        in :meth:`Weights.from_hf`."""
        return cls(Weights.from_hf(model, dtype, device, act_dtype), use_cuda_graph)

    def _session(self, batch, max_len):
        s = self._sessions.get(batch)
        if s is None or s.cache.max_len < max_len:
            self._sessions.pop(batch, None)
            size = -(-max_len // 128) * 128
            try:
                s = _Session(self.weights, batch, size)
            except torch.cuda.OutOfMemoryError:  # other buckets' caches may be what is in the way
                self.reset()
                torch.cuda.empty_cache()
                s = _Session(self.weights, batch, size)
            self._sessions[batch] = s
        return s

    def _decode(self, s):
        if self.use_cuda_graph:
            if s.graph is None:
                self._capture(s)
            s.graph.replay()
            logits = s.logits
        else:
            logits = self.decoder.step(s.cache, s.tok)
        s.cache.advance()
        return logits

    def _capture(self, s):
        """Warm up (Triton compiles) on a side stream, then capture one decode step. The
        step only writes cache slot ``cache_pos``, which the first real step rewrites."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decoder.step(s.cache, s.tok)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        s.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(s.graph, pool=self._pool):
            s.logits = self.decoder.step(s.cache, s.tok)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None):
        """Logits for every prompt position [B, T, vocab] (fp32), for checks against HF."""
        ids, mask = _prep(input_ids, attention_mask, self.weights.device, self.weights.embed.shape[0])
        return self.decoder.prefill(self._session(ids.shape[0], ids.shape[1]).cache, ids, mask, all_logits=True)

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False,
                 temperature=1.0, top_k=None, top_p=None, stop_token_ids=None, pad_token_id=None,
                 generator=None, check_every=16):
        """Prefill then decode ``max_new_tokens`` for a left-padded batch [B, T].

        Sampling stays on the device; finished rows are masked to ``pad_token_id`` and the
        host looks at the stop flags only every ``check_every`` steps. Returns
        (tokens [B, n_new] on the runtime device, stats dict)."""
        check_generation(max_new_tokens, do_sample, temperature, top_k, top_p)
        ids, mask = _prep(input_ids, attention_mask, self.weights.device, self.weights.embed.shape[0])
        device = self.weights.device
        B, T = ids.shape
        bucket = B
        if self.use_cuda_graph:  # one graph per bucket; extra rows repeat the last prompt
            bucket = next((c for c in _BUCKETS if c >= B), B)
            ids = torch.cat([ids, ids[-1:].expand(bucket - B, T)])
            mask = torch.cat([mask, mask[-1:].expand(bucket - B, T)])
        s = self._session(bucket, T + max_new_tokens)
        stops = None
        if stop_token_ids:
            stops = torch.tensor(list(stop_token_ids), device=device)
            pad_token_id = stop_token_ids[0] if pad_token_id is None else pad_token_id
        out = torch.full((bucket, max_new_tokens), pad_token_id or 0, dtype=torch.long, device=device)
        done = torch.zeros(bucket, dtype=torch.bool, device=device)
        sample = _sampler(do_sample, temperature, top_k, top_p, generator)

        _sync(device)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(s.cache, ids, mask)
        nxt = sample(logits)
        _sync(device)
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
        _sync(device)
        t2 = time.perf_counter()
        if not bool(torch.isfinite(logits[:B]).all()):
            raise RuntimeError(f"non-finite logits with {self.weights.embed.dtype} weights (fp16 overflow?): "
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
        caches = [t for s in self._sessions.values() for t in (s.cache.k, s.cache.v)]
        return sum(t.numel() * t.element_size() for t in self.weights.tensors() + caches)

    def reset(self):
        """Free every cached session (KV caches and graphs)."""
        self._sessions.clear()
        self._pool = None


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
