"""The ``--launcher`` command-line options shared by ``pnnh study`` and ``pnnh ablate``."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..experiments.launchers import LaunchOptions

__all__ = ["launcher_options", "launch_options_from"]

_OPTIONS = [
    click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
                 help="local: this machine (--jobs worker processes); slurm: one Slurm job per run (submitit)."),
    click.option("--jobs", type=int, default=1, show_default=True,
                 help="local: runs at once, each in its own process, the cores split between them."),
    click.option("--slurm-partition", help="slurm: partition [the cluster's default]."),
    click.option("--slurm-time", type=int, default=60, show_default=True, help="slurm: time limit per run, minutes."),
    click.option("--slurm-cpus", type=int, help="slurm: CPUs per run [--threads, else 1]."),
    click.option("--slurm-gpus", type=int, default=0, show_default=True, help="slurm: GPUs per run."),
    click.option("--slurm-array-parallelism", type=int, help="slurm: at most this many runs at once [no limit]."),
]
_NAMES = ("launcher", "jobs", "slurm_partition", "slurm_time", "slurm_cpus", "slurm_gpus", "slurm_array_parallelism")


def launcher_options(fn: Callable) -> Callable:
    """Add the launcher options to a click command (they arrive as keyword arguments)."""
    for opt in reversed(_OPTIONS):
        fn = opt(fn)
    return fn


def launch_options_from(kwargs: dict[str, Any], threads: int | None) -> LaunchOptions:
    """Pop the launcher options out of a command's keyword arguments."""
    v = {k: kwargs.pop(k) for k in _NAMES}
    return LaunchOptions(launcher=v["launcher"], jobs=v["jobs"], threads=threads, partition=v["slurm_partition"],
                         time_min=v["slurm_time"], cpus=v["slurm_cpus"], gpus=v["slurm_gpus"],
                         array_parallelism=v["slurm_array_parallelism"]).validate()
