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

__all__ = ["atomic_write_text", "parse_kv", "load_yaml", "remove_stale_temp_files"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only: name the file the user can act on
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(directory: str | Path, *, owned: bool = False) -> list[Path]:
    """Delete the temp files that writers killed mid-write left in ``directory``; return them.

    Our writers use ``.<name>.tmp<pid>``: one is removed when its process is gone (or at once when
    the caller owns the directory, e.g. holds a run's lock). safetensors itself writes through a
    ``.tmpXXXXXX`` file (six random characters) that carries no owner: removed only when ``owned``.
    """
    directory = Path(directory)
    removed = []
    for p in directory.glob(".*.tmp*"):
        pid = p.name.rsplit(".tmp", 1)[-1]
        if owned or (pid.isdigit() and not _pid_alive(int(pid))):
            removed.append(p)
    if owned:
        removed += [p for p in directory.glob(".tmp??????") if p.name[4:].isalnum()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def parse_kv(items: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as YAML scalars (``width=2`` -> 2, ``init=dirac`` -> 'dirac',
    ``width=1e-3`` -> 0.001: a number in exponent form is a number, as in Python).

    ``what`` names the option in the error raised for an item without ``=`` or with a value that
    is not YAML; dashes in keys become underscores (``drop-path=0.1`` is ``drop_path``).
    """
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            value = load_yaml(v, f"{what} {k}")
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if isinstance(value, str) and value.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity"):
            try:
                value = float(value)
            except ValueError:
                pass
        out[k.strip().replace("-", "_")] = value
    return out


MAX_YAML_NODES = 100_000  # values after expanding aliases: a config has tens


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is expanded (shared nodes counted each time)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once instead of looping
        if isinstance(node, yaml.SequenceNode):
            memo[id(node)] += sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[id(node)] += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[id(node)]


def load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)`` refusing documents whose aliases expand past :data:`MAX_YAML_NODES`
    values (an "anchor bomb" of a few hundred bytes would otherwise fill the memory)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{what} expands to more than {MAX_YAML_NODES:,} values through YAML aliases; "
                              "write the values out")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()

