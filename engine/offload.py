"""Models larger than memory (docs/DESIGN.md, "Models larger than memory").

The single pass needs one block's weights at a time. A streamed model keeps its embedding,
final norm and head resident and its blocks on the ``meta`` device; :class:`BlockStream`
puts block i's weights in place just before the walk (or the Taylor backward) runs it and
releases them after, while a background thread already reads the next block. The weights
come from the checkpoint's memory-mapped safetensors files (``disk``) or from host memory
when the computation runs on a GPU (``cpu``). The arithmetic is the in-memory walk's.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .errors import DepthcutError
from .models import (_first_line, _resolve, check_architecture, check_family, check_finite, check_loading_info,
                     check_vocabulary, default_device, default_dtype, load_model)

OFFLOAD = ("cpu", "disk")
LAYERS = "model.layers."


def _fix_malloc_threshold(threshold: int = 1 << 20) -> None:
    """glibc raises its mmap threshold (up to 32 MiB) each time a large buffer is freed; block-sized
    buffers then come from the heap, whose fragments it rarely returns, and a streamed pass
    would end up holding most blocks it ever loaded (measured: +0.8 GB over 100 bf16 blocks).
    Setting the threshold fixes it: buffers of 1 MiB and more are mapped and unmapped."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to fix
        return
    mallopt(-3, threshold)  # M_MMAP_THRESHOLD


class BlockStream:
    """Loads block weights on demand; ``sources[i]()`` returns block i's tensors by parameter name."""

    def __init__(self, layers: nn.ModuleList, sources: dict[int, Callable[[], dict[str, torch.Tensor]]],
                 device: torch.device, dtype: torch.dtype):
        self.layers = layers
        self.sources = sources
        self.device = device
        self.dtype = dtype
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="depthcut-prefetch")
        self.ahead: dict[int, Future] = {}
        self.checked: set[int] = set()
        self.copies = torch.cuda.Stream(device) if device.type == "cuda" else None  # loads beside the compute
        _fix_malloc_threshold()

    def block_bytes(self, i: int) -> int:
        return sum(t.numel() for t in self.layers[i].parameters()) * self.dtype.itemsize

    def largest_block_bytes(self) -> int:
        return max(self.block_bytes(i) for i in range(len(self.layers)))

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors on the device, in the pass's dtype (runs in the prefetch thread)."""
        if self.copies is None:
            return {name: t.to(self.dtype) for name, t in self.sources[i]().items()}
        with torch.cuda.stream(self.copies):
            out = {name: t.to(self.device, self.dtype, non_blocking=True) for name, t in self.sources[i]().items()}
        self.copies.synchronize()  # complete before the compute stream reads them
        return out

    def prefetch(self, i: int | None) -> None:
        if i is not None and i not in self.ahead:
            self.ahead[i] = self.reader.submit(self._read, i)

    @contextmanager
    def loaded(self, i: int, next_i: int | None = None):
        """Block i's weights in place for the duration; block ``next_i`` is read meanwhile."""
        self.prefetch(i)
        tensors = self.ahead.pop(i).result()
        if self.copies is not None:  # freed after the compute stream's last use, not the copy stream's
            for t in tensors.values():
                t.record_stream(torch.cuda.current_stream(self.device))
        layer = self.layers[i]
        layer.load_state_dict(tensors, strict=True, assign=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        del tensors
        if i not in self.checked:
            try:
                check_finite(layer, f"{LAYERS}{i}.")
            except DepthcutError:
                layer.to("meta")
                raise
            self.checked.add(i)
        self.prefetch(next_i)
        try:
            yield layer
        finally:
            layer.to("meta")


def stream_of(model) -> BlockStream | None:
    return getattr(model, "depthcut_stream", None)


def loaded(model, i: int, next_i: int | None = None):
    """Block i of ``model`` ready to run: a no-op for a model held whole in memory."""
    stream = stream_of(model)
    return stream.loaded(i, next_i) if stream is not None else nullcontext(model.model.layers[i])


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it, from the shard index or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DepthcutError(f"unreadable shard index {index}: {e}") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise DepthcutError(f"--offload disk needs a safetensors checkpoint; none in {folder}")
    with _opened(single) as f:
        return {name: single for name in f.keys()}


@contextmanager
def _opened(path: Path):
    """A safetensors file, memory-mapped for the duration; a missing or corrupt one is one line."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types and OSError alike
        raise DepthcutError(f"unreadable safetensors file {path}: {_first_line(e)}") from None
    with handle as f:
        yield f


class _BlockReader:
    """Reads one block's tensors from its safetensors files. Each file is mapped only while it is
    read: pages of a mapping count as the process's resident memory for as long as it lasts."""

    def __init__(self):
        self.where: dict[Path, list[tuple[str, str]]] = {}  # file -> (tensor name, parameter name)

    def add(self, path: Path, name: str, param: str) -> None:
        self.where.setdefault(path, []).append((name, param))

    def __call__(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, names in self.where.items():
            with _opened(path) as f:
                out.update({param: f.get_tensor(name) for name, param in names})
        return out


def load_streamed(spec: str, offload: str, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None):
    """(model, tokenizer) with resident embedding, final norm and head, and blocks streamed
    from ``offload`` (disk: the folder's safetensors; cpu: host memory, for a GPU pass)."""
    if offload not in OFFLOAD:
        raise DepthcutError(f"unknown --offload {offload!r}; choose from {', '.join(OFFLOAD)}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if offload == "cpu":
        if device.type != "cuda":
            raise DepthcutError("--offload cpu keeps the blocks in host memory for a GPU pass; on a CPU use "
                                "--offload disk")
        model, tokenizer = load_model(spec, dtype=dtype, device="cpu")
        pinned = [{name: p.detach().pin_memory() for name, p in layer.named_parameters()}
                  for layer in model.model.layers]
        sources = {i: (lambda block=block: block) for i, block in enumerate(pinned)}
        model.model.layers.to("meta")  # the pinned copies are the host store
        _move_resident(model, device)
        model.depthcut_stream = BlockStream(model.model.layers, sources, device, dtype)
        return model, tokenizer
    return _load_from_disk(spec, dtype, device)


def _load_from_disk(spec: str, dtype: torch.dtype, device: torch.device):
    """The skeleton on ``meta``, the resident tensors read now, each block's kept as a reader."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, gguf_file = _resolve(spec)
    if gguf_file or not Path(where).is_dir():
        what = f"'{spec}'" if spec else "the bundled SmolLM2 (a .gguf file)"
        raise DepthcutError("--offload disk streams a Hugging Face folder with safetensors files; "
                            f"{what} is not one (convert it with depthcut prune/save first)")
    check_architecture(where)
    folder = Path(where)
    files = _safetensors_files(folder)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        check_family(config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except DepthcutError:
        raise
    except Exception as e:  # transformers raises many types for unreadable models
        raise DepthcutError(f"cannot load model '{spec}': {_first_line(e)}") from e
    expected = dict(model.state_dict())
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in files and not (tied and k == "lm_head.weight")]
    mismatched, resident = [], {}
    for path in sorted(set(files.values())):
        with _opened(path) as f:
            for name in f.keys():
                if name in expected and list(f.get_slice(name).get_shape()) != list(expected[name].shape):
                    mismatched.append((name, list(f.get_slice(name).get_shape()), list(expected[name].shape)))
                elif name in expected and not name.startswith(LAYERS):
                    resident[name] = f.get_tensor(name).to(dtype)
    check_loading_info({"missing_keys": missing, "unexpected_keys": [k for k in files if k not in expected],
                        "mismatched_keys": mismatched}, spec)
    model.load_state_dict(resident, strict=False, assign=True)
    check_finite(model)  # the resident tensors: the blocks are checked as they load
    if tied:
        model.tie_weights()
    check_vocabulary(model, tokenizer, spec)
    _move_resident(model, device)
    sources = {i: _BlockReader() for i in range(config.num_hidden_layers)}
    for name, path in files.items():
        if name.startswith(LAYERS):
            block, param = name[len(LAYERS):].split(".", 1)
            sources[int(block)].add(path, name, param)
    model.depthcut_stream = BlockStream(model.model.layers, sources, device, dtype)
    model.eval()
    return model, tokenizer


def _move_resident(model, device: torch.device) -> None:
    """Everything but the blocks' weights to ``device``; buffers (rotary tables) too."""
    for name, module in model.named_children():
        if name != "model":
            module.to(device)
    for name, module in model.model.named_children():
        if name != "layers":
            module.to(device)
    for p in model.parameters():
        p.requires_grad_(False)


MIN_SHARD_BYTES = 16 << 20


def save_streamed(model, folder: Path, shard_bytes: int | None = None) -> None:
    """``save_pretrained`` for a streamed model (pruned or not), without holding it whole:
    resident tensors from memory, each kept block's from its source, renumbered to the block's
    place now; shards of at most ``shard_bytes`` (default: two blocks) and the usual shard index."""
    from safetensors.torch import save_file

    stream = stream_of(model)
    # A shard is built in memory: two blocks' worth keeps saving within the pass's memory model.
    shard_bytes = shard_bytes or max(MIN_SHARD_BYTES, 2 * stream.largest_block_bytes())
    origin = {id(layer): i for i, layer in enumerate(stream.layers)}
    tied = getattr(model.config, "tie_word_embeddings", False)
    items = [(t.numel() * t.element_size(), lambda name=name, t=t: {name: t})
             for name, t in model.state_dict().items()
             if not name.startswith(LAYERS) and not (tied and name == "lm_head.weight")]
    for j, layer in enumerate(model.model.layers):  # one item per block: its tensors are read together
        i = origin[id(layer)]

        def read(i=i, j=j):
            return {f"{LAYERS}{j}.{param}": t.to(stream.dtype) for param, t in stream.sources[i]().items()}

        items.append((stream.block_bytes(i), read))
    shards, size = [[]], 0
    for nbytes, read in items:
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(read)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {name: t.contiguous() for read in shard for name, t in read().items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if len(shards) > 1:
        total = sum(nbytes for nbytes, _ in items)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def check_streaming_fits(model, seq_len: int, criteria: set[str]) -> str:
    """The memory model of a streamed pass for one window per chunk; refuses in one line when
    even that exceeds the free memory. Returns the summary printed before the run."""
    stream = stream_of(model)
    config = model.config
    L = config.num_hidden_layers
    streams = (L + 1 if "ppl" in criteria else 1) + (L + 1 if criteria & {"taylor", "angular"} else 0)
    variant_stack = streams * seq_len * config.hidden_size * stream.dtype.itemsize
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    two_blocks = 2 * stream.largest_block_bytes()  # the running one and the next being read
    free = torch.cuda.mem_get_info(stream.device)[0] if stream.device.type == "cuda" else _mem_available()
    need = two_blocks + variant_stack
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    summary = (f"streaming {L} blocks: resident {gib(resident)} + two blocks {gib(two_blocks)} + "
               f"one window's streams {gib(variant_stack)} = {gib(resident + need)} at least "
               f"(--max-memory bounds the rest)")
    if free is not None and need > free:
        raise DepthcutError(f"streaming needs {gib(need)} beyond the resident weights but only {gib(free)} is free")
    return summary


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
