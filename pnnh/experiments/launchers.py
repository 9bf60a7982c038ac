"""Where the runs of a grid execute: this process, N local worker processes, or Slurm jobs.

A launcher takes a batch of runs (:meth:`submit`) and returns one handle per run; a handle says
whether its run is ``queued``, ``running`` or ``ended`` and, once ended, why it failed if it did.
Whether a run *finished* is never taken from the launcher: the runner reads the run directory.

- :class:`InProcess`: one run after another in this process (``--launcher local --jobs 1``).
- :class:`LocalProcesses`: up to N worker processes (``python -m pnnh.experiments``),
  the cores split between them (``--launcher local --jobs N``).
- :class:`SlurmJobs`: one Slurm job per run, submitted as a job array through submitit
  (``--launcher slurm``); ``cluster="local"`` uses submitit's local executor instead of sbatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, PnnhError
from .grid import Run
from .worker import execute

__all__ = ["LaunchOptions", "LaunchError", "InProcess", "LocalProcesses", "SlurmJobs", "make_launcher",
           "usable_cores"]


class LaunchError(PnnhError):
    """Runs could not be handed to the scheduler (``sbatch`` refused them)."""

    exit_code = 1


@dataclass
class LaunchOptions:
    """How to launch a grid (the ``--launcher`` family of command-line options)."""

    launcher: str = "local"  # local | slurm
    jobs: int = 1  # local: runs at once, each in its own worker process when > 1
    threads: int | None = None  # torch threads per run [local: cores // jobs; slurm: cpus]
    partition: str | None = None  # slurm partition [the cluster's default]
    time_min: int = 60  # slurm time limit per run, minutes
    cpus: int | None = None  # slurm CPUs per run [threads, else 1]
    gpus: int = 0  # slurm GPUs per run
    array_parallelism: int | None = None  # slurm: at most this many array tasks at once [no limit]
    cluster: str = "slurm"  # submitit cluster: slurm, or local (submitit's executor without a scheduler)

    def validate(self) -> "LaunchOptions":
        if self.launcher not in ("local", "slurm"):
            raise ConfigError(f"unknown launcher {self.launcher!r}; use local or slurm")
        for name in ("jobs", "threads", "time_min", "cpus", "array_parallelism"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {v}")
        if self.gpus < 0:
            raise ConfigError(f"gpus must be >= 0, got {self.gpus}")
        if self.cluster not in ("slurm", "local"):
            raise ConfigError(f"unknown submitit cluster {self.cluster!r}; use slurm or local")
        return self


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _spec(run: Run, marker: str | None, threads: int | None) -> dict[str, Any]:
    cfg = run.cfg if run.cfg.threads is not None or threads is None else run.cfg.replace(threads=threads)
    return {"cfg": cfg.to_dict(), "marker": marker}


class _Done:
    """The handle of a run that already ended (in-process)."""

    def __init__(self, error: str | None):
        self._error = error

    def state(self) -> str:
        return "ended"

    def error(self) -> str | None:
        return self._error


class InProcess:
    """Train each run in this process, one after another; errors other than divergence propagate."""

    slots = 1

    def __init__(self, threads: int | None = None, on_step: Callable[[Run], Callable[[int], None] | None] | None = None):
        self.threads = threads
        self.on_step = on_step

    def describe(self) -> str:
        return "in this process"

    def submit(self, runs: list[Run], marker: str | None) -> list[_Done]:
        (run,) = runs
        execute(_spec(run, marker, self.threads), on_step=self.on_step(run) if self.on_step else None)
        return [_Done(None)]

    def close(self, handles: list[Any]) -> None:
        pass


class _Process:
    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc, self.log_path = proc, log_path

    def state(self) -> str:
        return "running" if self.proc.poll() is None else "ended"

    def error(self) -> str | None:
        rc = self.proc.poll()
        if rc == 0:
            return None
        how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        last = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        return f"worker process {self.proc.pid} {how}" + (f": {last[0]}" if last else "") + f" (log: {self.log_path})"


class LocalProcesses:
    """Up to ``jobs`` worker processes at once, each training one run with ``threads`` threads.

    Each worker writes its output to ``log_dir/<run id>.log``. Interrupting the runner stops the
    workers; their runs resume from their checkpoints on the next invocation.
    """

    def __init__(self, jobs: int, threads: int | None, log_dir: Path):
        self.slots = jobs
        self.threads = threads or max(1, usable_cores() // jobs)
        self.log_dir = Path(log_dir)

    def describe(self) -> str:
        return f"{self.slots} worker processes of {self.threads} thread{'s' if self.threads > 1 else ''}"

    def submit(self, runs: list[Run], marker: str | None) -> list[_Process]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding this pnnh package
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        handles = []
        for run in runs:
            log_path = self.log_dir / (run.run_id.replace("/", "_") + ".log")
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "pnnh.experiments",
                                         json.dumps(_spec(run, marker, self.threads))],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            handles.append(_Process(proc, log_path))
        return handles

    def close(self, handles: list[_Process]) -> None:
        """Stop workers still running (the runner was interrupted)."""
        for h in handles:
            if h.proc.poll() is None:
                h.proc.terminate()
        for h in handles:
            try:
                h.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()


class _SlurmQueue:
    """``squeue`` states of this user's jobs, one call per ``every_s`` at most."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.t, self.states = every_s, -1e9, {}

    def state(self, job_id: str) -> str | None:
        if time.monotonic() - self.t >= self.every_s:
            p = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True)
            if p.returncode == 0:  # a failed call keeps the last known states
                self.states = dict(ln.split(None, 1) for ln in p.stdout.splitlines() if " " in ln)
                self.t = time.monotonic()
        return self.states.get(job_id)


class _Job:
    def __init__(self, job: Any, queue: _SlurmQueue | None):
        self.job, self.queue, self.t0 = job, queue, time.monotonic()

    def state(self) -> str:
        if self.job.paths.result_pickle.exists():
            return "ended"
        if self.queue is None:  # submitit's local executor knows its processes
            return "ended" if self.job.done() else "running"
        s = self.queue.state(self.job.job_id)
        if s is None:  # not (or no longer) in the queue: give a fresh submission a moment to appear
            return "queued" if time.monotonic() - self.t0 < 10 else "ended"
        return "running" if s in ("RUNNING", "COMPLETING") else "queued"

    def error(self) -> str | None:
        if self.job.paths.result_pickle.exists():
            try:
                self.job.result()
                return None
            except Exception as e:  # noqa: BLE001 - the job's own error, reported as a line
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                return f"job {self.job.job_id} failed: {lines[-1] if lines else type(e).__name__}"
        return (f"job {self.job.job_id} ended without a result (cancelled, out of time or killed); "
                f"log: {self.job.paths.stderr}")


class SlurmJobs:
    """Every run a Slurm job; one submission per batch, as a job array (submitit's ``map_array``).

    Job files and logs go to ``folder`` (``OUT/slurm``). Each job trains with ``cpus`` threads.
    Interrupting the runner leaves submitted jobs to the scheduler (``scancel`` them, or let them
    finish and re-run: finished runs are kept).
    """

    def __init__(self, opts: LaunchOptions, folder: Path, name: str = "pnnh"):
        try:
            import submitit
        except ImportError:
            raise ConfigError("the slurm launcher needs submitit: pip install 'pnnh[slurm]'") from None
        if opts.cluster == "slurm" and subprocess.run(["which", "sbatch"], capture_output=True).returncode != 0:
            raise ConfigError("the slurm launcher needs sbatch on this machine (a Slurm login node); "
                              "see docs/experiments.md for a one-node cluster to try it")
        self.opts = opts
        self.cpus = opts.cpus or opts.threads or 1
        self.threads = opts.threads or self.cpus
        self.slots = 10 ** 6  # the scheduler decides what runs at once
        self.queue = _SlurmQueue() if opts.cluster == "slurm" else None
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=opts.cluster)
        params: dict[str, Any] = dict(name=name, timeout_min=opts.time_min, cpus_per_task=self.cpus, nodes=1,
                                      tasks_per_node=1)
        if opts.gpus:
            params["gpus_per_node"] = opts.gpus
        if opts.partition:
            params["slurm_partition"] = opts.partition
        if opts.array_parallelism:
            params["slurm_array_parallelism"] = opts.array_parallelism
        self.executor.update_parameters(**params)

    def describe(self) -> str:
        where = f"partition {self.opts.partition}" if self.opts.partition else "the default partition"
        return (f"{'Slurm' if self.opts.cluster == 'slurm' else 'submitit local'} jobs on {where}, "
                f"{self.cpus} CPU{'s' if self.cpus > 1 else ''}" + (f", {self.opts.gpus} GPU(s)" if self.opts.gpus else "")
                + f", {self.opts.time_min} min each")

    def submit(self, runs: list[Run], marker: str | None) -> list[_Job]:
        try:
            jobs = self.executor.map_array(execute, [_spec(r, marker, self.threads) for r in runs])
        except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError with sbatch's stderr
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise LaunchError(f"could not submit {len(runs)} run(s) to Slurm: {lines[-1] if lines else e} "
                              "(is this a Slurm login node, with SLURM_CONF set where needed?)") from None
        return [_Job(j, self.queue) for j in jobs]

    def close(self, handles: list[_Job]) -> None:
        pass


def make_launcher(opts: LaunchOptions, out: Path, name: str = "pnnh",
                  on_step: Callable[[Run], Callable[[int], None] | None] | None = None):
    """The launcher ``opts`` asks for; its files go under ``out`` (``logs/``, ``slurm/``)."""
    opts.validate()
    if opts.launcher == "slurm":
        return SlurmJobs(opts, Path(out) / "slurm", name=name)
    if opts.jobs == 1:
        return InProcess(opts.threads, on_step=on_step)
    return LocalProcesses(opts.jobs, opts.threads, Path(out) / "logs")
