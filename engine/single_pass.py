"""The single pass (docs/DESIGN.md, "The single pass and its memory model"): every criterion from one block-by-block walk over the calibration.

The walk keeps a stack of residual-stream variants in one buffer: slot 0 is the full
model, slot 1+p is "block p skipped". Entering block p, the blocks' weights are read once
for all live variants (one batched call per fixed-size group of slots); then the full
stream's input is copied into slot 1+p, because a skipped block passes it unchanged.
That is L + L(L−1)/2 block evaluations instead of the L(L−1) of skipping in place.

At the end every variant goes through the final norm and the fused linear + NLL kernel
(no [tokens × vocab] logits). Taylor runs one backward of the full model, block by block
from the end, recomputing each block from its stored input; the weight gradient of each
linear layer is reduced to Σ|W ⊙ ∂L/∂W| by the saliency kernel and never stored.
Block Influence and angular distances come from the full stream for free.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import DepthcutError
from .ops import linear_nll, taylor_saliency
from .models import ModelAdapter, block_input, block_output


class _Stop(Exception):
    """Raised by a hook to end a forward once it has what it came for."""


class BlockCalls:
    """Calls a model's blocks directly, with the arguments its own forward would pass.

    Masks and rotary tables are captured once per block from a batch-1 probe of length T;
    every calibration window has the same length and no padding, so they broadcast over
    any stacked batch. This keeps the walk family-agnostic (per-layer mask types,
    sliding windows and local/global rotary tables all come from the model itself).
    """

    def __init__(self, adapter: ModelAdapter, seq_len: int, device: torch.device):
        self.adapter = adapter
        self.args: list[tuple] = []
        self.kwargs: list[dict] = []

        def capture(module, args, kwargs):
            self.args.append(tuple(args[1:]))
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

        hooks = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in adapter.layers]
        try:
            with torch.no_grad():
                adapter.model.model(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=device),
                                    use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0, however the family embeds and scales tokens."""
        captured = []

        def stop(module, args, kwargs):
            captured.append(block_input(args, kwargs))
            raise _Stop

        hook = self.adapter.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.adapter.model.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured[0]

    def __call__(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        return block_output(self.adapter.layers[i](hidden, *self.args[i], **self.kwargs[i]))


@dataclass
class PassResult:
    """Raw sums from one or more walks; ``finish`` turns them into scores."""

    num_blocks: int
    count: int = 0  # predictions seen
    tokens: int = 0  # tokens seen (stream criteria average over all of them)
    nll: torch.Tensor | None = None  # [1 + L] summed NLL: full model, then block p skipped
    bi: torch.Tensor | None = None  # [L] summed cos(h_p, h_{p+1})
    angular: dict[int, torch.Tensor] = field(default_factory=dict)  # n -> [L−n+1] summed angles/π
    first_order: torch.Tensor | None = None  # [L] summed ⟨∂L/∂h_{p+1}, h_{p+1} − h_p⟩


class TaylorAccumulator:
    """Σ|W ⊙ ∂L/∂W| per block without storing weight gradients where one GEMM sees every token.

    With several token chunks the signed gradient must be summed over all chunks before the
    absolute value, so each linear weight then gets an fp32 accumulator (4 bytes/parameter).
    """

    def __init__(self, adapter: ModelAdapter, layer_ids: list[int], exact_in_one_gemm: bool):
        self.adapter = adapter
        self.fused = exact_in_one_gemm
        self.scores = torch.zeros(len(layer_ids), dtype=torch.float64)
        self.linears = {i: [m for m in adapter.layers[i].modules() if isinstance(m, nn.Linear)]
                        for i in layer_ids}
        linear_weights = {id(m.weight) for ms in self.linears.values() for m in ms}
        self.other_params = {i: [p for p in adapter.layers[i].parameters() if id(p) not in linear_weights]
                             for i in layer_ids}
        self.grads: dict[nn.Linear, torch.Tensor] = {}
        self.accumulator_bytes = 0 if self.fused else self.bytes_needed(adapter, layer_ids)

    @staticmethod
    def bytes_needed(adapter: ModelAdapter, layer_ids: list[int]) -> int:
        """The fp32 accumulators of every linear weight of the blocks (several chunks only)."""
        return sum(m.weight.numel() * 4 for i in layer_ids for m in adapter.layers[i].modules()
                   if isinstance(m, nn.Linear))

    @contextmanager
    def recording(self, pos: int, i: int):
        """While block i is recomputed and backpropagated, reduce each linear's dW on the fly."""

        def forward_hook(module, args, out):
            x = args[0].detach()

            def grad_hook(dy):
                x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
                if self.fused:
                    self.scores[pos] += taylor_saliency(x2, dy2, module.weight.detach()).item()
                else:
                    g = self.grads.setdefault(module, torch.zeros_like(module.weight, dtype=torch.float32))
                    g.add_(_weight_grad_fp32(dy2, x2))

            out.register_hook(grad_hook)

        hooks = [m.register_forward_hook(forward_hook) for m in self.linears[i]]
        for p in self.other_params[i]:
            p.requires_grad_(True)  # norms and biases: tiny, autograd sums them signed in .grad
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for p in self.other_params[i]:
                p.requires_grad_(False)

    def finish(self, layer_ids: list[int]) -> list[float]:
        out = self.scores.clone()
        for pos, i in enumerate(layer_ids):
            for p in self.other_params[i]:
                if p.grad is not None:
                    out[pos] += (p.detach().float() * p.grad.float()).abs().sum().item()
                    p.grad = None
            for m in self.linears[i]:
                if m in self.grads:
                    out[pos] += (m.weight.detach().float() * self.grads.pop(m)).abs().sum().item()
        return out.tolist()


@dataclass
class Plan:
    """How the calibration set and the variant stack are cut to fit the memory budget."""

    windows_per_chunk: int
    variant_batch: int
    fixed_shapes: bool
    variants: int  # streams carried: 1 + L for the PPL criterion, else the full model alone

    @property
    def slots(self) -> int:
        if not self.fixed_shapes:
            return self.variants
        return math.ceil(self.variants / self.variant_batch) * self.variant_batch


CPU_TOKENS_PER_CALL = 4096


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 4 << 30


def make_plan(adapter: ModelAdapter, n_windows: int, seq_len: int, dtype: torch.dtype, device: torch.device,
              max_memory: int | None, kept_streams: int, variants: int, reserved: int = 0) -> Plan:
    """Windows per token chunk from the buffer size, variants per call from activation size.

    ``kept_streams`` full-model streams are kept beside the variant stack (one per block
    boundary for Taylor and angular distance); ``reserved`` bytes are held for the whole pass
    (Taylor's accumulators when the set takes several chunks)."""
    cfg = adapter.config
    esize = torch.finfo(dtype).bits // 8
    hidden = cfg.hidden_size
    budget = max(1, (max_memory or default_budget(device)) - reserved)
    slots = variants
    per_window = (slots + kept_streams) * seq_len * hidden * esize
    windows = max(1, min(n_windows, int(budget * 0.5) // max(per_window, 1)))
    heads = cfg.num_attention_heads
    per_row = seq_len * (8 * hidden + 3 * cfg.intermediate_size + 2 * heads * seq_len) * esize
    variant_batch = max(1, min(slots, int(budget * 0.5) // max(windows * per_row, 1)))
    fixed = device.type == "cuda"
    if not fixed:
        # CPU: a call of ~4k tokens keeps the MLP intermediate (tokens x intermediate) in L3,
        # so the elementwise ops between GEMMs stay in cache while GEMMs stay efficient.
        # SmolLM2-135M bf16 on a 2-core Zen 4: 2.9 ms/sequence/block at 20-40 sequences
        # per call, 3.4-3.6 at 80-160 (the whole 31-variant stack was one call before).
        variant_batch = max(1, min(variant_batch, CPU_TOKENS_PER_CALL // max(windows * seq_len, 1)))
    if fixed:
        # Equal groups: every call has the same shape, so attention plans are built once. A
        # group computes all its slots, live or not, so at least 8 groups keep that waste small.
        variant_batch = min(variant_batch, math.ceil(slots / 8))
        variant_batch = math.ceil(slots / math.ceil(slots / variant_batch))
    return Plan(windows, variant_batch, fixed, variants)


class SinglePass:
    """One walk over the calibration set for the chosen criteria (see module docstring)."""

    def __init__(self, model, criteria: set[str], windows: tuple[int, ...] = (), max_memory: int | None = None,
                 dtype: torch.dtype | None = None, angular_tokens: str = "all"):
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(dtype)
        self.adapter = ModelAdapter(model)
        self.criteria = criteria
        self.windows = tuple(sorted(set(windows)))
        self.angular_tokens = angular_tokens
        self.max_memory = max_memory
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def run(self, input_ids: torch.Tensor, layer_ids: list[int] | None = None, progress: bool = True) -> PassResult:
        """Sums for the model made of ``layer_ids`` (default: all blocks) over all windows."""
        adapter = self.adapter
        layer_ids = list(range(adapter.num_blocks)) if layer_ids is None else layer_ids
        n_windows, seq_len = input_ids.shape
        for n in self.windows:
            if not 1 <= n <= len(layer_ids):
                raise DepthcutError(f"angular window {n} must be between 1 and {len(layer_ids)}")
        want_taylor = "taylor" in self.criteria
        keep_stream = want_taylor or bool(self.windows)
        variants = len(layer_ids) + 1 if "ppl" in self.criteria else 1
        kept = len(layer_ids) + 1 if keep_stream else 0
        plan = make_plan(adapter, n_windows, seq_len, self.dtype, self.device, self.max_memory, kept, variants)
        if want_taylor and plan.windows_per_chunk < n_windows:  # several chunks: fp32 dW sums for the whole pass
            reserved = TaylorAccumulator.bytes_needed(adapter, layer_ids)
            plan = make_plan(adapter, n_windows, seq_len, self.dtype, self.device, self.max_memory, kept, variants,
                             reserved)
        calls = BlockCalls(adapter, seq_len, self.device)
        result = PassResult(len(layer_ids))
        chunks = range(0, n_windows, plan.windows_per_chunk)
        taylor = TaylorAccumulator(adapter, layer_ids, exact_in_one_gemm=len(chunks) == 1) if want_taylor else None
        result.count = n_windows * (seq_len - 1)
        result.tokens = n_windows * seq_len
        flags = {p: p.requires_grad for p in adapter.model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        try:
            bar = tqdm(total=len(chunks) * len(layer_ids) * (2 if want_taylor else 1), desc="single pass",
                       disable=not progress, leave=False)
            for start in chunks:
                ids = input_ids[start:start + plan.windows_per_chunk].to(self.device)
                self._walk_chunk(calls, ids, layer_ids, plan, result, taylor, bar)
            bar.close()
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        self.plan = plan
        self.taylor_scores = taylor.finish(layer_ids) if taylor else None
        self.taylor_accumulator_bytes = taylor.accumulator_bytes if taylor else 0
        return result

    @torch.no_grad()
    def _walk_chunk(self, calls: BlockCalls, ids, layer_ids, plan: Plan, result: PassResult, taylor, bar):
        n, t = ids.shape
        L = len(layer_ids)
        h = calls.embed(ids)
        buf = h.new_zeros((plan.slots, n, t, h.shape[-1]))
        buf[0] = h
        stream = [h] if (taylor or self.windows) else None
        cos_sum = torch.zeros(L, dtype=torch.float64, device=self.device)
        for pos, i in enumerate(layer_ids):
            live = min(pos + 1, plan.variants)
            if plan.variants > 1:
                # Slot pos+1 ("block pos skipped") is not live yet: it takes the full stream's
                # input now and doubles as h_in, saving a clone per block.
                buf[pos + 1] = buf[0]
                h_in = buf[pos + 1]
            else:
                h_in = buf[0].clone()
            group = plan.variant_batch
            if not plan.fixed_shapes:
                group = math.ceil(live / math.ceil(live / group))  # fewest calls, sizes as even as that allows
            for s in range(0, live, group):
                e = s + group if plan.fixed_shapes else min(s + group, live)
                out = calls(i, buf[s:e].view(-1, t, buf.shape[-1])).view(e - s, n, t, -1)
                buf[s:min(e, live)] = out[:min(e, live) - s]
            cos_sum[pos] = _cos(h_in, buf[0]).sum()
            if stream is not None:
                stream.append(buf[0].clone())
            bar.update()
        result.bi = _add(result.bi, cos_sum.cpu())
        ends = stream if self.angular_tokens == "all" else self._pruneme_view(stream)
        for w in self.windows:
            ang = torch.stack([(torch.arccos(_cos(ends[p], ends[p + w]).clamp(-1, 1)) / math.pi).sum()
                               for p in range(L - w + 1)])
            result.angular[w] = _add(result.angular.get(w), ang.double().cpu())
        result.nll = _add(result.nll, self._variant_nll(buf[:plan.variants], ids).cpu())
        del buf, h_in  # the variant stack is not needed by the backward: free it first
        if taylor is not None:
            first_order = self._backward(calls, stream, ids, layer_ids, result.count, taylor, bar)
            result.first_order = _add(result.first_order, first_order)

    def _pruneme_view(self, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """PruneMe's convention (docs/DESIGN.md, "Criteria"): each window's last token only, and
        the last block's output after the final norm, as Hugging Face's hidden_states give it."""
        ends = [h[:, -1] for h in stream]
        ends[-1] = self.adapter.final_norm(ends[-1])
        return ends

    def _head(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        normed = self.adapter.final_norm(hidden[:, :-1]).flatten(0, 1)
        return linear_nll(normed, self.adapter.lm_head_weight.detach(), targets.flatten(), self.adapter.logit_softcap)

    def _variant_nll(self, variants: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Summed NLL of every variant: [V]; groups of variants share one kernel call."""
        targets = ids[:, 1:]
        group = max(1, 8192 // max(1, targets.numel()))
        sums = []
        for s in range(0, len(variants), group):
            v = variants[s:s + group]
            nll = self._head(v.flatten(0, 1), targets.repeat(len(v), 1))
            sums.append(nll.view(len(v), -1).double().sum(1))
        return torch.cat(sums)

    def _backward(self, calls, stream, ids, layer_ids, count, taylor: TaylorAccumulator, bar) -> torch.Tensor:
        """Backward of the full model, block by block from the end, recomputing each block."""
        first_order = torch.zeros(len(layer_ids), dtype=torch.float64)
        with torch.enable_grad():
            h = stream[-1].detach().requires_grad_(True)
            (self._head(h, ids[:, 1:]).sum() / count).backward()
            grad = h.grad
            for pos in reversed(range(len(layer_ids))):
                first_order[pos] = (grad.float() * (stream[pos + 1] - stream[pos]).float()).sum().item()
                x = stream[pos].detach().requires_grad_(True)
                with taylor.recording(pos, layer_ids[pos]):
                    calls(layer_ids[pos], x).backward(grad)
                grad = x.grad
                bar.update()
        return first_order


def _weight_grad_fp32(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy.T @ x summed and returned in fp32. On CUDA a bf16/fp16 GEMM with an fp32 output
    (``out_dtype``) runs at the tensor cores' rate; an fp32 GEMM there is ~15x slower. The CPU
    has no such GEMM in torch, so it computes in fp32."""
    if dy.is_cuda and dy.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(dy.t(), x, out_dtype=torch.float32)
    return dy.t().float() @ x.float()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).double()


def _add(total, part):
    return part if total is None else total + part


def score_single_pass(model, input_ids: torch.Tensor, criteria: set[str], windows=(), max_memory=None,
                      dtype=None, progress=True, angular_tokens: str = "all") -> tuple[dict[str, list[float]], dict]:
    """Scores of every requested criterion from one walk; plus facts about the run."""
    t0 = time.perf_counter()
    sp = SinglePass(model, criteria, windows, max_memory, dtype, angular_tokens)
    r = sp.run(input_ids, progress=progress)
    L = r.num_blocks
    scores: dict[str, list[float]] = {}
    full_loss = r.nll[0].item() / r.count
    if "ppl" in criteria:
        scores["ppl"] = [math.exp(v / r.count) for v in r.nll[1:].tolist()]
    if "taylor" in criteria:
        scores["taylor"] = sp.taylor_scores
        scores["taylor_ppl_estimate"] = [math.exp(full_loss - g) for g in r.first_order.tolist()]
    if "bi" in criteria:
        scores["bi"] = (1 - r.bi / r.tokens).tolist()
    angles_per_window = r.tokens if angular_tokens == "all" else len(input_ids)
    for w, v in r.angular.items():
        scores[f"angular{w}"] = (v / angles_per_window).tolist()
    meta = {
        "scorer": "fused",
        "dense_ppl": math.exp(full_loss),
        "seconds": time.perf_counter() - t0,
        "windows_per_chunk": sp.plan.windows_per_chunk,
        "variant_batch": sp.plan.variant_batch,
        "taylor_accumulator_bytes": sp.taylor_accumulator_bytes,
        "dtype": str(sp.dtype).replace("torch.", ""),
        "block_evaluations": L + L * (L - 1) // 2 if "ppl" in criteria else L,
    }
    return scores, meta


def iterative_ppl(model, input_ids: torch.Tensor, steps: int, allowed: list[int], max_memory=None, dtype=None,
                  progress=True) -> tuple[list[int], list[float]]:
    """SLEB: remove the block whose removal hurts least, re-score the rest, repeat ``steps`` times.

    Returns the removal order (original block indices) and the perplexity after each removal.
    """
    sp = SinglePass(model, {"ppl"}, (), max_memory, dtype)
    kept = list(range(sp.adapter.num_blocks))
    order, ppls = [], []
    for _ in tqdm(range(steps), desc="iterative PPL", disable=not progress, leave=False):
        r = sp.run(input_ids, kept, progress=False)
        candidates = [(v, i) for v, i in zip(r.nll[1:].tolist(), kept) if i in allowed]
        if not candidates:
            raise DepthcutError(f"cannot remove {steps} blocks iteratively: only {len(order)} are prunable")
        best_nll, best = min(candidates)
        order.append(best)
        ppls.append(math.exp(best_nll / r.count))
        kept.remove(best)
    return order, ppls
