"""One run of a grid, executed where a launcher puts it: in this process, in a worker process
(``python -m pnnh.experiments SPEC``) or in a Slurm job (pickled by submitit).

A spec is plain JSON: ``{"cfg": TrainConfig fields, "marker": file name or null}``. The run
directory is the only output; launchers and the runner read results from there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import DivergenceError, PnnhError
from ..train import TrainConfig, train
from .grid import Run
from .state import write_marker

__all__ = ["execute", "main"]


def execute(spec: dict[str, Any], on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``spec``; return its summary.

    A diverged run is a result (the engine has written its ``summary.json``); any other error
    propagates. A completed run gets the grid's marker file, written after its summary.
    """

    cfg = TrainConfig.from_dict(spec["cfg"])
    try:
        summary = train(cfg, on_step=on_step)
    except DivergenceError as e:
        return {"status": "diverged", "error": str(e)}
    if spec.get("marker") and summary.get("status") == "complete":
        write_marker(Run(Path(cfg.out).name, "", cfg), spec["marker"])
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m pnnh.experiments '<spec JSON>'``: exit 0 when the run finished."""

    args = sys.argv[1:] if argv is None else argv
    try:
        summary = execute(json.loads(args[0]))
    except PnnhError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps({k: summary.get(k) for k in ("status", "test_acc", "steps", "wall_s")}))
