"""Experiment grids: one runner for studies and ablations.

- :mod:`~pnnh.experiments.grid`: a grid is a list of engine runs (data; definitions in ``configs/``);
- :mod:`~pnnh.experiments.state`: the one rule for reusing finished runs and resuming partial ones;
- :mod:`~pnnh.experiments.runner`: :func:`run_grid`, progress (done / running / left, ETA);
- :mod:`~pnnh.experiments.launchers`: this process, N local worker processes, or Slurm (submitit);
- :mod:`~pnnh.experiments.stats`: mean, sample std, Welch standard error of a difference.
"""

from .grid import Grid, Run, load_yaml, run_cost
from .launchers import LaunchOptions, make_launcher
from .runner import RunsFailedError, run_grid
from .stats import difference, mean, mean_std, sample_std, welch_se

__all__ = ["Grid", "Run", "load_yaml", "run_cost", "LaunchOptions", "make_launcher", "RunsFailedError", "run_grid",
           "mean", "sample_std", "mean_std", "welch_se", "difference"]
