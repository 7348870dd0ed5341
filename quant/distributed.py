"""Several processes (one per GPU, on one machine or several) share the sensitivity measurement: each measures every
world_size-th layer and the results are gathered, so every process ends with the same table as one process alone.
Started by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment); one process needs nothing of this."""
from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def init_from_env() -> bool:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); False when not launched that way."""
    dist = _dist()
    if dist is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside a process group."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(names: list[str]) -> list[str]:
    """This process's share of `names` (every world_size-th, from its rank)."""
    rank, size = world()
    return names[rank::size]


def gather(part: dict) -> dict:
    """The union of every process's `part` (the same dict in every process)."""
    rank, size = world()
    if size == 1:
        return part
    parts = [None] * size
    _dist().all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def is_main() -> bool:
    return world()[0] == 0


def broadcast(obj):
    """The first process's `obj`, in every process (what one process measured, e.g. layer timings, shared so that
    every process plans with the same numbers)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]
