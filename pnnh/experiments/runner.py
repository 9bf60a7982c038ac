"""Run a grid: reuse finished runs, launch the others, follow them, report progress.

:func:`run_grid` is the one loop behind ``pnnh study`` and ``pnnh ablate``:

1. refuse the grid if a run on disk was configured differently (:func:`pnnh.experiments.state.check_grid`);
2. keep every finished run as it is (no training, no file touched);
3. hand the other runs to the launcher, as many at once as it has slots; a run with a checkpoint
   resumes from it;
4. after each run ends, log its result with runs done / running / left and an ETA, and call
   ``on_run_end`` (the study rewrites its partial results there);
5. return the summaries of the finished runs, read from their directories.

A run whose worker or job dies is reported and the others go on; the grid then fails with
:class:`RunsFailedError`, and the next invocation resumes the dead run from its last checkpoint.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable

from ..errors import PnnhError
from .grid import Grid, Run, run_cost
from .state import check_grid, finished, has_checkpoint

__all__ = ["run_grid", "RunsFailedError", "Progress", "fmt_time", "result_words", "step_reporter"]


class RunsFailedError(PnnhError):
    """Some runs of a grid ended without finishing (a worker or job died, or raised)."""

    exit_code = 1


def fmt_time(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def result_words(s: dict[str, Any]) -> str:
    if s.get("status") == "diverged":
        return "diverged"
    return f"test acc {s['test_acc'] * 100:.1f}%, {s['train_img_per_s']:.0f} train img/s"


class Progress:
    """Counts of runs done / running / queued / left and an ETA from the rate of this invocation.

    The rate is seconds per unit of :func:`~pnnh.experiments.grid.run_cost`, measured on runs
    trained from scratch here (a resumed run did only part of its work); the ETA spreads the
    remaining cost over the launcher's slots.
    """

    def __init__(self, grid: Grid, slots: int):
        self.cost = {r.run_id: run_cost(r.cfg) for r in grid.runs}
        self.total = len(grid.runs)
        self.slots = slots
        self.done = 0
        self.spent_s = self.spent_cost = 0.0
        self.start = time.time()
        self.started: dict[str, float] = {}  # run id -> time it was launched (active runs)
        self.state: dict[str, str] = {}  # run id -> running | queued (active runs)
        self.pending: list[str] = []  # run ids not launched yet

    def finished(self, run_id: str, seconds: float | None) -> None:
        self.done += 1
        self.started.pop(run_id, None)
        self.state.pop(run_id, None)
        if seconds is not None:
            self.spent_s += seconds
            self.spent_cost += self.cost[run_id]

    def eta(self) -> float:
        n = len(self.pending) + len(self.started)
        if not n:
            return 0.0
        if not self.spent_cost:
            return math.nan
        rate = self.spent_s / self.spent_cost
        now = time.time()
        active = [max(0.0, rate * self.cost[r] - (now - t0)) for r, t0 in self.started.items()
                  if self.state.get(r) == "running"]
        active += [rate * self.cost[r] for r in self.started if self.state.get(r) != "running"]
        left = sum(rate * self.cost[r] for r in self.pending) + sum(active)
        return left / max(1, min(self.slots, n))

    def line(self) -> str:
        running = sum(s == "running" for s in self.state.values())
        queued = sum(s == "queued" for s in self.state.values())
        left = self.total - self.done - running - queued
        eta = self.eta()
        q = f", {queued} queued" if queued else ""
        return (f"{self.done} done, {running} running{q}, {left} left | elapsed {fmt_time(time.time() - self.start)}, "
                f"ETA {fmt_time(eta) if math.isfinite(eta) else '?'}")


def step_reporter(run: Run, log: Callable[[str], None], every_s: float = 30.0) -> Callable[[int], None]:
    """An ``on_step`` that logs progress inside a long in-process run at most every ``every_s`` seconds."""
    total = run.cfg.steps  # with epochs the engine knows the step count; we show steps only
    t0 = time.time()
    last = [t0]

    def on_step(step: int) -> None:
        now = time.time()
        if now - last[0] >= every_s:
            last[0] = now
            of = f"/{total}" if total else ""
            log(f"      {run.label}: step {step}{of}, {fmt_time(now - t0)} in this session")

    return on_step


def _start_words(run: Run, partial: bool) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted((run.cfg.model_kwargs or {}).items()))
    return (f"{'resuming from its checkpoint' if partial else 'training'} {run.cfg.model}"
            + (f" ({opts})" if opts else "") + " ...")


def run_grid(grid: Grid, launcher: Any, *, log: Callable[[str], None] = print,
             on_run_end: Callable[[], None] | None = None, heartbeat_s: float = 30.0,
             poll_s: float = 0.5) -> dict[str, dict[str, Any] | None]:
    """Train every unfinished run of ``grid`` with ``launcher``; return ``{run id: summary or None}``.

    ``launcher`` is one of :mod:`pnnh.experiments.launchers`. Summaries come from the run
    directories (finished runs only), never from the launcher.
    """
    check_grid(grid)
    n = len(grid.runs)
    tag = {r.run_id: f"[{i + 1}/{n}] {r.label}" for i, r in enumerate(grid.runs)}
    todo: deque[Run] = deque()
    progress = Progress(grid, launcher.slots)
    for run in grid.runs:
        prev = finished(run)
        if prev is not None:
            progress.done += 1
            log(f"{tag[run.run_id]}: finished earlier, kept ({result_words(prev)})")
        else:
            todo.append(run)
    progress.pending = [r.run_id for r in todo]
    if todo and launcher.slots > 1:
        log(f"launching {len(todo)} run{'s' if len(todo) > 1 else ''} on {launcher.describe()}")
    active: dict[str, tuple[Run, Any, bool]] = {}  # run id -> (run, handle, resumed)
    failures: list[str] = []
    last_beat = time.time()
    try:
        while todo or active:
            free = launcher.slots - len(active)
            if todo and free > 0:
                batch = [todo.popleft() for _ in range(min(free, len(todo)))]
                partial = {r.run_id: has_checkpoint(r) for r in batch}
                for r in batch:
                    log(f"{tag[r.run_id]}: {_start_words(r, partial[r.run_id])}")
                    progress.pending.remove(r.run_id)
                    progress.started[r.run_id] = time.time()
                    progress.state[r.run_id] = "queued"
                for r, h in zip(batch, launcher.submit(batch, grid.marker)):
                    active[r.run_id] = (r, h, partial[r.run_id])
                    progress.state[r.run_id] = h.state()
            for rid, (run, handle, resumed) in list(active.items()):
                state = handle.state()
                if state != "ended":
                    progress.state[rid] = state
                    continue
                del active[rid]
                took = time.time() - progress.started[rid]
                summary = finished(run)
                if summary is None:
                    progress.started.pop(rid)
                    progress.state.pop(rid)
                    why = handle.error() or "it ended without writing its summary"
                    failures.append(f"{run.run_id}: {why}")
                    log(f"{tag[rid]}: failed, {why}; re-run to resume it from its last checkpoint")
                    continue
                fresh = None if resumed or summary.get("status") != "complete" else summary.get("wall_s", took)
                progress.finished(rid, fresh)
                log(f"{tag[rid]}: {result_words(summary)}, {took:.1f} s | {progress.line()}")
                if on_run_end is not None:
                    on_run_end()
            if active:
                if time.time() - last_beat >= heartbeat_s:
                    last_beat = time.time()
                    log(f"progress: {progress.line()}")
                time.sleep(poll_s)
    except BaseException:
        launcher.close([h for _, h, _ in active.values()])
        raise
    if failures:
        raise RunsFailedError(f"{len(failures)} of {n} runs did not finish ({'; '.join(failures[:3])}"
                              f"{' ...' if len(failures) > 3 else ''}); re-run the same command to resume them")
    return {r.run_id: finished(r) for r in grid.runs}
