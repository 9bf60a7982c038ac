"""The one rule for reusing and resuming runs, read from the run directory alone.

- A run is **finished** when its ``summary.json`` says ``complete`` or ``diverged``; it is never
  trained again, and results are assembled from finished run directories only.
- A run with a checkpoint but no final summary is **partial**: training it again resumes from
  the last checkpoint (the engine's ``resume=True``), so no step is done twice and no epoch is
  logged twice.
- A run on disk is reused or resumed only when the config it was trained with agrees with the
  one asked for on :data:`RESULT_KEYS` (the engine's resume keys plus the test subset, which
  changes the reported accuracy); otherwise the whole grid is refused before anything trains.
  That config is read from the grid's marker file when there is one, else from the checkpoint;
  a key missing there (a field newer than the run) counts as its default value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..train.checkpoint import read_metadata
from ..train.config import RESUME_KEYS, TrainConfig
from ..train.engine import CKPT_NAME
from ..utils import atomic_write_text
from .grid import Grid, Run

__all__ = ["RESULT_KEYS", "MARKER_EXCLUDES", "summary", "finished", "has_checkpoint", "recorded_config",
           "conflicts", "check_grid", "write_marker", "marker_config"]

# the engine's RESUME_KEYS plus the test subset, which changes the reported accuracy
RESULT_KEYS = RESUME_KEYS + ("test_subset",)
# config fields left out of a marker file: where and how a run executes, not what it computes
MARKER_EXCLUDES = ("out", "resume", "progress", "threads")
FINISHED = ("complete", "diverged")


def summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json``, or ``None`` (absent or unreadable)."""
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn summary cannot happen (atomic writes) but a hand-edited one can


def finished(run: Run) -> dict[str, Any] | None:
    """The summary of a finished (complete or diverged) run, else ``None``."""
    s = summary(run.dir)
    return s if s is not None and s.get("status") in FINISHED else None


def has_checkpoint(run: Run) -> bool:
    return (run.dir / CKPT_NAME).exists()


def marker_config(cfg: Any) -> dict[str, Any]:
    """What a marker file records: the run's config without :data:`MARKER_EXCLUDES`."""
    return {k: v for k, v in cfg.to_dict().items() if k not in MARKER_EXCLUDES}


def write_marker(run: Run, marker: str) -> None:
    atomic_write_text(run.dir / marker, json.dumps(marker_config(run.cfg), indent=1) + "\n")


def recorded_config(run: Run, marker: str | None) -> dict[str, Any] | None:
    """The config the run on disk was trained with: the marker file, else the checkpoint's."""

    if marker and (run.dir / marker).exists():
        try:
            return json.loads((run.dir / marker).read_text())
        except (OSError, json.JSONDecodeError):
            pass
    ckpt = run.dir / CKPT_NAME
    if not ckpt.exists():
        return None
    try:
        return read_metadata(ckpt).get("state", {}).get("config")
    except CheckpointError:
        return None  # the engine itself reports a corrupt checkpoint when it resumes


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v))


def conflicts(run: Run, marker: str | None = None) -> list[str]:
    """How the run on disk was configured differently from ``run`` (empty: compatible or absent)."""

    now = run.cfg.to_dict()
    saved = recorded_config(run, marker)
    if saved is not None:
        default = TrainConfig().to_dict()
        return [f"{k}: on disk {saved.get(k, default[k])!r}, now {now[k]!r}" for k in RESULT_KEYS
                if _plain(saved.get(k, default[k])) != _plain(now[k])]
    s = summary(run.dir)
    if s is None:
        return []
    return [f"{k}: on disk {s.get(k)!r}, now {now[k]!r}" for k in ("model", "model_kwargs", "data", "seed")
            if k in s and _plain(s.get(k)) != _plain(now[k])]


def check_grid(grid: Grid) -> None:
    """Refuse (before training anything) runs on disk that were made with other settings."""
    bad = []
    for run in grid.runs:
        diff = conflicts(run, grid.marker)
        if diff:
            bad.append(f"{run.run_id} ({'; '.join(diff)})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(f"{grid.out} holds runs made with different settings: {', '.join(bad[:3])}{more}. "
                          f"Use another --out, or delete those run directories to redo them")
