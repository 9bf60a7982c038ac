"""Device and mixed-precision settings, resolved once for training and for the benchmark."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

__all__ = ["AMP_DTYPES", "resolve_device", "autocast"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}  # ``amp`` setting -> autocast dtype


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:i]`` or ``auto`` (CUDA where there is a device, else the CPU) as a device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` to ``amp_dtype`` on ``device``; a no-op context when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
