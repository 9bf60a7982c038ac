"""Small helpers every layer of the package uses: atomic text files and ``key=value`` options.

This module imports nothing from the rest of pnnh except the error types, so models, data,
training, analysis, benchmarks, experiments and the CLI can all depend on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["atomic_write_text", "parse_kv"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_kv(items: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as YAML scalars (``width=2`` -> 2, ``init=dirac`` -> 'dirac').

    ``what`` names the option in the error raised for an item without ``=``; dashes in keys
    become underscores (``drop-path=0.1`` is ``drop_path``).
    """
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out
