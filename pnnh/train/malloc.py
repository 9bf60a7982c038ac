"""Keep freed host memory in the process (glibc ``mallopt``), so CPU training steps stop page-faulting.

PyTorch's CPU tensors come from ``malloc``. By default glibc hands large freed blocks back to the
kernel: blocks above the (dynamic) mmap threshold are unmapped, and the top of the heap is trimmed
once more than the trim threshold (twice the mmap threshold) is free. A training step frees its
activations during the backward pass, so the next step's activations land on fresh pages: every
4 KiB page is a minor fault, zeroed by the kernel. Measured on pnnh56 (batch 128 at 28x28, 2 threads,
``scripts/step_faults.py``): 20,436 minor faults per training step untuned (plain56: 384), 0-2
tuned; pnnh56's training throughput is 1.020x ResNet-56's tuned and 0.951x untuned (docs/benchmarks.md).

:func:`tune_glibc_malloc` fixes both thresholds for the process: allocations up to 32 MiB (glibc's
largest mmap threshold) come from the heap, and the heap is not trimmed below 2 GiB of free space.
The process keeps its peak heap, which a training loop needs again at the next step. It is what
PyTorch's CPU performance guide obtains with jemalloc or tcmalloc, with nothing to install. Called
by :func:`pnnh.train.train` and ``pnnh bench`` on CPU; a no-op elsewhere (not glibc, or when
``PNNH_MALLOC_TUNING=0`` or the user set glibc's malloc tunables already).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_glibc_malloc"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # the largest int mallopt takes

_state: dict[str, bool] = {}


def _user_tuned() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "glibc.malloc." in tunables or any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                         "MALLOC_MMAP_THRESHOLD_"))


def tune_glibc_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); True if they are set."""
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if sys.platform.startswith("linux") and os.environ.get("PNNH_MALLOC_TUNING", "1") != "0" and not _user_tuned():
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            gnu = libc.gnu_get_libc_version  # glibc only: musl's mallopt is a stub
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            gnu = None
        if gnu is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state["applied"] = applied
    return applied
