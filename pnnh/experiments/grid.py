"""A grid of training runs as data: what runs, where, and how much each costs.

A grid is a list of :class:`Run` s, each one ordinary engine run (:func:`pnnh.train.train`) with
its own directory ``cfg.out``. Who builds the list decides the layout (``pnnh study``:
``OUT/runs/<family><depth>-s<seed>``; ``pnnh ablate``: ``OUT/<budget>/d<depth>/<variant>/s<seed>``);
the runner (:mod:`pnnh.experiments.runner`) only trains, reuses and resumes them.

Grid definitions (study presets, the ablation's variants and budgets) are YAML files under the
repository's ``configs/`` directory, read by :func:`load_yaml`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import models
from ..errors import ConfigError

__all__ = ["Run", "Grid", "CONFIG_DIR", "load_yaml", "run_cost"]

def _config_dir() -> Path:
    """``configs/`` of the source tree (editable install), else the copy a wheel installs under
    ``<prefix>/share/pnnh/configs``."""

    tree = Path(__file__).resolve().parents[2] / "configs"
    installed = Path(sys.prefix) / "share" / "pnnh" / "configs"
    return tree if tree.is_dir() or not installed.is_dir() else installed


CONFIG_DIR = _config_dir()


@dataclass
class Run:
    """One training run of a grid.

    ``run_id`` is unique in the grid and names the run's log file; ``label`` is how progress
    lines call it (``plain56 seed 0``); ``cfg`` is the full :class:`~pnnh.train.TrainConfig`
    (``cfg.out`` the run directory, ``cfg.resume`` true).
    """

    run_id: str
    label: str
    cfg: Any  # TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out)


@dataclass
class Grid:
    """Runs that share an output directory.

    ``marker``: a file the runner writes into a run directory when the run completes, holding the
    config it was trained with (``pnnh ablate`` keeps its ``ablate_config.json``); ``None`` reads
    the config back from the run's checkpoint only.
    """

    name: str
    out: Path
    runs: list[Run]
    marker: str | None = None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (relative paths are tried as given, then under ``configs/``)."""

    p = Path(path)
    if not p.exists() and not p.is_absolute() and (CONFIG_DIR / p).exists():
        p = CONFIG_DIR / p
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def run_cost(cfg: Any) -> float:
    """A relative cost for ETAs: training images x (depth + 4) x width² (conv FLOPs scale so), plus
    a third of an image per test image for evaluation."""

    try:
        depth = models.model_info(cfg.model).depth or 20
    except Exception:  # noqa: BLE001 - an unknown model fails later, in the engine, with a clear error
        depth = 20
    width = float((cfg.model_kwargs or {}).get("width", 1.0))
    per_epoch = cfg.train_subset or 60000
    steps = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * per_epoch // cfg.batch_size
    test = cfg.test_subset or 10000
    return (steps * cfg.batch_size + test / 3) * (depth + 4) * width ** 2
