"""``pnnh study``: the depth study of :mod:`pnnh.report.study` from the command line."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..errors import ConfigError
from ..utils import parse_kv
from .options import launch_options_from, launcher_options

__all__ = ["study_cmd"]


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def _depths(value: str | None) -> list[int] | None:
    items = _split(value)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise ConfigError(f"--depths takes comma-separated integers such as 8,20,56, got {value!r}") from None


def _list_presets() -> None:
    from ..report.study import FAMILIES, PRESETS

    click.echo("presets:")
    for p in PRESETS.values():
        click.echo(f"  {p.name:<10} {p.description}")
        click.echo(f"  {'':<10} families {','.join(p.families)}; depths {','.join(map(str, p.depths))}; "
                   f"{p.seeds} seed(s); data {p.data}")
    click.echo("families (any registered family name also works):")
    for f in FAMILIES.values():
        kw = "".join(f" {k}={v}" for k, v in f.model_kwargs.items())
        click.echo(f"  {f.name:<14} {f.pattern}{kw}: {f.description}")


@click.command("study")
@click.option("--preset", default="quick", show_default=True,
              help="quick: Fashion-MNIST, minutes on a CPU; standard: 3 seeds up to depth 110; paper: CIFAR recipe; "
                   "or a YAML file with a preset's fields (configs/study/*.yaml).")
@click.option("--families", help="Comma-separated families, e.g. plain,resnet,pnnh,plain_dirac [preset's].")
@click.option("--depths", help="Comma-separated depths, e.g. 8,20,56,110 [preset's].")
@click.option("--seeds", type=int, help="Number of seeds per (family, depth) [preset's].")
@click.option("--data", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "imagefolder"]),
              help="Dataset [preset's].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the dataset files are.")
@click.option("--steps", type=int, help="Training steps per run (replaces the preset's budget).")
@click.option("--epochs", type=int, help="Training epochs per run (replaces the preset's budget).")
@click.option("--train-subset", type=int, help="Train on the first N images only.")
@click.option("--test-subset", type=int, help="Evaluate on the first N test images only.")
@click.option("--model-kwarg", "-k", "model_kwarg", multiple=True, metavar="KEY=VALUE",
              help="Option for every model, repeatable: -k width=0.5.")
@click.option("--device", help="cpu, cuda or auto [auto].")
@click.option("--threads", type=int, help="torch intra-op threads [all cores].")
@click.option("--out", type=click.Path(file_okay=False), help="Study directory [runs/study-<preset>].")
@click.option("--progress/--no-progress", default=None, help="Per-run progress bars [on a terminal].")
@launcher_options
@click.option("--list", "list_", is_flag=True, help="List presets and families, then exit.")
def study_cmd(preset, families, depths, seeds, data, data_dir, steps, epochs, train_subset, test_subset, model_kwarg,
              device, threads, out, progress, list_, **launch) -> None:
    """Train plain, residual and PNNH nets at several depths and write a report.

    Writes results.json, results.csv, report.md and a self-contained report.html to --out.
    Re-running the same command skips finished runs and resumes an interrupted one.
    Runs execute one after another here, in --jobs worker processes, or as Slurm jobs (--launcher slurm).
    """
    from ..report.study import plan_study, run_study

    if list_:
        _list_presets()
        return
    if steps is not None and epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    launch_opts = launch_options_from(launch, threads)
    if progress is None:
        progress = sys.stderr.isatty() and launch_opts.launcher == "local" and launch_opts.jobs == 1
    name = Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    study = plan_study(preset, out=out or f"runs/study-{name}", families=_split(families), depths=_depths(depths),
                       seeds=seeds, data=data, data_dir=data_dir, device=device, threads=threads,
                       train={"steps": steps, "epochs": epochs, "train_subset": train_subset,
                              "test_subset": test_subset},
                       model_kwargs=parse_kv(model_kwarg, "--model-kwarg"), progress=progress,
                       command="pnnh " + shlex.join(sys.argv[1:]))
    try:
        run_study(study, log=lambda line: click.echo(line), launch=launch_opts)
    except KeyboardInterrupt:
        click.echo(f"interrupted; re-run the same command to continue the study in {study.out}", err=True)
        sys.exit(130)
