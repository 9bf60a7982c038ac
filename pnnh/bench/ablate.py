"""``pnnh ablate``: the PNNH design-space ablation on Fashion-MNIST.

Every (budget, depth, seed, variant) is one ordinary training run (:func:`pnnh.train.train`) in
its own directory ``OUT/<budget>/d<depth>/<variant>/s<seed>``. A finished run is reused from its
``summary.json`` (when the config it was trained with, saved next to it, is the same); an
interrupted one resumes from its checkpoint. So the command is resumable and can be grown: run it
again with more seeds, depths or variants and only the missing runs train.
The config compared holds the model options a variant *names*, not the registry's defaults: after
changing a model default, rename (or delete) the runs of variants that relied on it, or they are
reused as if they were the new default (``docs/results/pnnh_ablation.md`` records such a relabel).

The report (Markdown) gives, per budget and depth, each variant's test accuracy mean ± std over
the finished seeds, parameters, training images/s and wall time, and lists runs that did not run.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..utils import parse_kv

__all__ = ["VARIANTS", "Variant", "BUDGETS", "run_ablation", "format_report", "side_by_side_throughput", "ablate_cmd"]


@dataclass(frozen=True)
class Variant:
    """A model template (``{d}`` is the depth) and its model kwargs."""

    label: str
    template: str
    kwargs: dict = field(default_factory=dict)
    doc: str = ""

    def model(self, depth: int) -> str:
        return self.template.format(d=depth)


def _s4(**kwargs) -> dict:
    """PNNH options on the session-4 default: the internal path only in the init (``path_param="init"``).
    Every PNNH variant measured before ``path_param="dirac"`` became the default pins it, so its
    runs keep their meaning (and their recorded configs) under the new default."""
    return {**kwargs, "path_param": "init"}


VARIANTS: dict[str, Variant] = {v.label: v for v in [
    Variant("resnet", "resnet{d}", {}, "ResNet twin (option-A shortcuts)"),
    Variant("plain", "plain{d}", {}, "plain twin, He init"),
    Variant("plain-dirac", "plain{d}", {"init": "dirac"}, "plain twin, identity (dirac) init"),
    Variant("plain-dirac-eqp", "plain{d}", {"init": "dirac", "width": 0.866},
            "plain twin, dirac init, width 0.866: the parameters of pnnh r=0.5 (the first default)"),
    Variant("plain-dirac-eq", "plain{d}", {"init": "dirac", "width": 0.9375},
            "dirac plain at the parameters of the session-4 default PNNH (15/30/60: 749,755 vs 746,220 at d56)"),
    Variant("plain-diracp-eq", "plain{d}", {"init": "dirac_param", "width": 0.9375},
            "DiracNet plain (identity kept in the parametrisation) at default PNNH's width (753,535 at d56)"),
    Variant("llplain", "llplain{d}", {}, "looks-linear plain: all channels mirrored CReLU, identity init (r=1)"),
    Variant("pnnh", "pnnh{d}", {}, "PNNH default"),
    Variant("pnnh-mix0", "pnnh{d}", _s4(coder_mix=0.0), "mirror coder reading only the previous code"),
    Variant("pnnh-mix0.3", "pnnh{d}", _s4(coder_mix=0.3), "mirror coder, larger learner->coder mix"),
    Variant("pnnh-r0.25", "pnnh{d}", _s4(coder_ratio=0.25), "mirror coder, ratio 0.25 (the default in sessions 2-4)"),
    Variant("pnnh-r0.5", "pnnh{d}", _s4(coder_ratio=0.5), "mirror coder, ratio 0.5 (the first default)"),
    Variant("pnnh-r0.75", "pnnh{d}", _s4(coder_ratio=0.75), "mirror coder, ratio 0.75"),
    Variant("pnnh-orth", "pnnh{d}", _s4(coder_init="orthogonal"), "mirror coder, orthogonal coder init"),
    Variant("pnnh-he", "pnnh{d}", _s4(coder_init="he"), "mirror coder, He coder init (no path at init)"),
    Variant("pnnh-lhe", "pnnh{d}", _s4(learner_init="he"), "mirror coder + He-initialised learner (first default)"),
    Variant("pnnh-lmix0.3", "pnnh{d}", _s4(learner_mix=0.3), "dirac learner + 0.3 x He noise (random features at init)"),
    Variant("pnnh-lmix1", "pnnh{d}", _s4(learner_mix=1.0), "dirac learner + 1.0 x He noise (ResNet's x + F(x) at init)"),
    Variant("pnnh-lb0.5", "pnnh{d}", _s4(learner_bias=0.5), "dirac learner, BN shift 0.5 (keeps identity features alive)"),
    Variant("pnnh-lb1", "pnnh{d}", _s4(learner_bias=1.0), "dirac learner, BN shift 1.0 (identity rows near-linear at init)"),
    Variant("pnnh-w1.0625", "pnnh{d}", _s4(width=1.0625),
            "session-4 default PNNH widened to the ResNet twin's parameter count (17/34/68: 849,195 vs 852,730 at d56)"),
    Variant("pnnh-diracp", "pnnh{d}", {"path_param": "dirac"},
            "internal path kept in the parametrisation: W = alpha P + beta V/|V| (DiracNets)"),
    Variant("pnnh-shared", "pnnh{d}", {"coder": "shared"}, "stage-shared mirror coder"),
    Variant("pnnh-tied", "pnnh{d}", {"coder": "tied"}, "tied encoder-decoder coder, summed"),
]}

BUDGETS = {"short": {"steps": 150}, "long": {"epochs": 5}}
DEFAULT_VARIANTS = "pnnh,plain,plain-dirac,llplain,resnet"


def parse_variant(text: str) -> Variant:
    """A known label, or ``label=template:key=value,key=value`` (``template`` holds ``{d}``)."""
    if "=" not in text.split(":")[0]:
        if text not in VARIANTS:
            raise ConfigError(f"unknown variant {text!r}; known: {', '.join(VARIANTS)} (or label=template:k=v,...)")
        return VARIANTS[text]
    label, rest = text.split("=", 1)
    template, _, opts = rest.partition(":")
    if "{d}" not in template:
        raise ConfigError(f"variant template {template!r} must contain {{d}} (the depth)")
    kwargs = parse_kv(tuple(filter(None, opts.split(","))), f"variant {label.strip()!r}")
    return Variant(label.strip(), template.strip(), kwargs, "custom")


def split_variants(text: str) -> list[Variant]:
    """``--variants``: comma-separated labels or custom variants, whose own ``key=value`` options
    are comma-separated too (``a=pnnh{d}:coder_ratio=0.125,path_param=init,resnet`` is two variants:
    a ``key=value`` without ``{d}`` continues the custom variant before it)."""
    items: list[str] = []
    for piece in (t.strip() for t in text.split(",")):
        if not piece:
            continue
        if items and "=" in items[-1].split(":")[0] and "=" in piece and "{d}" not in piece:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return [parse_variant(t) for t in items]


def _run_cfg(variant: Variant, depth: int, seed: int, budget: dict, base: dict, out: Path):
    from ..train.config import TrainConfig

    return TrainConfig(model=variant.model(depth), model_kwargs=dict(variant.kwargs), seed=seed, out=str(out),
                       resume=True, progress=False, **budget, **base)


def _finished(run_dir: Path, cfg) -> dict[str, Any] | None:
    """The summary of a finished run trained with this config, else None."""
    s, c = run_dir / "summary.json", run_dir / "ablate_config.json"
    if not (s.exists() and c.exists()):
        return None
    summary = json.loads(s.read_text())
    want = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "resume", "progress", "threads")}
    have = json.loads(c.read_text())
    if summary.get("status") != "complete" or have != want:
        return None
    return summary


def run_ablation(variants: list[Variant], depths: list[int], seeds: list[int], budgets: list[str], out: Path,
                 base: dict | None = None, dry_run: bool = False, log=print,
                 budget_defs: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) every run; return one record per run, finished or not.

    Order: budget, then seed, then depth, then variant — so the first seed of every cell
    finishes before any second seed starts, and a partial ablation is still a full screen.
    """
    from ..train.config import TrainConfig  # noqa: F401  (import errors early)
    from ..train.engine import train

    base = dict(base or {})
    budget_defs = budget_defs or BUDGETS
    records = []
    plan = [(b, s, d, v) for b in budgets for s in seeds for d in depths for v in variants]
    for i, (b, s, d, v) in enumerate(plan):
        run_dir = out / b / f"d{d}" / v.label / f"s{s}"
        cfg = _run_cfg(v, d, s, budget_defs[b], base, run_dir)
        rec = {"budget": b, "depth": d, "variant": v.label, "model": v.model(d), "kwargs": v.kwargs, "seed": s,
               "dir": str(run_dir)}
        summary = _finished(run_dir, cfg)
        if summary is None and not dry_run:
            log(f"[{i + 1}/{len(plan)}] {b} d{d} {v.label} seed {s} -> {run_dir}")
            t0 = time.time()
            try:
                summary = train(cfg)
            except Exception as e:  # a diverged run is a result too; record it and go on
                from ..errors import DivergenceError

                if not isinstance(e, DivergenceError):
                    raise
                summary = {"status": "diverged", "error": str(e)}
            if summary.get("status") == "complete":
                want = {k: v2 for k, v2 in cfg.to_dict().items() if k not in ("out", "resume", "progress", "threads")}
                (run_dir / "ablate_config.json").write_text(json.dumps(want, indent=1) + "\n")
            log(f"    test acc {summary.get('test_acc', float('nan')):.4f}  {time.time() - t0:.0f} s")
        rec["summary"] = summary
        records.append(rec)
    return records


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (budget, depth, variant): accuracy mean/std over finished seeds, params, speed."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["budget"], r["depth"], r["variant"])
        row = rows.setdefault(key, {"budget": key[0], "depth": key[1], "variant": key[2], "model": r["model"],
                                    "kwargs": r["kwargs"], "accs": [], "img_s": [], "wall": [], "params": None,
                                    "missing": [], "diverged": []})
        s = r["summary"]
        if s is None:
            row["missing"].append(r["seed"])
        elif s.get("status") != "complete":
            row["diverged"].append(r["seed"])
        else:
            row["accs"].append(s["test_acc"] * 100)
            row["img_s"].append(s["train_img_per_s"])
            row["wall"].append(s["wall_s"])
            row["params"] = s["params"]
    return list(rows.values())


def difference(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float] | None:
    """``row``'s mean accuracy minus ``ref``'s, with the standard error of that difference.

    Welch's form, ``sqrt(s_a^2/n_a + s_b^2/n_b)``: the seeds of two models are independent draws
    (different weights, so not paired even at the same seed). ``None`` when either has no finished
    seed; a one-seed side contributes no spread, so the error then understates the uncertainty
    (the report says so)."""
    a, b = row["accs"], ref["accs"]
    if not a or not b:
        return None
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    return ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


def format_report(records: list[dict[str, Any]], command: str, notes: str = "", speed: list[dict] | None = None,
                  budget_defs: dict[str, dict] | None = None, reference: str | None = "resnet") -> str:
    """The Markdown results page (``docs/results/pnnh_ablation.md``).

    With ``reference`` (a variant label, the ResNet twin by default) each table also gives every
    variant's accuracy difference to that variant at the same depth and budget and its parameter ratio:
    the terms the issue's criteria are stated in."""
    budget_defs = budget_defs or BUDGETS
    rows = aggregate(records)
    date = _dt.date.today().isoformat()
    finished = [r["summary"] for r in records if r["summary"] and r["summary"].get("status") == "complete"]
    augment = {s.get("augment") for s in finished}
    threads = sorted({s["threads"] for s in finished if s.get("threads")})
    thread_text = ("threads unrecorded" if not threads else "one thread" if threads == [1] else
                   f"{' or '.join(map(str, threads))} threads (see each run's summary.json)")
    aug = {frozenset({True}): "on for every run", frozenset({False}): "off for every run (the engine's automatic "
           "choice below 10 epochs)"}.get(frozenset(augment), "mixed: see each run's summary.json")
    lines = ["# PNNH ablation on Fashion-MNIST", "",
             f"Generated {date} by:", "", "```bash", command, "```", "",
             "Recipe: the engine's defaults (SGD Nesterov, lr 0.1 one-cycle, weight decay 5e-4, batch 128), "
             f"full 60k/10k Fashion-MNIST; augmentation (random crop + flip): {aug}; short budget = "
             f"{budget_defs['short']}, long budget = {budget_defs['long']}. Test accuracy in %, mean ± sample std "
             "over the finished seeds. img/s is training images per second from the engine (training time "
             f"only), {thread_text} per run, on a 2-core machine running other jobs: compare speeds only side "
             "by side (docs/benchmarks.md)."]
    if reference:
        lines += [f"Δ acc: the variant's mean minus `{reference}`'s at the same depth and budget, ± the standard "
                  "error of that difference (sqrt(s_a²/n_a + s_b²/n_b); a one-seed side adds no spread, so "
                  f"the error is then too small). params ×: the variant's parameters over `{reference}`'s."]
    lines.append("")
    if notes:
        lines += [notes, ""]
    by_cell: dict[tuple, list] = {}
    for r in rows:
        by_cell.setdefault((r["budget"], r["depth"]), []).append(r)
    for (b, d), cell in by_cell.items():
        ref = next((r for r in cell if r["variant"] == reference), None)
        head = ["variant", "model", "options", "seeds", "test acc %", "params", "train img/s", "wall s"]
        if ref is not None:
            head[5:5] = [f"Δ acc vs {reference}", "params ×"]
        lines += [f"## {b} budget, depth {d}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in cell:
            opts = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "—"
            n = len(r["accs"])
            if n:
                m, sd = _mean_std(r["accs"])
                acc = f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f} (1 seed: no spread)"
                img = f"{statistics.fmean(r['img_s']):.0f}"
                wall = f"{statistics.fmean(r['wall']):.0f}"
                params = f"{r['params']:,}"
            else:
                acc = img = wall = params = "not run"
            extra = []
            if r["missing"]:
                extra.append(f"not run: seeds {r['missing']}")
            if r["diverged"]:
                extra.append(f"diverged: seeds {r['diverged']}")
            seeds = f"{n}" + (f" ({'; '.join(extra)})" if extra else "")
            cols = [r["variant"], r["model"], opts, seeds, acc, params, img, wall]
            if ref is not None:
                delta = ratio = "—"
                diff = None if r is ref else difference(r, ref)
                if diff is not None:  # both have finished seeds, hence parameter counts
                    one_each = len(r["accs"]) == 1 == len(ref["accs"])
                    delta = f"{diff[0]:+.2f} " + ("(1 seed each: no spread)" if one_each else f"± {diff[1]:.2f}")
                    ratio = f"{r['params'] / ref['params']:.2f}"
                cols[5:5] = [delta, ratio]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    if speed:
        lines += ["## Training throughput, side by side", "",
                  "One process, one thread, alternating the models step by step (A B A B ...) so that the "
                  "machine's load hits all of them alike; forward + backward + SGD step on a batch of 128.", "",
                  "| model | options | params | img/s (median) | ratio to the first model of its depth |",
                  "|---|---|---|---|---|"]
        for s in speed:
            opts = ", ".join(f"{k}={v}" for k, v in s["kwargs"].items()) or "—"
            lines.append(f"| {s['model']} | {opts} | {s['params']:,} | {s['img_s']:.0f} | {s['ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def side_by_side_throughput(models: list[tuple[str, dict]], batch_size: int = 128, rounds: int = 6,
                            steps_per_round: int = 2, img_size: int = 28, in_chans: int = 1) -> list[dict]:
    """Training images/s of several models measured alternately in one process.

    Each round runs ``steps_per_round`` SGD steps of every model in turn; the median over rounds
    of each model's rate is reported, with the ratio to the first model.
    """
    import torch
    import torch.nn.functional as F

    from .. import models as _models

    built = []
    for name, kw in models:
        torch.manual_seed(0)
        m = _models.create_model(name, num_classes=10, in_chans=in_chans, **kw).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        built.append((name, kw, m, opt))
    x = torch.randn(batch_size, in_chans, img_size, img_size)
    y = torch.randint(0, 10, (batch_size,))
    rates: list[list[float]] = [[] for _ in built]
    for r in range(rounds + 1):
        for i, (_, _, m, opt) in enumerate(built):
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                opt.step()
            if r:  # round 0 warms up
                rates[i].append(batch_size * steps_per_round / (time.perf_counter() - t0))
    out = []
    for (name, kw, m, _), rs in zip(built, rates):
        out.append({"model": name, "kwargs": kw, "params": sum(p.numel() for p in m.parameters()),
                    "img_s": statistics.median(rs)})
    for o in out:
        o["ratio"] = o["img_s"] / out[0]["img_s"]
    return out


@click.command("ablate")
@click.option("--variants", default=DEFAULT_VARIANTS, show_default=True,
              help="Comma-separated variant labels (see --list), or label=template:k=v,... with {d} for the depth.")
@click.option("--depths", default="20,56,110", show_default=True, help="Comma-separated CIFAR-layout depths.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--budgets", default="short,long", show_default=True, help="short (150 steps) and/or long (5 epochs).")
@click.option("--short-steps", type=int, help="Override the short budget's steps.")
@click.option("--long-epochs", type=int, help="Override the long budget's epochs.")
@click.option("--data", default="fashion-mnist", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False))
@click.option("--train-subset", type=int, help="Train on the first N images (quick checks only).")
@click.option("--test-subset", type=int, help="Evaluate on the first N test images (quick checks only).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per run.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablate", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the Markdown report here.")
@click.option("--speed/--no-speed", default=False, help="Also measure training img/s side by side (PNNH vs ResNet).")
@click.option("--speed-variants", default="resnet,pnnh,plain-dirac,llplain", show_default=True,
              help="Variants timed by --speed (the first is the reference of the ratio).")
@click.option("--speed-depths", help="Depths timed by --speed [the --depths].")
@click.option("--dry-run", is_flag=True, help="Only report finished runs; train nothing.")
@click.option("--notes", type=click.Path(dir_okay=False, exists=True), help="Markdown file to include in the report.")
@click.option("--reference", default="resnet", show_default=True,
              help="Variant every other is compared with in the report (accuracy difference, parameter ratio); "
                   "'' for none.")
@click.option("--list", "list_", is_flag=True, help="List the known variants and exit.")
def ablate_cmd(variants, depths, seeds, budgets, short_steps, long_epochs, data, data_dir, train_subset, test_subset,
               threads, out, report_path, speed, speed_variants, speed_depths, dry_run, notes, reference, list_) -> None:
    """PNNH coder variants x depths x seeds x budgets against plain / dirac / looks-linear / ResNet.

    Resumable: finished runs are reused, interrupted runs continue from their checkpoint.
    """
    if list_:
        for v in VARIANTS.values():
            click.echo(f"{v.label:<17}{v.template:<12}{json.dumps(v.kwargs):<40}{v.doc}")
        return
    try:
        vs = split_variants(variants)
        ds = [int(t) for t in depths.split(",") if t.strip()]
        ss = [int(t) for t in seeds.split(",") if t.strip()]
    except ValueError as e:
        raise ConfigError(f"depths and seeds are comma-separated integers: {e}") from None
    bs = [t.strip() for t in budgets.split(",") if t.strip()]
    for b in bs:
        if b not in BUDGETS:
            raise ConfigError(f"unknown budget {b!r}; use short and/or long")
    budget_defs = {k: dict(v) for k, v in BUDGETS.items()}
    if short_steps:
        budget_defs["short"] = {"steps": short_steps}
    if long_epochs:
        budget_defs["long"] = {"epochs": long_epochs}
    base = {"data": data, "data_dir": data_dir, "train_subset": train_subset, "test_subset": test_subset,
            "threads": threads}
    records = run_ablation(vs, ds, ss, bs, Path(out), base, dry_run=dry_run, log=click.echo, budget_defs=budget_defs)
    speed_rows = None
    if speed:  # per depth: the reference (ResNet twin) first, then the others, alternating step by step
        svs = split_variants(speed_variants)
        sds = [int(t) for t in speed_depths.split(",")] if speed_depths else ds
        speed_rows = []
        for d in sds:
            click.echo(f"throughput, depth {d}: {', '.join(v.label for v in svs)}")
            speed_rows += side_by_side_throughput([(v.model(d), v.kwargs) for v in svs])
    # the exact command, rebuilt from the parsed options (reproducible whatever the caller's argv was)
    ctx = click.get_current_context()
    parts = ["OMP_NUM_THREADS=1", "python", "-m", "pnnh", "ablate"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if p.name in ("list_", "dry_run", "notes", "reference") or v is None or v is False or (
                p.name.startswith("speed_") and not speed):
            continue
        flag = p.opts[0]
        if p.name == "speed":
            parts.append("--speed" if v else "--no-speed")
        else:
            parts += [flag, str(v)]
    command = " ".join(shlex.quote(a) for a in parts)
    text = format_report(records, command, notes=Path(notes).read_text().strip() if notes else "", speed=speed_rows,
                         budget_defs=budget_defs, reference=reference or None)
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(text)
        click.echo(f"report -> {report_path}")
    else:
        click.echo(text)
