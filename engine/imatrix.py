"""Importance matrix: Σx² per input channel of every block linear layer, and the rows it summed.

The K-quant scale search weighs each weight's error by how large that weight's input channel
is on real text (the mean of x² over the calibration tokens), the statistic llama.cpp's
``imatrix`` tool collects. ``ImatrixCollector`` gathers it with forward pre-hooks, so it can ride
on any pass that runs the model's own linear modules (the scoring pass, or ``collect_imatrix``'s
plain forward); files are llama.cpp's GGUF imatrix format (or its legacy ``.dat``), so
``llama-quantize --imatrix`` reads them too. Entries are keyed by the weight's gguf name
(``blk.3.attn_q.weight``). See docs/DESIGN.md, "GGUF export": "Importance matrix".
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DepthcutError
from .outputs import GGUF_MARK_KEY, WRITTEN_BY, atomic_path

__all__ = ["Imatrix", "ImatrixCollector", "collect_imatrix"]

_BLOCK = re.compile(r"^blk\.(\d+)\.")
_SUMS, _COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """Σx² per input channel (``sums``: gguf weight name -> float32 [cols]) and the number of
    input rows summed (``counts``); ``datasets``, ``chunk_count`` and ``chunk_size`` describe the
    calibration as llama.cpp's file records it."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str, cols: int) -> torch.Tensor | None:
        """Mean x² per input channel of the weight ``name`` (None when the file has no entry)."""
        if name not in self.sums:
            return None
        sums = self.sums[name]
        if sums.size != cols:
            raise DepthcutError(f"the importance matrix has {sums.size} values for {name} but the tensor has "
                                f"{cols} columns: it was collected on another model")
        count = self.counts[name]
        return torch.from_numpy(sums / count if count > 0 else np.ones_like(sums))

    def check_blocks(self, n_blocks: int) -> None:
        """Refuse an importance matrix of a deeper model (the dense one given for a pruned model)."""
        deepest = max((int(m.group(1)) for n in self.sums if (m := _BLOCK.match(n))), default=-1)
        if deepest >= n_blocks:
            raise DepthcutError(f"the importance matrix covers block {deepest} but the model has {n_blocks} blocks; "
                                "give the one of this (pruned) model")

    def for_pruned(self, removed: list[int]) -> "Imatrix":
        """The importance of the model with blocks ``removed`` deleted: their entries dropped, the
        later blocks renumbered as the pruned model (and its GGUF export) numbers them. The inputs
        of the kept blocks are those of the dense model, a close stand-in for the pruned one's."""
        gone = sorted(set(removed))
        if any(b < 0 for b in gone):
            raise DepthcutError(f"block indices must be >= 0, not {gone}")
        sums, counts = {}, {}
        for name in self.sums:
            m = _BLOCK.match(name)
            if m and int(m.group(1)) in gone:
                continue
            new = name
            if m:
                i = int(m.group(1))
                new = f"blk.{i - sum(b < i for b in gone)}." + name[m.end():]
            sums[new], counts[new] = self.sums[name], self.counts[name]
        return Imatrix(sums, counts, list(self.datasets), self.chunk_count, self.chunk_size)

    # ------------------------------------------------------------------ files

    def save(self, path, force: bool = False) -> Path:
        """Write llama.cpp's GGUF imatrix (or its legacy binary when the name ends in ``.dat``)."""
        path = Path(path)
        with atomic_path(path, force=force) as tmp:
            if path.suffix.lower() == ".dat":
                tmp.write_bytes(self._legacy_bytes())
            else:
                self._write_gguf(tmp)
        return path

    def _write_gguf(self, tmp: Path) -> None:
        from .gguf_tokenizer import require_gguf

        require_gguf()
        import gguf

        writer = gguf.GGUFWriter(tmp, arch="")  # llama.cpp's own imatrix files name no architecture
        try:
            writer.add_string(GGUF_MARK_KEY, WRITTEN_BY)  # right after general.architecture: see outputs.py
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_array(gguf.Keys.IMatrix.DATASETS, self.datasets or [WRITTEN_BY])  # llama.cpp needs all three
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, self.chunk_count)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.chunk_size)
            for name in sorted(self.sums):
                # ggml shapes [cols, 1] and [1, 1]: one matrix (no experts)
                writer.add_tensor(name + _SUMS, self.sums[name].astype(np.float32).reshape(1, -1))
                writer.add_tensor(name + _COUNTS, np.full((1, 1), self.counts[name], dtype=np.float32))
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    def _legacy_bytes(self) -> bytes:
        """int32 entries; per entry int32 name length, name, int32 calls, int32 values, float32
        values; then int32 chunk count and the dataset name. llama.cpp divides the values by the
        calls, so storing Σx² with the row count as 'calls' gives it the mean."""
        parts = [struct.pack("<i", len(self.sums))]
        for name in sorted(self.sums):
            key = name.encode()
            values = self.sums[name].astype("<f4")
            parts += [struct.pack("<i", len(key)), key, struct.pack("<ii", self.counts[name], values.size),
                      values.tobytes()]
        dataset = (self.datasets[0] if self.datasets else "").encode()
        parts += [struct.pack("<ii", self.chunk_count, len(dataset)), dataset]
        return b"".join(parts)

    @classmethod
    def load(cls, path) -> "Imatrix":
        """Read a GGUF or legacy imatrix file (llama.cpp's or depthcut's)."""
        path = Path(path)
        try:
            head = path.read_bytes()[:4]
        except OSError as e:
            raise DepthcutError(f"cannot read the importance matrix {path}: {e.strerror}") from None
        try:
            return cls._read_gguf(path) if head == b"GGUF" else cls._read_legacy(path.read_bytes())
        except (ValueError, KeyError, IndexError, struct.error) as e:
            raise DepthcutError(f"{path} is not an importance matrix file ({e})") from None

    @classmethod
    def _read_gguf(cls, path: Path) -> "Imatrix":
        from .gguf_tokenizer import require_gguf

        require_gguf()
        import gguf

        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
        sums, counts = {}, {}
        for tname, data in tensors.items():
            if tname.endswith(_SUMS):
                name = tname[: -len(_SUMS)]
                if data.ndim == 2 and data.shape[0] != 1:
                    raise ValueError(f"{name} has {data.shape[0]} matrices (experts); depthcut reads dense ones")
                sums[name] = data.reshape(-1)
                counts[name] = int(round(float(tensors[name + _COUNTS].reshape(-1)[0])))
        if not sums:
            raise ValueError("no *.in_sum2 tensors")
        return cls(sums, counts, list(fields.get(gguf.Keys.IMatrix.DATASETS) or []),
                   int(fields.get(gguf.Keys.IMatrix.CHUNK_COUNT, 0)), int(fields.get(gguf.Keys.IMatrix.CHUNK_SIZE, 0)))

    @classmethod
    def _read_legacy(cls, data: bytes) -> "Imatrix":
        (n,), at = struct.unpack_from("<i", data, 0), 4
        if n < 1:
            raise ValueError("no entries")
        sums, counts = {}, {}
        for _ in range(n):
            (size,) = struct.unpack_from("<i", data, at)
            name = data[at + 4: at + 4 + size].decode()
            calls, nval = struct.unpack_from("<ii", data, at + 4 + size)
            at += 12 + size
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=at).astype(np.float32)
            at += 4 * nval
            sums[name], counts[name] = values, calls
        chunks, datasets = 0, []
        if at < len(data):
            chunks, size = struct.unpack_from("<ii", data, at)
            datasets = [data[at + 8: at + 8 + size].decode()] if size > 0 else []
        return cls(sums, counts, datasets, chunks)


def _block_linears(model) -> dict[nn.Module, str]:
    """Every linear layer of the blocks -> its weight's gguf name. The head is left out, as
    llama.cpp's imatrix tool leaves it out by default (its type comes from the head rule anyway)."""
    from .export_gguf import ARCHITECTURES, gguf_weight_name
    from .gguf_tokenizer import require_gguf

    require_gguf()
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise DepthcutError(f"no importance matrix for model_type {model_type!r}: its GGUF tensor names are unknown; "
                            f"supported: {', '.join(sorted(ARCHITECTURES))}")
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (gname := gguf_weight_name(model_type, name)) and gname.startswith("blk."):
            found[module] = gname
    if not found:
        raise DepthcutError(f"found no block linear layers in the {model_type} model")
    return found


class ImatrixCollector:
    """Adds Σx² of each block linear's input while attached (``with``) and ``active``.

    ``rows``: only the first ``rows`` rows of the flattened input [-1, cols] count (the full
    model's stream in a batched call that also carries other variants); None counts all.
    q, k and v (and gate, up) read the same tensor: its square is summed once.
    """

    def __init__(self, model, rows: int | None = None):
        self.rows = rows
        self.active = True
        self._names = _block_linears(model)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._hooks = []
        self._last = None  # (input tensor, its Σx², rows) of the latest call

    def __enter__(self) -> "ImatrixCollector":
        self._hooks = [m.register_forward_pre_hook(self._hook) for m in self._names]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._last = [], None

    def _hook(self, module, args) -> None:
        if not self.active:
            return
        x = args[0]
        if self._last is not None and self._last[0] is x:
            sq, n = self._last[1], self._last[2]
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            if self.rows is not None:
                flat = flat[: self.rows]
            sq, n = flat.float().square().sum(0), flat.shape[0]
            self._last = (x, sq, n)
        name = self._names[module]
        if name in self._sums:
            self._sums[name] += sq
            self._counts[name] += n
        else:
            self._sums[name], self._counts[name] = sq.clone(), n

    def all_reduce(self) -> None:
        """Under torchrun: every rank's sums and counts become those over all ranks' windows."""
        from .distributed import all_reduce_sum

        names = sorted(self._sums)  # the same order on every rank
        for name in names:
            all_reduce_sum(self._sums[name])
        counts = all_reduce_sum(torch.tensor([self._counts[n] for n in names], dtype=torch.float64))
        self._counts = {n: int(c) for n, c in zip(names, counts.tolist())}

    def imatrix(self, datasets: list[str] | None = None, chunk_count: int = 0, chunk_size: int = 0) -> Imatrix:
        return Imatrix({k: v.cpu().numpy() for k, v in self._sums.items()}, dict(self._counts),
                       list(datasets or []), chunk_count, chunk_size)


@torch.no_grad()
def collect_imatrix(model, input_ids: torch.Tensor, batch_size: int = 8, dataset: str = "",
                    progress: bool = True) -> Imatrix:
    """One plain forward over the windows ``input_ids`` [N, T] with the collector attached."""
    device = next(model.parameters()).device
    collector = ImatrixCollector(model)
    with collector:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="importance", unit="batch", disable=not progress):
            model.model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
    return collector.imatrix([dataset] if dataset else None, len(input_ids), input_ids.shape[1])
