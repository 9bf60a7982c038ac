"""Device and mixed-precision settings, resolved once for training and for the benchmark."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

__all__ = ["AMP_DTYPES", "resolve_device", "autocast", "cpu_bf16_native", "amp_warning"]

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


def cpu_bf16_native() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX-512 or AMX). Where it does not
    (an AVX2-only CPU), bf16 autocast is emulated and trains many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_warning(device: torch.device, amp: str | None) -> str | None:
    """A warning for a precision that runs slower than fp32 on ``device``, or ``None``."""
    if device.type == "cpu" and amp == "bf16" and not cpu_bf16_native():
        return ("amp bf16 on a CPU without native bf16 support (no AVX-512/AMX): autocast is emulated and "
                "trains slower than fp32 (about 12x on an AVX2 AMD EPYC); train without --amp on this machine")
    return None
