"""``pnnh models``: the registered models, with parameter counts kept in a cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import click
import torch

from .. import models
from ..errors import ConfigError
from ..models import create_model, list_models, model_info
from ..utils import atomic_write_text

__all__ = ["models_cmd"]


def _count_params(name: str) -> int | None:
    """Parameters of ``name`` at its defaults, built on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"):
            m = create_model(name)
    except Exception:  # some init functions do not run on meta tensors
        try:
            m = create_model(name)
        except Exception:
            return None
    return sum(p.numel() for p in m.parameters())


class _ParamCache:
    """Parameter counts of registered models, kept in ``~/.cache/pnnh/param-counts.json`` (or
    ``$XDG_CACHE_HOME``) under a key made of the model sources and the torch version: building
    every model once takes minutes on a small CPU, reading the cache milliseconds."""

    def __init__(self) -> None:
        src = sorted(Path(models.__file__).parent.glob("*.py"))
        digest = hashlib.sha256(torch.__version__.encode())
        for p in src:
            digest.update(p.name.encode() + p.read_bytes())
        self.key = digest.hexdigest()[:16]
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = root / "pnnh" / "param-counts.json"
        self.counts: dict[str, int | None] = {}
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("key") == self.key:
                self.counts = dict(saved["counts"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        self.dirty = False

    def get(self, name: str) -> int | None:
        if name not in self.counts:
            self.counts[name] = _count_params(name)
            self.dirty = True
        return self.counts[name]

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"key": self.key, "counts": self.counts}))
        except OSError:  # a read-only home: counting again next time is fine
            pass


@click.command("models")
@click.argument("pattern", required=False)
@click.option("--family", help="Only this family (plain, resnet, preact_resnet, pnnh, vit ...).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(pattern: str | None, family: str | None, as_json: bool) -> None:
    """List registered models matching PATTERN (a glob such as 'plain*').

    Any CIFAR-layout depth builds by name (resnet14, pnnh26, ...), listed or not.
    """
    if family is not None:
        families = sorted({model_info(n).family for n in list_models()})
        if family not in families:
            raise ConfigError(f"unknown family {family!r}; families: {', '.join(families)}")
    names = list_models(pattern, family=family)
    if not names:
        raise ConfigError(f"no model matches {pattern!r}" + (f" in family {family!r}" if family else ""))
    cache = _ParamCache()
    rows = []
    if not as_json:
        click.echo(f"{'name':<24}{'family':<16}{'depth':>6}  {'layout':<9}{'params (1ch,10cls)':>19}")
    try:
        for name in names:  # rows appear as they are counted: a first, uncached listing takes a while
            info = model_info(name)
            r = {"name": name, "family": info.family, "depth": info.depth, "layout": info.layout,
                 "params": cache.get(name), "doc": info.doc}
            rows.append(r)
            if not as_json:
                params = f"{r['params'] / 1e6:.3f}M" if r["params"] is not None else "?"
                click.echo(f"{r['name']:<24}{r['family']:<16}{r['depth'] or '':>6}  {r['layout'] or '':<9}{params:>19}")
    finally:
        cache.save()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
