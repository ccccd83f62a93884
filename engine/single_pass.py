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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, my_windows, rank_and_size
from .errors import DepthcutError
from .imatrix import ImatrixCollector
from .ops import linear_nll, taylor_saliency
from .models import ModelAdapter, block_input, block_output
from .offload import loaded, stream_of


class _Stop(Exception):
    """Raised by a hook to end a forward once it has what it came for."""


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


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
            if len(self.args) == adapter.num_blocks:
                raise _Stop  # the final norm may sit on another device (a device map)

        self.args_device = [device] * adapter.num_blocks
        hooks = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in adapter.layers]
        for layer in adapter.layers:  # the probe needs the arguments only: blocks pass it through
            layer.forward = _pass_through
        try:
            with torch.no_grad():
                adapter.model.model(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=device),
                                    use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
            for layer in adapter.layers:
                del layer.forward

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
        if self.args_device[i] != hidden.device:  # a device map: the block's masks and rotary tables follow once
            self.args[i], self.kwargs[i] = tree_map(lambda v: v.to(hidden.device) if torch.is_tensor(v) else v,
                                                    (self.args[i], self.kwargs[i]))
            self.args_device[i] = hidden.device
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

    def all_reduce(self) -> None:
        """Under torchrun: every rank's sums become the sums over all windows."""
        for t in (self.nll, self.bi, self.first_order, *self.angular.values()):
            if t is not None:
                all_reduce_sum(t)


class TaylorAccumulator:
    """Σ|W ⊙ ∂L/∂W| per block, with the gradient's sign kept until every token is in.

    Three ways to get there (docs/DESIGN.md, "The Taylor backward"):
    - ``one_gemm``: one chunk holds every window, so a single GEMM dW = dyᵀx sees every token
      and the saliency kernel reduces it in its epilogue; dW is never stored;
    - ``per_block``: the backward runs block by block over every chunk, so only the block in
      hand has fp32 dW accumulators (one block's weights × 4 bytes), freed when it is done;
    - ``per_chunk``: each chunk's backward runs right after its walk, so every block keeps its
      fp32 accumulators for the whole pass (4 bytes per block weight element).
    Norms and biases are tiny: their signed gradients are summed in fp32 whatever the mode.
    Under torchrun the signed sums are all-reduced before the absolute value is taken.
    """

    def __init__(self, adapter: ModelAdapter, layer_ids: list[int], backward: str):
        self.adapter = adapter
        self.backward = backward
        self.scores = torch.zeros(len(layer_ids), dtype=torch.float64)
        self.sums: dict[tuple[int, str], torch.Tensor] = {}  # (block, parameter name) -> signed fp32 gradient sum
        self.pending = dict(enumerate(layer_ids))  # positions whose sums are not yet in ``scores``
        self.accumulator_bytes = accumulator_bytes(adapter, layer_ids, backward)

    def _sum(self, i: int, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.sums.setdefault((i, name), torch.zeros_like(like, dtype=torch.float32))

    @contextmanager
    def recording(self, pos: int, i: int):
        """While block i is recomputed and backpropagated, reduce or accumulate each linear's dW."""
        layer = self.adapter.layers[i]
        linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
        linear_weights = {f"{name}.weight" for name, _ in linears}
        others = [(name, p) for name, p in layer.named_parameters() if name not in linear_weights]

        def hook(name, module):
            def forward_hook(module, args, out):
                x = args[0].detach()

                def grad_hook(dy):
                    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
                    w = module.weight.detach()
                    if self.backward == "one_gemm":
                        self.scores[pos] += taylor_saliency(x2, dy2, w).item()
                    else:
                        _add_weight_grad(self._sum(i, f"{name}.weight", w), dy2, x2)

                out.register_hook(grad_hook)
            return module.register_forward_hook(forward_hook)

        hooks = [hook(name, m) for name, m in linears]
        for _, p in others:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for name, p in others:
                if p.grad is not None:
                    self._sum(i, name, p).add_(p.grad.float())
                    p.grad = None
                p.requires_grad_(False)

    def block_done(self, pos: int) -> None:
        """Every chunk has passed block ``pos``: reduce its sums and free its accumulators
        (per_chunk waits for ``finish``, since later chunks still add to them)."""
        if self.backward != "per_chunk":
            self._reduce(pos)

    def _reduce(self, pos: int) -> None:
        i = self.pending.pop(pos)
        params = dict(self.adapter.layers[i].named_parameters())
        for key in sorted(k for k in self.sums if k[0] == i):  # the same order on every rank
            grad = all_reduce_sum(self.sums.pop(key))
            self.scores[pos] += (params[key[1]].detach().float() * grad).abs().sum().item()

    def finish(self) -> list[float]:
        for pos in list(self.pending):
            self._reduce(pos)
        return self.scores.tolist()


def accumulator_bytes(adapter: ModelAdapter, layer_ids: list[int], backward: str) -> int:
    """Device bytes of the fp32 dW accumulators: none, the largest block's, or every block's."""
    per_block = [sum(m.weight.numel() * 4 for m in adapter.layers[i].modules() if isinstance(m, nn.Linear))
                 for i in layer_ids]
    return {"one_gemm": 0, "per_block": max(per_block), "per_chunk": sum(per_block)}[backward]


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
    esize = dtype.itemsize
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
                 dtype: torch.dtype | None = None, angular_tokens: str = "all",
                 several_chunks_backward: str | None = None, importance: bool = False):
        """``several_chunks_backward`` (per_block or per_chunk) overrides the Taylor backward picked
        when the calibration takes several chunks (tests compare the two). ``importance`` also
        collects the imatrix (Σx² per input channel of every block linear) on the full model's
        stream as the walk passes it (docs/DESIGN.md, "GGUF export")."""
        self.importance = importance
        if several_chunks_backward not in (None, "per_block", "per_chunk"):
            raise DepthcutError(f"unknown Taylor backward {several_chunks_backward!r}")
        self.several_chunks_backward = several_chunks_backward
        self.device = next(model.parameters()).device  # the embedding's: the walk starts there
        self.adapter = ModelAdapter(model)
        self.block_devices = [self.adapter.block_device(i, self.device) for i in range(self.adapter.num_blocks)]
        self.norm_device = next((p.device for p in self.adapter.final_norm.parameters()), self.adapter.head_device)
        several = len({*self.block_devices, self.device, self.norm_device, self.adapter.head_device}) > 1
        if dtype is not None and dtype != next(model.parameters()).dtype:
            if stream_of(model) is not None or several:
                raise DepthcutError(f"a {'device-mapped' if several else 'streamed'} model computes in the dtype it "
                                    f"was loaded in ({next(model.parameters()).dtype}); load it in {dtype}")
            model = copy.deepcopy(model).to(dtype)
            self.adapter = ModelAdapter(model)
        if several and max_memory is None:  # the stack visits every device: the tightest one sets the budget
            max_memory = min(default_budget(d) for d in {*self.block_devices, self.device})
        self.criteria = criteria
        self.windows = tuple(sorted(set(windows)))
        self.angular_tokens = angular_tokens
        self.max_memory = max_memory
        self.dtype = next(model.parameters()).dtype

    def run(self, input_ids: torch.Tensor, layer_ids: list[int] | None = None, progress: bool = True) -> PassResult:
        """Sums for the model made of ``layer_ids`` (default: all blocks) over all windows."""
        adapter = self.adapter
        layer_ids = list(range(adapter.num_blocks)) if layer_ids is None else layer_ids
        n_windows, seq_len = input_ids.shape
        for n in self.windows:
            if not 1 <= n <= len(layer_ids):
                raise DepthcutError(f"angular window {n} must be between 1 and {len(layer_ids)}")
        result = PassResult(len(layer_ids), count=n_windows * (seq_len - 1), tokens=n_windows * seq_len)
        processes = rank_and_size()[1]
        input_ids = input_ids[my_windows(n_windows)]  # torchrun: this rank's share; sums are all-reduced
        n_windows = len(input_ids)
        want_taylor = "taylor" in self.criteria
        keep_stream = want_taylor or bool(self.windows)
        variants = len(layer_ids) + 1 if "ppl" in self.criteria else 1
        kept = len(layer_ids) + 1 if keep_stream else 0
        plan = make_plan(adapter, n_windows, seq_len, self.dtype, self.device, self.max_memory, kept, variants)
        self.taylor_backward, self.taylor_store = "one_gemm", self.device
        if want_taylor and (plan.windows_per_chunk < n_windows or processes > 1):  # signed sums needed
            self.taylor_backward, self.taylor_store, reserved = self._taylor_layout(layer_ids, n_windows, seq_len)
            if self.taylor_store != self.device and not self.windows:
                kept = 0  # only Taylor reads the stream: each boundary goes to host memory as it is made
            plan = make_plan(adapter, n_windows, seq_len, self.dtype, self.device, self.max_memory, kept, variants,
                             reserved)
        calls = BlockCalls(adapter, seq_len, self.device)
        chunks = range(0, n_windows, plan.windows_per_chunk)
        if len(chunks) == 1 and processes == 1:
            self.taylor_backward = "one_gemm"
        taylor = TaylorAccumulator(adapter, layer_ids, self.taylor_backward) if want_taylor else None
        flags = {p: p.requires_grad for p in adapter.model.parameters()}
        for p in flags:
            p.requires_grad_(False)
        self.collector = ImatrixCollector(adapter.model) if self.importance else None
        if self.collector is not None:
            self.collector.active = False  # _walk_chunk turns it on for the calls that carry slot 0
        with self.collector or nullcontext():
            try:
                self._walks(calls, input_ids, chunks, layer_ids, plan, result, taylor, progress)
            finally:
                for p, flag in flags.items():
                    p.requires_grad_(flag)
        self.plan = plan
        result.all_reduce()
        if self.collector is not None:
            self.collector.all_reduce()
            self.imatrix = self.collector.imatrix(None, result.tokens // seq_len, seq_len)
        self.taylor_scores = taylor.finish() if taylor else None
        self.taylor_accumulator_bytes = taylor.accumulator_bytes if taylor else 0
        return result

    def _walks(self, calls, input_ids, chunks: range, layer_ids, plan: Plan, result: PassResult, taylor,
               progress: bool) -> None:
        """Every chunk's walk; Taylor's backward after each chunk, or (per_block) after all of them."""
        bar = tqdm(total=len(chunks) * len(layer_ids) * (2 if taylor else 1), desc="single pass",
                   disable=not progress, leave=False)
        waiting: list[_ChunkGrad] = []  # per_block: every chunk's stream, for the block-major backward
        for start in chunks:
            ids = input_ids[start:start + plan.windows_per_chunk].to(self.device)
            stream = self._walk_chunk(calls, ids, layer_ids, plan, result, bar)
            if taylor is None:
                continue
            chunk = self._head_grad(stream, ids, result.count)
            if self.taylor_backward == "per_block":
                waiting.append(chunk.to(self.taylor_store))
            else:
                result.first_order = _add(result.first_order, self._backward(calls, [chunk], layer_ids, taylor, bar))
            del stream, chunk
        self.taylor_stored_bytes = sum(c.nbytes for c in waiting)
        if waiting:
            result.first_order = self._backward(calls, waiting, layer_ids, taylor, bar)
        bar.close()

    def _taylor_layout(self, layer_ids: list[int], n_windows: int, seq_len: int):
        """Several chunks: which Taylor backward, where the chunks' streams wait, and the device
        bytes to reserve for it (docs/DESIGN.md, "The Taylor backward").

        per_block holds one block's fp32 accumulators on the device but keeps every chunk's
        L+1 stream boundaries and gradient until the backward: on a GPU they wait in pinned
        host memory unless they fit the budget. On a CPU both live in the same memory, so
        whichever of per_block and per_chunk needs less is taken."""
        stored = (len(layer_ids) + 2) * n_windows * seq_len * self.adapter.config.hidden_size * self.dtype.itemsize
        one = accumulator_bytes(self.adapter, layer_ids, "per_block")
        every = accumulator_bytes(self.adapter, layer_ids, "per_chunk")
        backward = self.several_chunks_backward
        if backward is None:  # a streamed model has one block at a time: per_block only
            backward = "per_block" if (self.device.type == "cuda" or stored + one < every
                                       or stream_of(self.adapter.model) is not None) else "per_chunk"
        if backward == "per_chunk":
            return backward, self.device, every
        if self.device.type == "cuda" and stored + one > (self.max_memory or default_budget(self.device)) // 2:
            return backward, torch.device("cpu"), one
        return backward, self.device, one + stored

    @torch.no_grad()
    def _walk_chunk(self, calls: BlockCalls, ids, layer_ids, plan: Plan, result: PassResult, bar):
        """Adds one chunk's sums to ``result``; returns the full stream at every block boundary
        when Taylor or angular distance needs it."""
        n, t = ids.shape
        L = len(layer_ids)
        h = calls.embed(ids)
        buf = h.new_zeros((plan.slots, n, t, h.shape[-1]))
        buf[0] = h
        keep = self.taylor_store if "taylor" in self.criteria and not self.windows else self.device
        stream = [_copy_to(h, keep)] if ("taylor" in self.criteria or self.windows) else None
        cos_sums = []
        for pos, i in enumerate(layer_ids):
            if buf.device != self.block_devices[i]:  # a device map: the stack follows the blocks
                buf = buf.to(self.block_devices[i])
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
            with loaded(self.adapter.model, i, layer_ids[pos + 1] if pos + 1 < L else None):
                for s in range(0, live, group):
                    if self.collector is not None:  # slot 0, the full model, is this call's first n·t rows
                        self.collector.active, self.collector.rows = s == 0, n * t
                    e = s + group if plan.fixed_shapes else min(s + group, live)
                    out = calls(i, buf[s:e].view(-1, t, buf.shape[-1])).view(e - s, n, t, -1)
                    buf[s:min(e, live)] = out[:min(e, live) - s]
            cos_sums.append(_cos(h_in, buf[0]).sum())
            if stream is not None:
                stream.append(_copy_to(buf[0], keep, clone=True))
            bar.update()
        if self.collector is not None:
            self.collector.active = False  # the head and the Taylor backward's recomputation do not count
        result.bi = _add(result.bi, torch.stack([c.cpu() for c in cos_sums]))
        ends = stream if self.angular_tokens == "all" else self._pruneme_view(stream)
        for w in self.windows:
            ang = torch.stack([(torch.arccos(_cos(ends[p], ends[p + w]).clamp(-1, 1)) / math.pi).sum()
                               for p in range(L - w + 1)])
            result.angular[w] = _add(result.angular.get(w), ang.double().cpu())
        result.nll = _add(result.nll, self._variant_nll(buf[:plan.variants], ids).cpu())
        return stream  # the variant stack is freed here, before any backward

    def _pruneme_view(self, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """PruneMe's convention (docs/DESIGN.md, "Criteria"): each window's last token only, and
        the last block's output after the final norm, as Hugging Face's hidden_states give it."""
        ends = [h[:, -1] for h in stream]
        ends[-1] = self.adapter.final_norm(ends[-1].to(self.norm_device)).to(ends[-2].device)
        return ends

    def _head(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        head = self.adapter.head_device
        normed = self.adapter.final_norm(hidden[:, :-1].to(self.norm_device)).to(head).flatten(0, 1)
        return linear_nll(normed, self.adapter.lm_head_weight.detach(), targets.flatten().to(head),
                          self.adapter.logit_softcap)

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

    def _head_grad(self, stream: list[torch.Tensor], ids: torch.Tensor, count: int) -> _ChunkGrad:
        """∂(Σ NLL / count)/∂h_L for one chunk, through the final norm and the fused head."""
        with torch.enable_grad():
            h = stream[-1].to(self.norm_device).detach().requires_grad_(True)
            (self._head(h, ids[:, 1:]).sum() / count).backward()
        return _ChunkGrad(stream, h.grad)

    def _backward(self, calls, chunks: list[_ChunkGrad], layer_ids, taylor: TaylorAccumulator, bar) -> torch.Tensor:
        """Backward of the full model, block by block from the end, recomputing each block from its
        stored input; every chunk passes a block before the next block is started."""
        first_order = torch.zeros(len(layer_ids), dtype=torch.float64)
        with torch.enable_grad():
            for pos in reversed(range(len(layer_ids))):
                with loaded(self.adapter.model, layer_ids[pos], layer_ids[pos - 1] if pos else None):
                    self._backward_block(calls, chunks, pos, layer_ids[pos], taylor, first_order, bar)
        return first_order

    def _backward_block(self, calls, chunks: list[_ChunkGrad], pos: int, i: int, taylor: TaylorAccumulator,
                        first_order: torch.Tensor, bar) -> None:
        """Every chunk through block i's backward, then block i's Taylor sums are complete."""
        dev = self.block_devices[i]
        for chunk in chunks:
            h_out = chunk.stream.pop().to(dev, non_blocking=True)  # h_{pos+1}: its last use
            grad, h_in = (t.to(dev, non_blocking=True) for t in (chunk.grad, chunk.stream[pos]))
            first_order[pos] += (grad.float() * (h_out - h_in).float()).sum().item()
            x = h_in.detach().requires_grad_(True)
            with taylor.recording(pos, i):
                calls(i, x).backward(grad)
            waits_on_host = self.taylor_store.type == "cpu" and self.device.type != "cpu"
            chunk.grad = chunk.grad.copy_(x.grad, non_blocking=True) if waits_on_host else x.grad
            bar.update()
        taylor.block_done(pos)


@dataclass
class _ChunkGrad:
    """One chunk's full stream at every block boundary not yet passed by the backward, and the
    loss gradient at the last of them."""

    stream: list[torch.Tensor]
    grad: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.stream, self.grad))

    def to(self, device: torch.device) -> _ChunkGrad:
        return _ChunkGrad([_copy_to(t, device) for t in self.stream], _copy_to(self.grad, device))


def _copy_to(t: torch.Tensor, device: torch.device, clone: bool = False) -> torch.Tensor:
    """``t`` in ``device`` memory: pinned when that is the host of a GPU tensor, so the copy and
    its way back are asynchronous (both are ordered on the current stream)."""
    if t.device == device:
        return t.clone() if clone else t
    return torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=t.is_cuda).copy_(t, non_blocking=True)


def _add_weight_grad(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """acc += dyᵀ·x in fp32. On CUDA a bf16/fp16 GEMM with an fp32 output (``out_dtype``) runs at
    the tensor cores' rate; an fp32 GEMM there is ~15x slower. The CPU has no such GEMM in torch,
    so it computes in fp32."""
    if dy.is_cuda and dy.dtype in (torch.bfloat16, torch.float16):
        acc.add_(torch.mm(dy.t(), x, out_dtype=torch.float32))
    else:
        acc.addmm_(dy.t().float(), x.float())


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).double()


def _add(total, part):
    return part if total is None else total + part


def score_single_pass(model, input_ids: torch.Tensor, criteria: set[str], windows=(), max_memory=None,
                      dtype=None, progress=True, angular_tokens: str = "all", importance: bool = False):
    """Scores of every requested criterion from one walk, facts about the run, and the imatrix
    when ``importance`` (else None)."""
    t0 = time.perf_counter()
    sp = SinglePass(model, criteria, windows, max_memory, dtype, angular_tokens, importance=importance)
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
        "taylor_backward": sp.taylor_backward if "taylor" in criteria else None,
        "taylor_accumulator_bytes": sp.taylor_accumulator_bytes,
        "taylor_stored_bytes": sp.taylor_stored_bytes,
        "taylor_stored_on": str(sp.taylor_store) if sp.taylor_stored_bytes else None,
        "dtype": str(sp.dtype).replace("torch.", ""),
        "processes": rank_and_size()[1],
        "block_evaluations": L + L * (L - 1) // 2 if "ppl" in criteria else L,
    }
    return scores, meta, sp.imatrix if importance else None


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
