"""Thin helpers over ``torch.distributed`` so the engine reads the same with 1 or N processes.

``torchrun --nproc-per-node N -m pnnh train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; the CLI
calls :func:`init_from_env`, which starts a gloo (CPU) or NCCL (CUDA) process group. Without
those variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "barrier", "all_reduce_sum", "wrap_model", "shutdown"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment; False when not under torchrun."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a (CPU, float64) tensor across ranks; returns it unchanged for one process."""
    if not is_distributed():
        return t
    backend = dist.get_backend()
    x = t.cuda() if backend == "nccl" else t.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.cpu()


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when a process group is up, the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
