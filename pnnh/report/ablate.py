"""``pnnh ablate``: the PNNH design-space ablation, a grid of the experiment runner.

Every (budget, depth, seed, variant) is one ordinary training run in its own directory
``OUT/<budget>/d<depth>/<variant>/s<seed>``. The variants, the budgets and the command's defaults
are data: ``configs/ablate.yaml``. Runs are trained, reused and resumed by
:mod:`pnnh.experiments` under its one rule: a finished run is reused when the config recorded
next to it (``ablate_config.json``, written when the run completes) agrees on the fields that
decide a result; an interrupted one resumes from its checkpoint; a run made with other settings
stops the command before anything trains. So the command is resumable and can be grown: run it
again with more seeds, depths or variants and only the missing runs train.
The config compared holds the model options a variant *names*, not the registry's defaults: after
changing a model default, rename (or delete) the runs of variants that relied on it, or they are
reused as if they were the new default (``docs/results/pnnh_ablation.md`` records such a relabel).

With an lr selection (:func:`choose_lr`, ``pnnh ablate --select-lr``) every family first trains at
each learning rate of a grid on a short budget; the one rule picks each (family, depth)'s lr, and
the budgets then train every variant of the family at it (``OUT/<budget>@lr<lr>/...`` when it is
not the budget's own lr). A variant is its own family unless the catalogue names another variant
as its ``family`` (the narrower widths of a design train at the lr chosen for its full width).

The report gives, per budget and depth, each variant's test accuracy mean ± sample std over the
finished seeds, its difference to a reference variant ± the Welch standard error, parameters,
training images/s and wall time, and lists runs that did not run: Markdown (``--report``) and
a self-contained ``OUT/report.html`` with the same tables and plots per budget.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..errors import ConfigError
from ..experiments import stats
from ..experiments.grid import Grid, Run, load_yaml
from ..experiments.launchers import LaunchOptions, make_launcher
from ..experiments.results import curves, metric_lines
from ..experiments.runner import run_grid
from ..experiments.state import check_grid, finished
from ..train.config import TrainConfig
from ..utils import atomic_write_text, parse_kv
from .render import epoch_loss_figure, frontier_figure, html_figure, html_page, html_table, make_figures, md_table

__all__ = ["VARIANTS", "Variant", "BUDGETS", "MARKER", "ablation_grid", "run_ablation", "aggregate", "difference",
           "format_report", "write_html_report", "DEFAULTS", "parse_variant",
           "split_variants", "selection_variants", "choose_lr", "budget_lr", "frontiers", "write_frontier_figures"]

MARKER = "ablate_config.json"


@dataclass(frozen=True)
class Variant:
    """A model template (``{d}`` is the depth), its model kwargs, and the variant whose selected
    learning rate it trains at (``family``; empty: its own)."""

    label: str
    template: str
    kwargs: dict = field(default_factory=dict)
    doc: str = ""
    family: str = ""

    def model(self, depth: int) -> str:
        return self.template.format(d=depth)

    @property
    def lr_family(self) -> str:
        return self.family or self.label


def _load_catalogue(path: str = "ablate.yaml") -> tuple[dict[str, Variant], dict[str, dict], dict[str, Any]]:
    """``(variants, budgets, defaults)`` from ``configs/ablate.yaml``."""
    d = load_yaml(path)
    variants = {label: Variant(label, v["model"], dict(v.get("kwargs") or {}), v.get("doc", ""), v.get("family", ""))
                for label, v in d["variants"].items()}
    for v in variants.values():
        if v.family and (v.family not in variants or variants[v.family].family):
            raise ConfigError(f"variant {v.label!r}: family {v.family!r} must be a variant that is its own family")
    return variants, {k: dict(v) for k, v in d["budgets"].items()}, dict(d.get("defaults") or {})


VARIANTS, BUDGETS, DEFAULTS = _load_catalogue()


def selection_variants(variants: list[Variant]) -> list[Variant]:
    """The variants an lr selection trains: one per family of ``variants`` (the family's own variant)."""
    return list({v.lr_family: VARIANTS[v.family] if v.family else v for v in variants}.values())


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


# -------------------------------------------------------------------------------------------------
# the grid
# -------------------------------------------------------------------------------------------------

def budget_lr(spec: dict) -> float:
    """The peak learning rate a budget trains with: its own ``lr``, else the engine's default."""
    return float(spec.get("lr", TrainConfig.lr))


def _set_fields(base: dict, budget: dict) -> dict:
    """The command line's training fields over a budget's: a field left unset (``None``) keeps the
    budget's own value (``deep-clip`` tests on 1,000 images unless ``--test-subset`` says otherwise)."""
    return {k: v for k, v in base.items() if v is not None or k not in budget}


def ablation_grid(variants: list[Variant], depths: list[int], seeds: list[int], budgets: list[str], out: Path,
                  base: dict | None = None, budget_defs: dict[str, dict] | None = None,
                  lrs: dict[tuple[str, int], list[float]] | None = None) -> tuple[Grid, list[dict]]:
    """The runs in order budget, seed, depth, variant (the first seed of every cell finishes before any
    second seed starts, so a partial ablation is still a full screen), and one record per run.

    ``lrs`` maps ``(variant label, depth)`` to the peak learning rates to train that cell at (the lr
    selection's grid, or the one it chose); cells it leaves out are not run. A run at the budget's own
    lr lives in ``OUT/<budget>/...``, one at another lr in ``OUT/<budget>@lr<lr>/...``.
    """

    base = dict(base or {})
    budget_defs = budget_defs or BUDGETS
    runs, records = [], []
    for b in budgets:
        for s in seeds:
            for d in depths:
                for v in variants:
                    own = budget_lr(budget_defs[b])
                    for lr in (own,) if lrs is None else lrs.get((v.label, d), ()):
                        folder = b if lr == own else f"{b}@lr{lr:g}"
                        run_dir = Path(out) / folder / f"d{d}" / v.label / f"s{s}"
                        fields = {**budget_defs[b], **_set_fields(base, budget_defs[b]), "lr": lr}
                        cfg = TrainConfig(model=v.model(d), model_kwargs=dict(v.kwargs), seed=s, out=str(run_dir),
                                          resume=True, progress=False, **fields)
                        lr_text = "" if lrs is None else f" lr {lr:g}"
                        runs.append(Run(f"{folder}/d{d}/{v.label}/s{s}", f"{b} d{d} {v.label}{lr_text} seed {s}", cfg))
                        records.append({"budget": b, "depth": d, "variant": v.label, "model": v.model(d),
                                        "kwargs": v.kwargs, "seed": s, "dir": str(run_dir), "lr": lr,
                                        "lr_selected": lrs is not None})
    return Grid("ablate", Path(out), runs, marker=MARKER), records


def run_ablation(variants: list[Variant], depths: list[int], seeds: list[int], budgets: list[str], out: Path,
                 base: dict | None = None, dry_run: bool = False, log=print,
                 budget_defs: dict[str, dict] | None = None, launch=None,
                 lrs: dict[tuple[str, int], list[float]] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) every run; return one record per run with its ``summary`` (``None``: not finished).

    ``launch`` (:class:`~pnnh.experiments.LaunchOptions`) says where runs execute (default: one
    after another in this process). ``dry_run`` trains nothing and reports what is on disk.
    ``lrs``: see :func:`ablation_grid`.
    """

    grid, records = ablation_grid(variants, depths, seeds, budgets, out, base, budget_defs, lrs)
    check_grid(grid)
    if not dry_run:
        run_grid(grid, make_launcher(launch or LaunchOptions(), Path(out), name="pnnh-ablate"), log=log)
    for rec, run in zip(records, grid.runs):
        rec["summary"] = finished(run)
    return records


def choose_lr(records: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], float], list[dict[str, Any]]]:
    """The learning rate chosen for each (variant, depth) from the selection runs' ``records``.

    The same rule for every variant: the lr with the highest mean final test accuracy over the
    seeds, among the lrs at which every seed completed (a diverged seed rules its lr out); a tie
    goes to the smaller lr. A cell with a seed still to run has no choice yet. Returns the choices
    and one row per cell for the report (``accs`` per lr, ``diverged`` lrs, ``chosen`` or ``None``).
    """

    cells: dict[tuple[str, int], dict[float, list[dict]]] = {}
    for r in records:
        cells.setdefault((r["variant"], r["depth"]), {}).setdefault(r["lr"], []).append(r)
    chosen, rows = {}, []
    for (variant, depth), per_lr in cells.items():
        row = {"variant": variant, "depth": depth, "budget": records[0]["budget"], "accs": {}, "diverged": [],
               "missing": [], "chosen": None}
        for lr, runs in sorted(per_lr.items()):
            done = [r["summary"] for r in runs if r["summary"] is not None]
            if len(done) < len(runs):
                row["missing"].append(lr)
            elif any(s.get("status") != "complete" for s in done):
                row["diverged"].append(lr)
            else:
                row["accs"][lr] = [s["test_acc"] * 100 for s in done]
        if not row["missing"] and row["accs"]:
            row["chosen"] = max(sorted(row["accs"]), key=lambda lr: stats.mean(row["accs"][lr]))
            chosen[(variant, depth)] = row["chosen"]
        rows.append(row)
    return chosen, rows


def _selection_table(selection: list[dict[str, Any]], mark: str = "**") -> list[list[str]]:
    lrs = sorted({lr for row in selection for lr in [*row["accs"], *row["diverged"], *row["missing"]]})
    rows = [["variant", "depth", *(f"lr {lr:g}" for lr in lrs), "chosen lr"]]
    for row in selection:
        cols = [row["variant"], str(row["depth"])]
        for lr in lrs:
            if lr in row["accs"]:
                m, sd = stats.mean_std(row["accs"][lr])
                cols.append(f"{m:.2f} ± {sd:.2f}" if len(row["accs"][lr]) > 1 else f"{m:.2f}")
            else:
                cols.append("diverged" if lr in row["diverged"] else "not run")
        cols.append(f"{mark}{row['chosen']:g}{mark}" if row["chosen"] is not None else "not yet (runs missing)")
        rows.append(cols)
    return rows


def _selection_text(selection: list[dict[str, Any]], seeds: list[int]) -> str:
    budget = selection[0]["budget"]
    return (f"Each family's peak learning rate is chosen the same way before the other budgets run: the "
            f"{budget} budget at every lr below, seeds {', '.join(map(str, seeds))}; the lr with the highest "
            "mean test accuracy among those at which no seed diverged (a tie goes to the smaller lr). The "
            "rows after this table train at the chosen lr (column lr); a variant whose catalogue entry names "
            "a family (a narrower width of a design) trains at its family's choice.")


# -------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------

def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (budget, depth, variant): accuracy mean/std over finished seeds, params, speed."""
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["budget"], r["depth"], r["variant"])
        row = rows.setdefault(key, {"budget": key[0], "depth": key[1], "variant": key[2], "model": r["model"],
                                    "kwargs": r["kwargs"], "accs": [], "img_s": [], "wall": [], "params": None,
                                    "missing": [], "diverged": [], "losses": [], "lr": r.get("lr"),
                                    "lr_selected": r.get("lr_selected", False)})
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
            if r.get("dir"):
                row["losses"].append(epoch_losses(Path(r["dir"]) / "metrics.jsonl"))
    return list(rows.values())


def epoch_losses(metrics: Path) -> list[tuple[float, float]]:
    """``(epoch, mean training loss of that epoch)`` per evaluated epoch of a run's ``metrics.jsonl``."""
    return [(ln["epoch"], ln["train_loss"]) for ln in metric_lines(metrics)
            if ln.get("epoch") is not None and ln.get("train_loss") is not None]


def _mean_losses(runs: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The seeds' mean training loss at each epoch every seed logged."""
    runs = [dict(r) for r in runs if r]
    epochs = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    return [(e, stats.mean([r[e] for r in runs])) for e in epochs]


def difference(row: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float] | None:
    """``row``'s mean accuracy minus ``ref``'s, with the Welch standard error of that difference
    (:func:`pnnh.experiments.stats.difference`); ``None`` when either has no finished seed."""
    return stats.difference(row["accs"], ref["accs"])


def _intro(records: list[dict[str, Any]], budget_defs: dict[str, dict], reference: str | None) -> list[str]:
    finished = [r["summary"] for r in records if r["summary"] and r["summary"].get("status") == "complete"]
    augment = {s.get("augment") for s in finished}
    threads = sorted({s["threads"] for s in finished if s.get("threads")})
    thread_text = ("threads unrecorded" if not threads else "one thread" if threads == [1] else
                   f"{' or '.join(map(str, threads))} threads (see each run's summary.json)")
    aug = {frozenset({True}): "on for every run", frozenset({False}): "off for every run (the engine's automatic "
           "choice below 10 epochs)", frozenset(): "as each run's summary.json will record (no run finished yet)"
           }.get(frozenset(augment), "mixed: see each run's summary.json")
    used = dict.fromkeys(r["budget"] for r in records)
    budgets = ", ".join(f"{b} budget = {budget_defs[b]}" for b in used)
    selected = any(r.get("lr_selected") for r in records)
    lr = "a peak lr chosen per family (the learning-rate selection)," if selected else f"lr {TrainConfig.lr:g}"
    out = [f"Recipe: the engine's defaults (SGD Nesterov, {lr} one-cycle, weight decay 5e-4, batch 128) with the "
           f"fields a budget sets; full 60k/10k Fashion-MNIST; augmentation (random crop + flip): {aug}; "
           f"{budgets}. Test accuracy in %, mean ± sample std "
           "over the finished seeds. img/s is training images per second from the engine (training time "
           f"only), {thread_text} per run, on a 2-core machine running other jobs: compare speeds only side "
           "by side (docs/benchmarks.md)."]
    if reference:
        out.append(f"Δ acc: the variant's mean minus `{reference}`'s at the same depth and budget, ± the standard "
                   "error of that difference (sqrt(s_a²/n_a + s_b²/n_b); a one-seed side adds no spread, so "
                   f"the error is then too small). params ×: the variant's parameters over `{reference}`'s.")
    return out


def _cell_table(cell: list[dict[str, Any]], reference: str | None) -> list[list[str]]:
    """Rows of strings (header first) for one (budget, depth) cell."""
    ref = next((r for r in cell if r["variant"] == reference), None)
    head = ["variant", "model", "options", "seeds", "test acc %", "params", "train img/s", "wall s"]
    if ref is not None:
        head[5:5] = [f"Δ acc vs {reference}", "params ×"]
    selected = any(r["lr_selected"] for r in cell)
    if selected:
        head[3:3] = ["lr"]
    rows = [head]
    for r in cell:
        opts = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "—"
        n = len(r["accs"])
        if n:
            m, sd = stats.mean_std(r["accs"])
            acc = f"{m:.2f} ± {sd:.2f}" if n > 1 else f"{m:.2f} (1 seed: no spread)"
            img = f"{stats.mean(r['img_s']):.0f}"
            wall = f"{stats.mean(r['wall']):.0f}"
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
        if selected:
            cols[3:3] = [f"{r['lr']:g}"]
        rows.append(cols)
    return rows


def _cells(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    by_cell: dict[tuple, list] = {}
    for r in aggregate(records):
        by_cell.setdefault((r["budget"], r["depth"]), []).append(r)
    return by_cell


def _speed_table(speed: list[dict]) -> list[list[str]]:
    rows = [["model", "options", "precision", "params", "img/s (median)", "ratio", "ratio to"]]
    for s in speed:
        opts = ", ".join(f"{k}={v}" for k, v in s["kwargs"].items()) or "—"
        rows.append([s["model"], opts, s.get("amp") or "fp32", f"{s['params']:,}", f"{s['img_s']:.0f}",
                     f"{s['ratio']:.2f}", s.get("ratio_to", "the first model timed with it")])
    return rows


def _speed_text(speed: list[dict]) -> str:
    """What the throughput table measured; steps per round and batch size are read from the rows."""
    def values(key: str) -> str:
        return "/".join(str(v) for v in sorted({s[key] for s in speed if key in s}))

    steps, batch = values("steps"), values("batch_size")
    per_round = f"{steps} step{'s' if steps != '1' else ''} each, " if steps else ""
    batch = f" of {batch}" if batch else ""
    return ("Measured by `pnnh bench` in one process with the runs' thread count: the models alternate "
            f"round by round ({per_round}the order reversed every round) so that the machine's load hits "
            f"all of them alike; forward + backward + the engine's SGD step on a batch{batch}, in the memory "
            "layout `pnnh train` uses (channels-last) with glibc's malloc tuned as in training. img/s is each "
            "model's median step; the ratio is the median of the per-round ratios to the model in the last "
            "column, the first of the models timed together. A budget that trains under autocast (`amp`) is "
            "timed under the same autocast.")


def format_report(records: list[dict[str, Any]], command: str, notes: str = "", speed: list[dict] | None = None,
                  budget_defs: dict[str, dict] | None = None, reference: str | None = "resnet",
                  selection: tuple[list[dict], list[int]] | None = None,
                  fronts: list[dict[str, Any]] | None = None, figure_links: dict[str, str] | None = None) -> str:
    """The Markdown results page (``docs/results/pnnh_ablation.md``).

    With ``reference`` (a variant label, the ResNet twin by default) each table also gives every
    variant's accuracy difference to that variant at the same depth and budget and its parameter ratio:
    the terms the issue's criteria are stated in. ``selection`` (the rows of :func:`choose_lr` and
    its seeds) adds the learning-rate selection table first; ``fronts`` (:func:`frontiers`) adds the
    accuracy-cost tables, with the plots whose files ``figure_links`` names."""

    budget_defs = budget_defs or BUDGETS
    intro = _intro(records, budget_defs, reference)
    lines = ["# PNNH ablation on Fashion-MNIST", "", f"Generated {_dt.date.today().isoformat()} by:", "", "```bash",
             command, "```", "", *intro, ""]
    if notes:
        lines += [notes, ""]
    if selection:
        lines += [f"## Learning-rate selection ({selection[0][0]['budget']} budget)", "",
                  _selection_text(*selection), "", md_table(_selection_table(selection[0])), ""]
    for (b, d), cell in _cells(records).items():
        lines += [f"## {b} budget, depth {d}", "", md_table(_cell_table(cell, reference)), ""]
    if speed:
        lines += ["## Training throughput, side by side", "", _speed_text(speed), "", md_table(_speed_table(speed)), ""]
    for front in fronts or ():
        lines += [f"## Accuracy against cost: {front['budget']} budget, {front['where']}", "",
                  _FRONTIER_TEXT, "", md_table(front["table"]), ""]
        lines += [f"![{caption}]({figure_links[stem]})\n" for stem, (caption, _) in front["figures"].items()
                  if stem in (figure_links or {})]
    return "\n".join(lines)


_FRONTIER_TEXT = ("A design is one model with one set of options, run at one or more widths (`width` scales every "
                  "stage). Test accuracy: mean ± sample std (seeds). Training images/s: measured side by side in the "
                  "budget's precision (the throughput table), for the variants it measured.")


def _speed_of(speed: list[dict] | None, model: str, kwargs: dict, amp: str | None = None) -> float | None:
    return next((s["img_s"] for s in speed or ()
                 if s["model"] == model and s["kwargs"] == kwargs and s.get("amp") == amp), None)


def _design_key(row: dict[str, Any]) -> str:
    """The model and its options apart from ``width``: what the widths of one design share."""
    return json.dumps([row["model"], {k: v for k, v in row["kwargs"].items() if k != "width"}], sort_keys=True)


def frontiers(records: list[dict[str, Any]], speed: list[dict] | None = None,
              reference: str | None = "resnet", budget_defs: dict[str, dict] | None = None,
              reference_depth: int | None = None) -> list[dict[str, Any]]:
    """Accuracy against cost per (budget, depth): a table and a plot per cost axis.

    Variants that run the same model with the same options apart from ``width`` are one *design*
    (named by its shortest variant label), drawn as one line through its widths; a design run at
    one width is one point. The costs are parameters and, for the variants in ``speed`` (training
    images/s measured side by side in the budget's ``amp``, as ``pnnh ablate --speed`` measures
    them), training speed. With ``reference_depth`` every depth of a budget joins one frontier (a
    design at another depth is another design, named with its depth), compared with ``reference``
    at that depth: depth and width as two ways of making a net cheaper. Returns one entry per
    frontier: ``budget``, ``depth`` (``None`` when depths are joined), ``where`` (its depths in
    words), ``table`` (rows of strings, the last column the final epoch's training loss, the
    seeds' mean) and ``figures`` (``{stem: (caption, PNG bytes)}``: accuracy against each cost
    axis, and every variant's training loss per epoch, which shows whether a design that falls
    short underfits).
    """

    budget_defs = budget_defs or BUDGETS
    cells: dict[tuple[str, int | None], list[dict]] = {}
    for (b, d), cell in _cells(records).items():
        cells.setdefault((b, None if reference_depth is not None else d), []).extend(cell)
    out = []
    for (b, d), cell in cells.items():
        amp = budget_defs[b].get("amp")
        depths = sorted({r["depth"] for r in cell})
        where = f"depth {depths[0]}" if len(depths) == 1 else f"depths {', '.join(map(str, depths))}"
        suffix = (lambda r: f" d{r['depth']}") if len(depths) > 1 else (lambda r: "")
        groups: dict[str, list[dict]] = {}
        for r in cell:
            groups.setdefault(_design_key(r), []).append(r)
        designs = {min((m["variant"] for m in members), key=len) + suffix(members[0]):
                   sorted(members, key=lambda m: m["params"] or 0) for members in groups.values()}
        ref = next((r for r in cell if r["variant"] == reference and (d is not None or r["depth"] == reference_depth)),
                   None)
        ref_speed = _speed_of(speed, ref["model"], ref["kwargs"], amp) if ref else None
        head = ["design", "variant", "width", "params", "test acc %", "train img/s (side by side)"]
        if len(depths) > 1:
            reference_text = f"{reference} d{reference_depth}"
            head[2:2] = ["depth"]
        else:
            reference_text = reference
        base = len(head)
        if ref is not None and ref["accs"]:
            head[base - 2:base - 2] = [f"params × {reference_text}"]
            head[base:base] = [f"Δ acc vs {reference_text}"]
            head.append(f"speed × {reference_text}")
        head.append("train loss, last epoch")
        table = [head]
        by_params: dict[str, list] = {}
        by_speed: dict[str, list] = {}
        by_loss: dict[str, list] = {}
        for name, members in designs.items():
            for r in members:
                first = [name, r["variant"]] + ([str(r["depth"])] if len(depths) > 1 else [])
                first.append(f"{r['kwargs'].get('width', 1.0):g}")
                if not r["accs"]:
                    table.append(first + ["not run"] + [""] * (len(head) - len(first) - 1))
                    continue
                m, sd = stats.mean_std(r["accs"])
                img = _speed_of(speed, r["model"], r["kwargs"], amp)
                row = first + [f"{r['params']:,}", f"{m:.2f} ± {sd:.2f} ({len(r['accs'])})",
                               "—" if img is None else f"{img:.0f}"]
                if len(head) > base:
                    diff = difference(r, ref)
                    row[base - 2:base - 2] = [f"{r['params'] / ref['params']:.3f}"]
                    one_each = len(r["accs"]) == 1 and len(ref["accs"]) == 1
                    row[base:base] = ["—" if r is ref else f"{diff[0]:+.2f} (1 seed each: no spread)" if one_each
                                      else f"{diff[0]:+.2f} ± {diff[1]:.2f}"]
                    row.append("—" if img is None or ref_speed is None else f"{img / ref_speed:.3f}")
                losses = _mean_losses(r["losses"])
                row.append(f"{losses[-1][1]:.3f}" if losses else "—")
                if losses:
                    by_loss[r["variant"] + suffix(r)] = losses
                table.append(row)
                by_params.setdefault(name, []).append((r["params"], m, sd))
                if img is not None:
                    by_speed.setdefault(name, []).append((img, m, sd))
        figures = {}
        stem = f"frontier_{b}_d{d}" if d is not None else f"frontier_{b}_d{'-'.join(map(str, depths))}"
        if by_params:
            figures[f"{stem}_params"] = (
                f"Test accuracy (mean ± std over seeds) against parameters, {b} budget, {where}; a line joins "
                "the widths of one design.",
                frontier_figure(by_params, "parameters", f"Accuracy vs parameters ({where})", params_axis=True))
        if by_speed:
            figures[f"{stem}_speed"] = (
                f"Test accuracy against training images/s measured side by side, {b} budget, {where}.",
                frontier_figure(by_speed, "training images/s (side by side)",
                                f"Accuracy vs training speed ({where})"))
        if by_loss:
            figures[f"{stem}_loss"] = (
                f"Training loss per epoch (the epoch's mean, averaged over seeds), {b} budget, {where}: how well "
                "each design fits the training set.",
                epoch_loss_figure(by_loss, f"Training loss ({where})"))
        out.append({"budget": b, "depth": d, "where": where, "table": table, "figures": figures})
    return out


def write_frontier_figures(fronts: list[dict[str, Any]], report_path: Path) -> dict[str, str]:
    """Each frontier plot as ``<report stem>_<figure stem>.png`` beside the report; ``{figure stem: file name}``."""
    links = {}
    for front in fronts:
        for stem, (_, png) in front["figures"].items():
            path = Path(report_path).with_name(f"{Path(report_path).stem}_{stem}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".png.tmp")
            tmp.write_bytes(png)
            tmp.replace(path)
            links[stem] = path.name
    return links


def _figure_results(records: list[dict[str, Any]], budget: str, data: str) -> dict[str, Any]:
    """One budget's finished runs in the study's results format (a variant plays a family), for the plots."""

    runs = []
    for r in records:
        s = r["summary"]
        if r["budget"] != budget or s is None:
            continue
        rec = {"family": r["variant"], "model": r["model"], "depth": r["depth"], "seed": r["seed"],
               "status": s.get("status"), "model_kwargs": r["kwargs"]}
        if s.get("status") == "complete":
            rec.update({k: s.get(k) for k in ("params", "test_acc", "train_img_per_s", "wall_s")})
            rec["curves"] = curves(s, Path(r["dir"]) / "metrics.jsonl")
        runs.append(rec)
    variants = list(dict.fromkeys(r["variant"] for r in records))
    seeds = sorted({r["seed"] for r in records})
    return {"study": {"families": variants, "data": data, "seeds": seeds}, "runs": runs}


def write_html_report(path: Path, records: list[dict[str, Any]], command: str, notes: str = "",
                      speed: list[dict] | None = None, budget_defs: dict[str, dict] | None = None,
                      reference: str | None = "resnet", data: str = "fashion-mnist",
                      selection: tuple[list[dict], list[int]] | None = None,
                      fronts: list[dict[str, Any]] | None = None) -> Path:
    """A self-contained HTML page: the Markdown report's tables plus, per budget, accuracy against
    depth and parameters and the training-loss curves (plots embedded as PNG)."""

    e = html.escape
    budget_defs = budget_defs or BUDGETS
    parts = ["<h1>PNNH ablation</h1>", f"<p>Command: <code>{e(command)}</code></p>"]
    parts += [f"<p>{e(p)}</p>" for p in _intro(records, budget_defs, reference)]
    if notes:
        parts.append(f"<pre>{e(notes)}</pre>")
    if selection:
        parts += [f"<h2>Learning-rate selection ({e(selection[0][0]['budget'])} budget)</h2>",
                  f"<p>{e(_selection_text(*selection))}</p>",
                  html_table(_selection_table(selection[0], mark=""))]
    cells = _cells(records)
    for b in dict.fromkeys(r["budget"] for r in records):
        parts.append(f"<h2>{e(b)} budget ({e(json.dumps(budget_defs[b]))})</h2>")
        for (cb, d), cell in cells.items():
            if cb == b:
                parts.append(f"<h3>depth {d}</h3>" + html_table(_cell_table(cell, reference)))
        results = _figure_results(records, b, data)
        if any(r["status"] == "complete" for r in results["runs"]):
            figs = make_figures(results)
            parts += [html_figure(f"{b} budget: {figs[k][0]}", figs[k][1])
                      for k in ("accuracy_vs_depth", "accuracy_vs_params", "loss_curves") if k in figs]
    if speed:
        parts.append("<h2>Training throughput, side by side</h2>" + f"<p>{e(_speed_text(speed))}</p>"
                     + html_table(_speed_table(speed)))
    for front in fronts or ():
        parts += [f"<h2>Accuracy against cost: {e(front['budget'])} budget, {e(front['where'])}</h2>",
                  f"<p>{e(_FRONTIER_TEXT)}</p>", html_table(front["table"])]
        parts += [html_figure(caption, png) for caption, png in front["figures"].values()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), html_page("pnnh ablation", parts))
    return Path(path)
