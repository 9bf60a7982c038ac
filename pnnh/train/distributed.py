"""Thin helpers over ``torch.distributed`` so the engine reads the same with 1 or N processes.

``torchrun --nproc-per-node N -m pnnh train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; the engine
calls :func:`init_from_env`, which starts a gloo (CPU) or NCCL (CUDA) process group. Without
those variables everything here is a no-op for a single process.

torchrun also tells a worker whether it is a restart (``TORCHELASTIC_RESTART_COUNT``) and which
job it belongs to (``TORCHELASTIC_RUN_ID``): the engine uses both to resume a restarted job from
its own checkpoint without a ``--resume`` flag (see :func:`elastic_restart`).
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_from_env", "is_distributed", "joined", "exit_worker", "rank", "world_size", "local_world_size",
           "default_threads", "elastic_run_id", "elastic_restart", "barrier", "all_reduce_sum", "broadcast_buffers",
           "wrap_model", "shutdown"]

_joined = False  # True once this process has joined a process group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_threads() -> int | None:
    """Intra-op threads for this process when the config gives none; ``None`` keeps torch's default.

    Under torchrun with L local processes: the usable cores split evenly, ``max(1, cores // L)``.
    torchrun exports ``OMP_NUM_THREADS=1`` when it is unset, which would leave most cores idle on
    CPU; a value other than 1 can only come from the user and is kept. (A user's own
    ``OMP_NUM_THREADS=1`` looks the same as torchrun's: pass ``--threads 1`` to force one thread.)
    """
    local = local_world_size()
    if local <= 1 or os.environ.get("OMP_NUM_THREADS", "1") != "1":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def elastic_run_id() -> str | None:
    """The torchrun job id (a fresh UUID per single-node torchrun call, ``--rdzv-id`` multi-node)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if run_id in (None, "", "none") else run_id


def elastic_restart() -> bool:
    """True in a worker that torchrun (``--max-restarts``) started again after a failure of its group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def elastic_attempts_left() -> int:
    """How many more times torchrun (``--max-restarts``) starts this worker group again if it fails."""
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return max(0, left)


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment; False when not under torchrun.

    Idempotent: a second call (the CLI and then the engine) returns the state of the first.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend, timeout = ("nccl" if use_cuda else "gloo"), timedelta(minutes=10)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("GROUP_WORLD_SIZE") == "1":
        # torchrun keeps one key-value store for all restarts (PyTorch issue #135712): without a
        # fresh namespace the restarted workers read the dead ones' addresses and fail to connect.
        # One agent (single node) gives every worker the same restart count, a safe namespace.
        store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend, store=dist.PrefixStore(f"pnnh/restart{restart}", store), rank=rank_,
                                world_size=world, timeout=timeout)
    else:
        if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and os.environ.get("RANK") == "0"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) and os.environ.get("GROUP_WORLD_SIZE") != "1"):
            warnings.warn("torchrun restarts on several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's "
                          "environment (PyTorch issue #135712); without it restarted workers may fail to connect")
        dist.init_process_group(backend, timeout=timeout)
    global _joined
    _joined = True
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def joined() -> bool:
    """True if this process joined a process group (through :func:`init_from_env`) at any point."""
    return _joined


def exit_worker(code: int) -> None:
    """End a worker that joined a process group: flush the standard streams, then ``os._exit(code)``.

    DistributedDataParallel keeps its process group, and with it gloo's threads, alive after
    ``destroy_process_group``; their teardown at interpreter exit aborts the worker at random
    (SIGABRT, "terminate called without an active exception"; 2 of 23 back-to-back runs of the
    two-process test in ``tests/train/test_distributed.py`` under load, none of 60 with this exit).
    Everything a run keeps is written and fsynced before this point, so the worker skips that
    teardown.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


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


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP does this at the start of each training forward, so after the last step every rank
    holds running statistics of its own last batch; evaluating then would mix models. Call it
    before evaluation so all ranks evaluate the model rank 0 saves.
    """
    if not is_distributed():
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when a process group is up, the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
