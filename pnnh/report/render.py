"""Study reports: ``report.md`` (plots as PNG files) and a self-contained ``report.html``.

Both are built from the same pieces, computed from ``results.json`` (see
:mod:`pnnh.report.study`): verdict sentences, tables (rows of strings) and matplotlib figures
(rendered with the Agg canvas, never a display). The HTML embeds every figure as a base64 PNG
and has no scripts or external resources, so it opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..experiments.stats import difference, mean, sample_std
from ..utils import atomic_write_text

__all__ = ["Section", "Group", "Contrast", "aggregate", "contrast", "verdicts", "VERDICT_RULE", "make_figures",
           "frontier_figure", "epoch_loss_figure", "render_markdown", "render_html",
           "html_page", "html_figure", "md_table", "html_table", "write_report", "load_results"]

# classes per dataset, for the chance level (imagefolder: unknown, no chance line)
_NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
_FAMILY_COLORS = {"plain": "tab:red", "resnet": "tab:blue", "pnnh": "tab:green", "plain_dirac": "tab:orange",
                  "preact_resnet": "tab:purple", "plain_delta": "tab:brown"}
_SPARE_COLORS = ["tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
# verdict wording: a difference of mean accuracies is claimed only when it exceeds both twice its standard
# error over seeds (Welch) and _MIN_DIFF (a one-seed side has no spread, so the floor is what then holds);
# a family "degrades" with depth when some depth is more than _BIG_DROP below its shallowest (accuracy units)
_MIN_DIFF = 0.02
_BIG_DROP = 0.10
VERDICT_RULE = ("A difference is claimed only where it exceeds both twice its standard error over seeds "
                "(Welch: sqrt(s_a²/n_a + s_b²/n_b)) and 2 points; accuracies are mean ± sample std over seeds, "
                "differences mean ± standard error.")


@dataclass
class Section:
    """An extra report section (the optional diagnostics hook returns one).

    ``paragraphs`` are plain text (escaped in HTML); ``figures`` are (caption, PNG bytes) pairs.
    """

    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Group:
    """All seeds of one (family, depth): accuracy mean and sample std, mean cost figures."""

    family: str
    depth: int
    model: str
    model_kwargs: dict
    n: int  # finished seeds
    n_diverged: int
    acc: float | None  # mean test accuracy in [0, 1] over non-diverged seeds
    acc_std: float
    accs: list[float]  # test accuracy of each non-diverged seed
    params: int | None
    img_s: float | None
    wall_s: float | None
    curves: list[list[list[float]]]  # training-loss curves ([step, loss] pairs), one per finished seed

    @property
    def label(self) -> str:
        return f"{self.family}{self.depth}"


def load_results(study_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(study_dir) / "results.json").read_text())


def _mean(xs: list[float]) -> float | None:
    return mean(xs) if xs else None


def aggregate(results: dict[str, Any]) -> list[Group]:
    """One :class:`Group` per (family, depth), in the study's family order then depth."""
    fam_order = {f: i for i, f in enumerate(results["study"].get("families", []))}
    by: dict[tuple[str, int], list[dict]] = {}
    for r in results["runs"]:
        by.setdefault((r["family"], r["depth"]), []).append(r)
    groups = []
    for (fam, depth), rs in by.items():
        ok = [r for r in rs if r["status"] == "complete"]
        accs = [r["test_acc"] for r in ok]
        groups.append(Group(fam, depth, rs[0]["model"], rs[0].get("model_kwargs") or {}, len(rs), len(rs) - len(ok),
                            _mean(accs), sample_std(accs), accs, ok[0]["params"] if ok else None,
                            _mean([r["train_img_per_s"] for r in ok]), _mean([r["wall_s"] for r in ok]),
                            [r["curves"]["train_loss"] for r in ok if (r.get("curves") or {}).get("train_loss")]))
    groups.sort(key=lambda g: (fam_order.get(g.family, len(fam_order)), g.family, g.depth))
    return groups


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def _acc_cell(g: Group) -> str:
    if g.acc is None:
        return "diverged"
    ok = g.n - g.n_diverged
    s = f"{g.acc * 100:.1f} ± {g.acc_std * 100:.1f}%" if ok > 1 else f"{g.acc * 100:.1f}%"
    if g.n_diverged:
        s += f" ({g.n_diverged} of {g.n} diverged)"
    return s


def _by_family(groups: list[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = {}
    for g in groups:
        out.setdefault(g.family, []).append(g)
    return out


@dataclass(frozen=True)
class Contrast:
    """``a``'s mean accuracy minus ``b``'s, with the Welch standard error of that difference."""

    a: Group
    b: Group
    diff: float  # accuracy units
    se: float

    @property
    def one_seed(self) -> bool:
        """Whether a side has a single seed (no spread of its own: ``se`` understates the error)."""
        return min(len(self.a.accs), len(self.b.accs)) < 2

    @property
    def clear(self) -> bool:
        """Whether the difference exceeds twice its standard error and the 2-point floor."""
        return abs(self.diff) > max(2 * self.se, _MIN_DIFF)

    def points(self, signed: bool = True) -> str:
        """The difference in points, ``-3.1 ± 0.8 points`` (no ``±`` with a one-seed side)."""
        d = f"{self.diff * 100:+.1f}" if signed else f"{abs(self.diff) * 100:.1f}"
        return f"{d} points" if self.one_seed else f"{d} ± {self.se * 100:.1f} points"

    def within(self) -> str:
        """Why the difference is not claimed: within the seed error, or under the 2-point floor."""
        if not self.one_seed and abs(self.diff) <= 2 * self.se:
            return f"within seed error ({self.points()})"
        return f"within {_MIN_DIFF * 100:.0f} points ({self.points()})"


def contrast(a: Group, b: Group) -> Contrast | None:
    """``a`` against ``b`` (:func:`pnnh.experiments.stats.difference`); ``None`` without finished seeds."""
    d = difference(a.accs, b.accs)
    return None if d is None else Contrast(a, b, *d)


def _seeds_words(groups: list[Group]) -> str:
    ns = sorted({len(g.accs) for g in groups})
    if ns == [1]:
        return "one seed each, so no seed error"
    return f"{ns[0]} seeds each" if len(ns) == 1 else f"{ns[0]} to {ns[-1]} seeds"


def _depth_verdict(fam: str, gs: list[Group]) -> str:
    """How ``fam`` holds up with depth: every deeper net against the shallowest, the largest change named."""
    first = gs[0]
    cs = [contrast(g, first) for g in gs[1:]]
    chain = " → ".join(f"{_acc_words(g)} at depth {g.depth}" for g in gs)
    drops = [c for c in cs if c.clear and c.diff < 0]
    gains = [c for c in cs if c.clear and c.diff > 0]
    if drops:
        c = min(drops, key=lambda c: c.diff)
        what = "degrades with depth" if -c.diff > _BIG_DROP else "dips with depth"
        what += f": depth {c.a.depth} is {c.points(signed=False)} below depth {first.depth}"
    elif gains:
        c = max(gains, key=lambda c: c.diff)
        what = f"improves with depth: depth {c.a.depth} is {c.points(signed=False)} above depth {first.depth}"
    else:
        c = max(cs, key=lambda c: abs(c.diff))
        seed_error = all(not x.one_seed and abs(x.diff) <= 2 * x.se for x in cs)
        bound = "seed error" if seed_error else f"{_MIN_DIFF * 100:.0f} points"
        what = (f"holds up with depth: every depth within {bound} of depth {first.depth} "
                f"(largest change at depth {c.a.depth}: {c.points()})")
    return f"{fam} {what}; {chain} ({_seeds_words(gs)})."


def _pair_verdict(x: Group, y: Group) -> str:
    """``x`` against ``y`` at the same depth: one above the other only beyond the seed error."""
    c = contrast(x, y)
    if c.clear:
        hi, lo = (x, y) if c.diff > 0 else (y, x)
        c = contrast(hi, lo)
        return (f"At depth {x.depth}, {hi.label} is {c.points(signed=False)} above {lo.label}: {_acc_words(hi)} "
                f"against {_acc_words(lo)} ({_seeds_words([x, y])}).")
    return (f"At depth {x.depth}, {x.label} and {y.label} are {c.within()}: {_acc_words(x)} and {_acc_words(y)} "
            f"({_seeds_words([x, y])}).")


def verdicts(results: dict[str, Any]) -> list[str]:
    """Plain-language findings computed from the data (nothing here is a fixed claim).

    A difference of mean accuracies is stated as one family above another, or a family losing or
    gaining with depth, only where :attr:`Contrast.clear` (beyond twice the Welch standard error and
    2 points); otherwise the line says the two are within seed error (or within 2 points) and gives
    the difference with its error (:data:`VERDICT_RULE`).
    """
    groups = aggregate(results)
    fams = _by_family(groups)
    study = results["study"]
    lines: list[str] = []
    # 1. does each family hold up with depth?
    for fam, gs in fams.items():
        gs = [g for g in gs if g.acc is not None]
        if len(gs) >= 2:
            lines.append(_depth_verdict(fam, gs))
    # 2. head to head at the deepest depth each pair shares: every family against the reference
    #    (plain) and against resnet
    ref = "plain" if "plain" in fams else next(iter(fams))
    base = "resnet" if "resnet" in fams else ref
    pairs = [(ref, f) for f in fams if f != ref]
    pairs += [(f, base) for f in fams if base != ref and f not in (ref, base)]
    for fx, fy in pairs:
        by_y = {g.depth: g for g in fams[fy] if g.acc is not None}
        shared = [g for g in fams[fx] if g.acc is not None and g.depth in by_y]
        if shared:
            lines.append(_pair_verdict(shared[-1], by_y[shared[-1].depth]))
    # 3. runs that did not learn at all
    k = _NUM_CLASSES.get(study.get("data", ""))
    if k:
        chance = 1 / k
        dead = [g for g in groups if g.acc is not None and g.acc < chance + 0.05]
        for g in dead:
            lines.append(f"{g.label} stayed near chance level ({chance * 100:.0f}% for {k} classes): "
                         f"it did not learn within this budget.")
    for g in groups:
        if g.n_diverged:
            lines.append(f"{g.label}: {g.n_diverged} of {g.n} runs diverged (the loss became NaN or infinite).")
    # 4. cost at the deepest depth every family shares with resnet (or the reference)
    base_by_depth = {g.depth: g for g in fams.get(base, [])}
    for fam, gs in fams.items():
        if fam == base:
            continue
        shared = [g for g in gs if g.depth in base_by_depth and g.img_s and base_by_depth[g.depth].img_s]
        if not shared:
            continue
        g = shared[-1]
        b = base_by_depth[g.depth]
        words = f"At depth {g.depth}, {g.label} trains at {g.img_s / b.img_s:.2f}x the images/s of {b.label}"
        if g.params and b.params and abs(g.params / b.params - 1) > 0.01:
            words += f" with {g.params / b.params:.2f}x its parameters"
        lines.append(words + ".")
    return lines


def _acc_words(g: Group) -> str:
    if g.acc is None:
        return "no result (diverged)"
    return f"{g.acc * 100:.1f} ± {g.acc_std * 100:.1f}%" if len(g.accs) > 1 else f"{g.acc * 100:.1f}%"


# -------------------------------------------------------------------------------------------------
# tables (rows of strings, rendered to Markdown or HTML)
# -------------------------------------------------------------------------------------------------

def _fmt_params(p: int | None) -> str:
    return "—" if p is None else (f"{p / 1e6:.2f}M" if p >= 1e6 else f"{p / 1e3:.0f}k")


def _kw_words(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) or "—"


def accuracy_table(groups: list[Group], families: list[str]) -> list[list[str]]:
    """Depth rows x family columns of test accuracy (mean ± std over seeds)."""
    fams = [f for f in families if any(g.family == f for g in groups)]
    cell = {(g.family, g.depth): _acc_cell(g) for g in groups}
    depths = sorted({g.depth for g in groups})
    return [["depth"] + fams] + [[str(d)] + [cell.get((f, d), "—") for f in fams] for d in depths]


def runs_table(groups: list[Group]) -> list[list[str]]:
    rows = [["run", "model", "options", "seeds", "params", "test acc", "train img/s", "wall s"]]
    for g in groups:
        rows.append([g.label, g.model, _kw_words(g.model_kwargs), str(g.n), _fmt_params(g.params), _acc_cell(g),
                     "—" if g.img_s is None else f"{g.img_s:.0f}", "—" if g.wall_s is None else f"{g.wall_s:.1f}"])
    return rows


def throughput_table(groups: list[Group], families: list[str]) -> list[list[str]]:
    """Depth rows x family columns of training images/s, with the ratio to resnet where it ran."""
    fams = [f for f in families if any(g.family == f for g in groups)]
    base = "resnet" if "resnet" in fams else None
    by = {(g.family, g.depth): g for g in groups}
    rows = [["depth"] + [f"{f} img/s" for f in fams]]
    for d in sorted({g.depth for g in groups}):
        row = [str(d)]
        for f in fams:
            g = by.get((f, d))
            if g is None or g.img_s is None:
                row.append("—")
                continue
            b = by.get((base, d)) if base else None
            ratio = f" ({g.img_s / b.img_s:.2f}x)" if b is not None and b.img_s and f != base else ""
            row.append(f"{g.img_s:.0f}{ratio}")
        rows.append(row)
    return rows


def recipe_table(study: dict[str, Any]) -> list[list[str]]:
    t = study.get("train", {})
    keys = ("data", "steps", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay",
            "schedule", "warmup", "grad_clip", "label_smoothing", "augment", "train_subset", "test_subset",
            "checkpoint_every", "device", "threads", "amp")
    rows = [["setting", "value"]]
    for k in keys:
        if k in t and t[k] is not None:
            rows.append([k, str(t[k])])
    if study.get("model_kwargs"):
        rows.append(["model options", _kw_words(study["model_kwargs"])])
    return rows


def md_table(rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(out)


_NUMERIC = re.compile(r"^[-+]?\d[\d.,]*(%|k|M)?( |$)|^—$")


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    def td(c: str) -> str:  # numbers right-aligned, words left
        return f"<td class=\"n\">{html.escape(c)}</td>" if _NUMERIC.match(c) else f"<td>{html.escape(c)}</td>"

    body = "".join("<tr>" + "".join(td(c) for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# -------------------------------------------------------------------------------------------------
# figures (matplotlib, Agg canvas: no display, no global backend switch)
# -------------------------------------------------------------------------------------------------

def _colors(families: list[str]) -> dict[str, str]:
    spare = iter(_SPARE_COLORS * 4)
    return {f: _FAMILY_COLORS.get(f) or next(spare) for f in families}


def _new_figure(w: float = 6.4, h: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _depth_axis(ax, depths: list[int]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("depth (layers)")


def _params_axis(ax, params: list[int]) -> None:
    """A log axis with ticks at the models' own parameter counts, labelled 270k / 0.85M."""
    ax.set_xscale("log")
    ticks: list[int] = []
    for p in sorted(set(params)):
        if not ticks or p > ticks[-1] * 1.25:
            ticks.append(p)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_fmt_params(t) for t in ticks])
    ax.minorticks_off()


def frontier_figure(designs: dict[str, list[tuple[float, float, float]]], xlabel: str, title: str,
                    params_axis: bool = False) -> bytes:
    """PNG of accuracy-cost frontiers: per design a line through its ``(cost, mean acc %, std)`` points."""
    fig = _new_figure()
    ax = fig.add_subplot()
    colors = _colors(list(designs))
    for name, points in designs.items():
        points = sorted(points)
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    ls="-", capsize=3, color=colors[name], label=name)
    if params_axis:
        _params_axis(ax, [int(p[0]) for points in designs.values() for p in points])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def epoch_loss_figure(variants: dict[str, list[tuple[float, float]]], title: str) -> bytes:
    """PNG of training loss against epoch: per variant a line through its ``(epoch, loss)`` points."""
    import matplotlib
    import matplotlib.ticker

    fig = _new_figure()
    ax = fig.add_subplot()
    palette = matplotlib.colormaps["tab10" if len(variants) <= 10 else "tab20"]
    for i, (name, points) in enumerate(variants.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=palette(i % palette.N), label=name)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (epoch mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def make_figures(results: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """``{file stem: (caption, PNG bytes)}`` for the report's plots."""
    groups = aggregate(results)
    study = results["study"]
    families = [f for f in study.get("families", []) if any(g.family == f for g in groups)]
    families += sorted({g.family for g in groups} - set(families))
    colors = _colors(families)
    fams = _by_family(groups)
    depths = sorted({g.depth for g in groups})
    k = _NUM_CLASSES.get(study.get("data", ""))
    n_seeds = len(study.get("seeds", [0]))
    bars = "mean ± std over seeds" if n_seeds > 1 else "one seed"
    figs: dict[str, tuple[str, bytes]] = {}

    fig = _new_figure()
    ax = fig.add_subplot()
    for f in families:
        gs = [g for g in fams[f] if g.acc is not None]
        if gs:
            ax.errorbar([g.depth for g in gs], [g.acc * 100 for g in gs], yerr=[g.acc_std * 100 for g in gs],
                        marker="o", capsize=4, color=colors[f], label=f)
    if k:
        ax.axhline(100 / k, color="0.5", ls=":", lw=1, label=f"chance ({100 / k:.0f}%)")
    _depth_axis(ax, depths)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Test accuracy vs depth")
    ax.grid(alpha=0.3)
    ax.legend()
    figs["accuracy_vs_depth"] = (f"Test accuracy against depth per family ({bars}).", _png(fig))

    cols = min(len(depths), 3)
    rows = math.ceil(len(depths) / cols)
    fig = _new_figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    cap = 1.5 * math.log(k) if k else None
    for i, d in enumerate(depths):
        ax = axes[i // cols][i % cols]
        for f in families:
            for g in fams[f]:
                if g.depth != d:
                    continue
                for j, c in enumerate(g.curves):
                    ax.plot([p[0] for p in c], [p[1] for p in c], color=colors[f], alpha=0.9 if len(g.curves) == 1 else 0.5,
                            lw=1.2, label=f if j == 0 else None)
        ax.set_title(f"depth {d}")
        ax.set_xlabel("step")
        if cap:
            ax.set_ylim(0, cap)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("training loss")
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend()
    for i in range(len(depths), rows * cols):
        axes[i // cols][i % cols].set_visible(False)
    figs["loss_curves"] = ("Training loss (cross-entropy of the batch at each logged step) per depth"
                           + ("; each seed is a line." if n_seeds > 1 else "."), _png(fig))

    for stem, attr, xlabel, title, log in (
            ("accuracy_vs_params", "params", "parameters", "Test accuracy vs parameters", True),
            ("accuracy_vs_wall", "wall_s", "wall time per run (s)", "Test accuracy vs wall time", False)):
        fig = _new_figure()
        ax = fig.add_subplot()
        for f in families:
            gs = [g for g in fams[f] if g.acc is not None and getattr(g, attr)]
            if not gs:
                continue
            ax.errorbar([getattr(g, attr) for g in gs], [g.acc * 100 for g in gs],
                        yerr=[g.acc_std * 100 for g in gs], marker="o", ls="-", capsize=3, color=colors[f], label=f)
            for g in gs:
                ax.annotate(str(g.depth), (getattr(g, attr), g.acc * 100), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=colors[f])
        if log:
            _params_axis(ax, [g.params for g in groups if g.params])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        what = "parameter count" if attr == "params" else "wall-clock time of the run (training, evaluation, checkpoints)"
        figs[stem] = (f"Test accuracy against {what}; labels are depths.", _png(fig))
    return figs


# -------------------------------------------------------------------------------------------------
# documents
# -------------------------------------------------------------------------------------------------

def _setup_sentences(results: dict[str, Any]) -> list[str]:
    study = results["study"]
    t = study.get("train", {})
    runs = results["runs"]
    done = [r for r in runs if r["status"] == "complete"]
    out = [f"Preset {study.get('preset')}: {study.get('description', '')}"]
    if study.get("overrides"):
        out.append("Changed from the preset: " + ", ".join(
            f"{k} {','.join(map(str, v)) if isinstance(v, list) else _kw_words(v) if isinstance(v, dict) else v}"
            for k, v in study["overrides"].items()) + ".")
    if t.get("steps"):
        ep = f" ({done[0]['epochs']:.2f} epoch)" if done and done[0].get("epochs") else ""
        budget = f"{t['steps']} steps of {t.get('batch_size')} images{ep}"
    else:
        budget = f"{t.get('epochs')} epochs of batch {t.get('batch_size')}"
    test = (f"test accuracy is measured on the first {t['test_subset']:,} test images (a subset, to save time)"
            if t.get("test_subset") else "test accuracy is measured on the whole test split")
    out.append(f"Every run trains {budget} on {study.get('data')} with {t.get('optimizer')} "
               f"(lr {t.get('lr')}, {t.get('schedule')} schedule); {test}.")
    devs = sorted({f"{r['device']}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}" for r in done
                   if r.get("device")})
    if devs:
        out.append(f"Measured on {'; '.join(devs)} ({study.get('cpu_count')} CPUs visible), torch "
                   f"{study.get('torch', '?')}. Images/s count training time only; on a shared machine they "
                   f"are indicative, compare them as ratios.")
    if not study.get("complete", True):
        out.append(f"This study is not finished: {study.get('runs_finished')} of {study.get('runs_planned')} runs "
                   f"are in. Re-run the same command to continue it.")
    return [s for s in out if s]


def render_markdown(results: dict[str, Any], figures: dict[str, tuple[str, bytes]] | None = None,
                    sections: list[Section] = (), plot_dir: str = "plots") -> str:
    """The Markdown report; figures are referenced as ``plot_dir/<stem>.png`` (written by write_report)."""
    study = results["study"]
    groups = aggregate(results)
    fams = study.get("families", [])
    figures = figures or {}
    md = [f"# Depth study: {study.get('preset', '')}", ""]
    md += [" ".join(_setup_sentences(results)), ""]
    if study.get("command"):
        md += [f"Command: `{study['command']}`", ""]
    md += ["## Verdict", ""] + [f"- {v}" for v in verdicts(results)] + ["", VERDICT_RULE, ""]
    md += ["## Test accuracy", "", md_table(accuracy_table(groups, fams)), ""]

    def fig(stem: str) -> list[str]:
        if stem not in figures:
            return []
        cap = figures[stem][0]
        return [f"![{cap}]({plot_dir}/{stem}.png)", "", f"*{cap}*", ""]

    md += fig("accuracy_vs_depth")
    md += ["## Training loss", ""] + fig("loss_curves")
    md += ["## Accuracy against cost", ""] + fig("accuracy_vs_params") + fig("accuracy_vs_wall")
    md += ["## Throughput", "", md_table(throughput_table(groups, fams)), "",
           "Training images per second (training time only); in brackets the ratio to resnet at the same depth.", ""]
    md += ["## All runs", "", md_table(runs_table(groups)), ""]
    if study.get("skipped"):
        md += ["## Left out", ""] + [f"- {s}" for s in study["skipped"]] + [""]
    for s in sections:
        md += [f"## {s.title}", ""]
        for p in s.paragraphs:
            md += [p, ""]
        for i, (cap, _) in enumerate(s.figures):
            md += [f"![{cap}]({plot_dir}/{_slug(s.title)}_{i}.png)", "", f"*{cap}*", ""]
    md += ["## Setup", "", md_table(recipe_table(study)), "",
           "Families: " + "; ".join(f"**{f}**: {d}" for f, d in study.get("family_descriptions", {}).items()), "",
           "Files: `results.json` (every run, with its loss curve), `results.csv`, `runs/<run>/` (the engine's run "
           "directories: metrics.jsonl, summary.json, checkpoints).", ""]
    return "\n".join(md)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
ul.verdict{background:#f6f8fa;border-left:4px solid #4a7;padding:.6em 1em .6em 2em}ul.verdict li{margin:.3em 0}.note{color:#555;font-size:.92em}code{background:#f5f5f5;padding:0 .2em}
"""


def render_html(results: dict[str, Any], figures: dict[str, tuple[str, bytes]],
                sections: list[Section] = ()) -> str:
    """A self-contained HTML page: figures embedded as ``data:image/png;base64``, no scripts."""
    study = results["study"]
    groups = aggregate(results)
    fams = study.get("families", [])
    e = html.escape

    def fig(stem: str) -> str:
        if stem not in figures:
            return ""
        return html_figure(*figures[stem])

    parts = [f"<h1>Depth study: {e(study.get('preset', ''))}</h1>",
             "".join(f"<p>{e(s)}</p>" for s in _setup_sentences(results)),
             f"<p>Command: <code>{e(study['command'])}</code></p>" if study.get("command") else "",
             "<h2>Verdict</h2><ul class=\"verdict\">" + "".join(f"<li>{e(v)}</li>" for v in verdicts(results)) + "</ul>"
             + f"<p class=\"note\">{e(VERDICT_RULE)}</p>",
             "<h2>Test accuracy</h2>" + html_table(accuracy_table(groups, fams)) + fig("accuracy_vs_depth"),
             "<h2>Training loss</h2>" + fig("loss_curves"),
             "<h2>Accuracy against cost</h2>" + fig("accuracy_vs_params") + fig("accuracy_vs_wall"),
             "<h2>Throughput</h2>" + html_table(throughput_table(groups, fams))
             + "<p class=\"note\">Training images per second (training time only); in brackets the ratio to resnet "
               "at the same depth.</p>",
             "<h2>All runs</h2>" + html_table(runs_table(groups))]
    if study.get("skipped"):
        parts.append("<h2>Left out</h2><ul>" + "".join(f"<li>{e(s)}</li>" for s in study["skipped"]) + "</ul>")
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>" + "".join(f"<p>{e(p)}</p>" for p in s.paragraphs)
                     + "".join(html_figure(cap, png) for cap, png in s.figures))
    fam_desc = "".join(f"<li><b>{e(f)}</b>: {e(d)}</li>" for f, d in study.get("family_descriptions", {}).items())
    parts.append("<h2>Setup</h2>" + html_table(recipe_table(study)) + f"<ul>{fam_desc}</ul>"
                 "<p class=\"note\">Files next to this page: <code>results.json</code> (every run, with its loss "
                 "curve), <code>results.csv</code>, <code>report.md</code>, <code>runs/&lt;run&gt;/</code>.</p>")
    return html_page(f"pnnh depth study: {study.get('preset', '')}", parts)


def html_page(title: str, parts: list[str]) -> str:
    """A self-contained HTML document of ``parts`` (HTML fragments) with the report's style."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def html_figure(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(caption, quote=True)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "section"


def write_report(out: str | Path, results: dict[str, Any], sections: list[Section] = ()) -> dict[str, Path]:
    """Write ``plots/*.png``, ``report.md`` and ``report.html`` into ``out``; return their paths."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figures = make_figures(results) if results["runs"] else {}
    for stem, (_, png) in figures.items():
        (plots / f"{stem}.png").write_bytes(png)
    for s in sections:
        for i, (_, png) in enumerate(s.figures):
            (plots / f"{_slug(s.title)}_{i}.png").write_bytes(png)
    atomic_write_text(out / "report.md", render_markdown(results, figures, sections))
    atomic_write_text(out / "report.html", render_html(results, figures, sections))
    return {"md": out / "report.md", "html": out / "report.html", "plots": plots}
