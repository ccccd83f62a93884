"""Scoring on several processes (docs/DESIGN.md, "Several processes and nodes").

Every criterion is a sum over tokens: per-variant NLL, cosines, angles, first-order terms and
Taylor's signed weight gradient before its absolute value. So ``torchrun`` ranks split the
calibration windows, walk their share, and all-reduce the sums; the scores are those of one
process over all windows. This is PyTorch's own ``torch.distributed`` (gloo on CPUs, NCCL on
GPUs); ranks other than 0 compute but write nothing.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import DepthcutError


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Joins the launcher's process group once: NCCL when this rank computes on a GPU, else gloo."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_size()[0] == 0


def my_windows(n_windows: int) -> slice:
    """This rank's contiguous share of the windows; shares differ by at most one window."""
    rank, size = rank_and_size()
    if n_windows < size:
        raise DepthcutError(f"{n_windows} calibration windows cannot be split over {size} processes; "
                            f"use --n-samples {size} or more")
    return slice(rank * n_windows // size, (rank + 1) * n_windows // size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks, in place where the backend can reach ``t`` (NCCL needs it
    on this rank's GPU, gloo on the CPU); a no-op in one process."""
    if rank_and_size()[1] == 1:
        return t
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if t.device == where:
        dist.all_reduce(t)
        return t
    moved = t.to(where)
    dist.all_reduce(moved)
    return t.copy_(moved)
