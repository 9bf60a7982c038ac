"""Per-run results read from a finished run directory (``summary.json`` + ``metrics.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["curves", "metric_lines"]


def curves(summary: dict[str, Any], metrics: Path) -> dict[str, list[list[float]]]:
    """Training loss per logged step (the engine's curve) and per-epoch metrics, as [step, value] pairs."""
    out: dict[str, list[list[float]]] = {"train_loss": summary.get("curve") or []}
    lines = metric_lines(metrics)
    for key in ("train_acc", "test_acc", "test_loss"):
        out[key] = [[ln["step"], ln[key]] for ln in lines if ln.get(key) is not None]
    return out


def metric_lines(metrics: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (one per evaluated epoch); none when it is missing or torn."""
    try:
        return [json.loads(ln) for ln in Path(metrics).read_text().splitlines() if ln.strip()]
    except (OSError, json.JSONDecodeError):
        return []
