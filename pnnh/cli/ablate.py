"""``pnnh ablate``: the PNNH design-space ablation of :mod:`pnnh.report.ablate` from the command line."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from ..bench import BenchConfig, run_bench
from ..bench.bench import parse_spec
from ..errors import ConfigError
from ..report.ablate import (BUDGETS, DEFAULTS, VARIANTS, Variant, choose_lr, format_report, frontiers, run_ablation,
                             selection_variants, split_variants, write_frontier_figures, write_html_report)
from ..train.config import TrainConfig
from .options import launch_options_from, launcher_options

__all__ = ["ablate_cmd"]


@click.command("ablate")
@click.option("--variants", default=DEFAULTS.get("variants"), show_default=True,
              help="Comma-separated variant labels (see --list), or label=template:k=v,... with {d} for the depth.")
@click.option("--depths", default=DEFAULTS.get("depths"), show_default=True, help="Comma-separated CIFAR-layout depths.")
@click.option("--seeds", default=DEFAULTS.get("seeds"), show_default=True, help="Comma-separated seeds.")
@click.option("--budgets", default=DEFAULTS.get("budgets"), show_default=True,
              help="Comma-separated budgets of configs/ablate.yaml: "
                   + ", ".join(f"{k} ({', '.join(f'{u}={n}' for u, n in v.items())})" for k, v in BUDGETS.items())
                   + ".")
@click.option("--short-steps", type=int, help="Override the short budget's steps.")
@click.option("--long-epochs", type=int, help="Override the long budget's epochs.")
@click.option("--data", default="fashion-mnist", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--train-subset", type=int, help="Train on the first N images (quick checks only).")
@click.option("--test-subset", type=int, help="Evaluate on the first N test images (quick checks only).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per run.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the Markdown report here (OUT/report.html is written either way).")
@click.option("--speed/--no-speed", default=False, help="Also measure training img/s side by side (PNNH vs ResNet).")
@click.option("--speed-variants", default=DEFAULTS.get("speed_variants"), show_default=True,
              help="Variants timed by --speed (the first is the reference of the ratio).")
@click.option("--speed-depths", help="Depths timed by --speed [the --depths].")
@click.option("--select-lr", help="Comma-separated peak learning rates: choose each family's lr at every depth "
              "on --select-budget first (the best mean test accuracy, no seed diverged) and train the budgets at it. "
              "A variant is its own family unless configs/ablate.yaml names its `family` (a narrower width of a "
              "design trains at the lr chosen for its full width).")
@click.option("--select-budget", default=DEFAULTS.get("select_budget", "screen"), show_default=True,
              help="The budget the lr selection trains.")
@click.option("--select-seeds", default=DEFAULTS.get("select_seeds", "0,1"), show_default=True,
              help="Seeds of the lr selection.")
@click.option("--frontier", is_flag=True, help="Add accuracy-vs-cost tables and plots per budget and depth (widths of "
              "one design joined; speed from --speed). With --report the plots are PNGs beside it.")
@click.option("--frontier-reference-depth", type=int, help="Join every depth of a budget into one frontier, "
              "compared with --reference at this depth (depth and width as two ways to a cheaper net); --speed then "
              "times all depths in one side-by-side measurement, this depth's reference first.")
@click.option("--dry-run", is_flag=True, help="Only report finished runs; train nothing.")
@click.option("--notes", type=click.Path(dir_okay=False, exists=True), help="Markdown file to include in the report.")
@click.option("--reference", default="resnet", show_default=True,
              help="Variant every other is compared with in the report (accuracy difference, parameter ratio); "
                   "'' for none.")
@launcher_options
@click.option("--list", "list_", is_flag=True, help="List the known variants and exit.")
def ablate_cmd(variants, depths, seeds, budgets, short_steps, long_epochs, data, data_dir, train_subset, test_subset,
               threads, out, report_path, speed, speed_variants, speed_depths, select_lr, select_budget, select_seeds,
               frontier, frontier_reference_depth, dry_run, notes, reference, list_, **launch) -> None:
    """PNNH coder variants x depths x seeds x budgets against plain / dirac / looks-linear / ResNet.

    Resumable: finished runs are reused, interrupted runs continue from their checkpoint.
    Variants, budgets and defaults: configs/ablate.yaml.
    """
    if list_:
        rows = [(v.label, v.template, json.dumps(v.kwargs), v.doc) for v in VARIANTS.values()]
        widths = [max(len(r[i]) for r in rows) + 2 for i in range(3)]
        for r in rows:
            click.echo("".join(c.ljust(w) for c, w in zip(r, widths)) + r[3])
        return
    launch_opts = launch_options_from(launch, threads)
    vs = split_variants(variants)
    ds, ss = _integers(depths, "--depths"), _integers(seeds, "--seeds")
    bs = [t.strip() for t in budgets.split(",") if t.strip()]
    for b in bs + ([select_budget] if select_lr else []):
        if b not in BUDGETS:
            raise ConfigError(f"unknown budget {b!r}; use {' and/or '.join(BUDGETS)}")
    budget_defs = {k: dict(v) for k, v in BUDGETS.items()}
    if short_steps:
        budget_defs["short"] = {"steps": short_steps}
    if long_epochs:
        budget_defs["long"] = {"epochs": long_epochs}
    base = {"data": data, "data_dir": data_dir, "train_subset": train_subset, "test_subset": test_subset,
            "threads": threads}
    lrs = selection = None
    if select_lr:
        grid, sel_seeds = _positive_floats(select_lr, "--select-lr"), _integers(select_seeds, "--select-seeds")
        click.echo(f"lr selection: {select_budget} budget, lr {', '.join(f'{lr:g}' for lr in grid)}, "
                   f"seeds {', '.join(map(str, sel_seeds))}")
        fams = selection_variants(vs)
        sel_records = run_ablation(fams, ds, sel_seeds, [select_budget], Path(out), base, dry_run=dry_run,
                                   log=click.echo, budget_defs=budget_defs, launch=launch_opts,
                                   lrs={(v.label, d): grid for v in fams for d in ds})
        chosen, rows = choose_lr(sel_records)
        selection = (rows, sel_seeds)
        for row in rows:
            if row["chosen"] is None:
                click.echo(f"lr not chosen yet for {row['variant']} at depth {row['depth']} (its selection runs are "
                           "not all finished): its runs wait")
        lrs = {(v.label, d): [chosen[v.lr_family, d]] for v in vs for d in ds if (v.lr_family, d) in chosen}
    records = run_ablation(vs, ds, ss, bs, Path(out), base, dry_run=dry_run, log=click.echo, budget_defs=budget_defs,
                           launch=launch_opts, lrs=lrs)
    speed_rows = None
    if speed:  # per depth (or all depths at once when joined): the first variant first, alternating by round
        svs = split_variants(speed_variants)
        sds = [int(t) for t in speed_depths.split(",")] if speed_depths else ds
        if frontier_reference_depth is not None:
            sds = sorted(sds, key=lambda d: d != frontier_reference_depth)
            groups = [[(v, d) for d in sds for v in svs]]
        else:
            groups = [[(v, d) for v in svs] for d in sds]
        speed_rows = []
        for pairs in groups:
            click.echo(f"throughput: {', '.join(f'{v.label} d{d}' for v, d in pairs)}")
            for amp in dict.fromkeys(budget_defs[b].get("amp") for b in bs):  # each precision the budgets train in
                speed_rows += side_by_side_speed(pairs, amp, threads=threads)
    command = _command_line(speed)
    fronts = (frontiers(records, speed_rows, reference or None, budget_defs, reference_depth=frontier_reference_depth)
              if frontier else None)
    links = write_frontier_figures(fronts, Path(report_path)) if fronts and report_path else None
    text = format_report(records, command, notes=Path(notes).read_text().strip() if notes else "", speed=speed_rows,
                         budget_defs=budget_defs, reference=reference or None, selection=selection, fronts=fronts,
                         figure_links=links)
    html_path = write_html_report(Path(out) / "report.html", records, command,
                                  notes=Path(notes).read_text().strip() if notes else "", speed=speed_rows,
                                  budget_defs=budget_defs, reference=reference or None, data=data,
                                  selection=selection, fronts=fronts)
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(text)
        click.echo(f"report -> {report_path} and {html_path}")
    else:
        click.echo(text)
        click.echo(f"report -> {html_path}")


def side_by_side_speed(pairs: list[tuple[Variant, int]], amp: str | None = None, **bench) -> list[dict]:
    """Training images/s of each ``(variant, depth)``, measured side by side by :func:`pnnh.bench.run_bench`.

    The models train as ``pnnh train`` trains them (the engine's optimizer and memory layout, ``amp``
    as the budget's); the ratio is to the first pair, paired round by round. ``bench`` overrides
    :class:`~pnnh.bench.BenchConfig` fields (``repeats``, ``steps``, ``batch_size``, ``threads``).
    Returns the speed rows :func:`~pnnh.report.ablate.frontiers` reads: model, kwargs, params,
    img_s, ratio, ratio_to (the first pair's model spec), steps (per model per round), batch_size, amp.
    """
    specs = [":".join([v.model(d), *(f"{k}={val}" for k, val in v.kwargs.items())]) for v, d in pairs]
    for (v, _), spec in zip(pairs, specs):
        try:
            carried = dict(parse_spec(spec).kwargs)
        except ConfigError:
            carried = None
        if carried != v.kwargs:
            raise ConfigError(f"variant {v.label}: its options {v.kwargs} do not survive a bench model spec; "
                              "time it with pnnh bench")
    cfg = BenchConfig(models=specs, amp=amp, channels_last=TrainConfig.channels_last, memory=False, peak=False,
                      **{"repeats": 6, "steps": 2, **bench})
    rows = run_bench(cfg)["rows"]
    return [{"model": v.model(d), "kwargs": v.kwargs, "params": r["params"], "img_s": r["img_per_s"],
             "ratio": r["ratio"], "ratio_to": specs[0], "steps": cfg.steps,
             "batch_size": cfg.batch_size, "amp": amp}
            for (v, d), r in zip(pairs, rows)]


def _integers(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{what} takes comma-separated integers, got {text!r}") from None


def _positive_floats(text: str, what: str) -> list[float]:
    try:
        values = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"{what} takes comma-separated numbers, got {text!r}") from None
    if not values or values[0] <= 0:
        raise ConfigError(f"{what} takes positive numbers, got {text!r}")
    return values


def _command_line(speed: bool) -> str:
    """The exact command, rebuilt from the parsed options (reproducible whatever the caller's argv was);
    where runs executed (the launcher options) does not change the results and is left out."""
    ctx = click.get_current_context()
    parts = ["OMP_NUM_THREADS=1", "python", "-m", "pnnh", "ablate"]
    skip = {"list_", "dry_run", "notes", "reference", "launcher", "jobs"}
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if p.name in skip or p.name.startswith("slurm_") or v is None or v is False or (
                p.name.startswith("speed_") and not speed) or (
                p.name.startswith("select_") and not ctx.params.get("select_lr")):
            continue
        if p.name == "speed":
            parts.append("--speed" if v else "--no-speed")
        elif getattr(p, "is_flag", False):
            parts.append(p.opts[0])
        else:
            parts += [p.opts[0], str(v)]
    return " ".join(shlex.quote(a) for a in parts)
