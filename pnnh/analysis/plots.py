"""PNG plots of :func:`pnnh.analysis.run_diagnostics` results (matplotlib, Agg backend: no display needed).

:func:`plot_diagnostics` draws one model's figures; :func:`plot_comparison` overlays several
models (e.g. plain56 vs resnet56 vs pnnh56) on a shared depth axis. Both return the written paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_diagnostics", "plot_comparison"]

_METRIC_LABELS = {"cka": "linear CKA", "cka_debiased": "debiased CKA", "ridge_r2": "ridge R² (held out)",
                  "dists_similarity": "1 - DISTS"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _dissipation(ax, result: dict[str, Any], name: str, label: str | None = None, color=None, band: bool = True) -> None:
    m = result["dissipation"]["metrics"][name]
    probes = m.get("probes", result["dissipation"]["probes"])
    depth = [p["depth"] for p in probes]
    line, = ax.plot(depth, m["value"], marker=".", ms=3, lw=1.2, label=label or "measured", color=color)
    if band:
        lo = [a - (u - a) for a, u in zip(m["floor_mean"], m["floor_upper"])]
        ax.fill_between(depth, lo, m["floor_upper"], color=line.get_color(), alpha=0.18,
                        label=None if label else "noise band (shuffled pairing)")
    d = m["dissipation"]
    if d is not None:
        ax.axvline(d["depth"], color=line.get_color(), ls="--", lw=0.8)


def plot_diagnostics(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``dissipation.png``, ``surviving.png``, ``gradients.png``, ``signal.png`` and (when run)
    ``lesion.png`` for one :func:`run_diagnostics` result; returns the paths."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{result['model']} ({result['norm_stats']} norm statistics, {result['images']} images)"
    paths = []

    metrics = [k for k, v in result["dissipation"]["metrics"].items() if "value" in v]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, k in zip(axes[0], metrics):
        _dissipation(ax, result, k)
        ax.set_title(_METRIC_LABELS.get(k, k))
        ax.set_xlabel("depth (weight layers)")
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].set_ylabel("similarity to the input")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Dissipating inputs: {title}", fontsize=10)
    paths.append(_save(fig, out / "dissipation.png"))

    surv = result["surviving"]
    fig, axes = plt.subplots(1, 3 if "theory" in surv else 1, figsize=(13 if "theory" in surv else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    layers = surv["layers"]
    if layers:
        d = [r["depth"] for r in layers]
        ax.plot(d, [r["frac_pos"] for r in layers], "o", ms=3, label="measured P(pre-act > 0)")
        ax.plot(d, [r["cantelli"] for r in layers], "v", ms=3, label="Cantelli bound (layer moments)")
        ax.plot(d, [r["cantelli_channel"] for r in layers], "^", ms=3, label="Cantelli bound (per channel)")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ReLU pre-activation probed", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("depth (weight layers)")
    ax.set_title("surviving neurons in this model", fontsize=9)
    if "theory" in surv:
        th = surv["theory"]
        ax = axes[0][1]
        for kind, c in (("plain", "C0"), ("residual", "C1")):
            rows = th[kind]
            li = [r["layer"] for r in rows]
            ax.plot(li, [r["frac_pos"] for r in rows], "o", color=c, ms=4, label=f"{kind}: measured")
            ax.plot(li, [r["pred_frac"] for r in rows], "-", color=c, label=f"{kind}: predicted")
            ax.plot(li, [r["cantelli_pred"] for r in rows], ":", color=c, label=f"{kind}: Cantelli bound")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("layer")
        ax.set_title(f"He-normal layers (width {th['width']}): P(y > 0)", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[0][2]
        for kind, c in (("plain", "C0"), ("residual", "C1")):
            rows = th[kind]
            li = [r["layer"] for r in rows]
            ax.plot(li, [r["var"] / r["pred_var"] for r in rows], "o-", color=c, ms=4, label=f"{kind}: measured / exact")
            ax.plot(li, [r["var"] / r["paper_var"] for r in rows], "x--", color=c, ms=4,
                    label=f"{kind}: measured / {'3' if kind == 'residual' else '2'}σx²")
        ax.axhline(1, color="k", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_title("Var(y): measured / predicted", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"Surviving neurons: {title}", fontsize=10)
    paths.append(_save(fig, out / "surviving.png"))

    if "gradients" in result:
        g = result["gradients"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        axes[0].plot([p["depth"] for p in g["probes"]], g["lag1"], "o-")
        axes[0].set_ylim(-0.1, 1.02)
        axes[0].set_xlabel("depth (weight layers)")
        axes[0].set_ylabel("corr. of neighbouring input-gradients")
        axes[0].axhline(0, color="k", lw=0.5)
        cmap = plt.get_cmap("viridis")
        for i, (p, c) in enumerate(zip(g["probes"], g["corr"])):
            axes[1].plot(range(len(c)), c, color=cmap(i / max(1, len(g["probes"]) - 1)), lw=1,
                         label=f"depth {p['depth']}" if i in (0, len(g["probes"]) - 1) else None)
        axes[1].set_xlabel("steps apart along the line")
        axes[1].set_ylabel("gradient correlation")
        axes[1].legend(fontsize=7)
        fig.suptitle(f"Shattered gradients: {title}", fontsize=10)
        paths.append(_save(fig, out / "gradients.png"))

    blocks = result["signal"]["blocks"]
    if blocks:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        idx = list(range(1, len(blocks) + 1))
        ax.plot(idx, [b["avg_sq_mean"] for b in blocks], ".-", label="average channel squared mean")
        ax.plot(idx, [b["avg_var"] for b in blocks], ".-", label="average channel variance")
        bv = [(i, b["branch_var"]) for i, b in zip(idx, blocks) if b["branch_var"] is not None]
        if bv:
            ax.plot(*zip(*bv), ".-", label="residual branch: average channel variance")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.legend(fontsize=7)
        ax.set_title(f"Signal propagation: {title}", fontsize=9)
        paths.append(_save(fig, out / "signal.png"))

    les = result.get("lesion", {})
    if "delete" in les:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        ax = axes[0]
        dl = [(d["block"], d["acc"]) for d in les["delete"] if d["acc"] is not None]
        if dl:
            ax.plot(*zip(*dl), "o-", ms=3, label="block deleted")
        sw = [(s["blocks"][0] + 0.5, s["acc"]) for s in les["swap"]]
        if sw:
            ax.plot(*zip(*sw), "s", ms=3, label="neighbours swapped")
        ax.axhline(les["baseline"], color="k", lw=0.8, label="intact")
        ax.set_ylim(0, 1)
        ax.set_xlabel("block")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        ax.set_title("lesions at test time", fontsize=9)
        pl = result["path_lengths"]
        axes[1].bar(pl["length"], pl["fraction"])
        axes[1].set_xlabel("path length (residual branches on the path)")
        axes[1].set_ylabel("fraction of paths")
        axes[1].set_title(f"{pl['n_blocks']} residual blocks: Binomial({pl['n_blocks']}, 1/2)", fontsize=9)
        fig.suptitle(f"Lesion study: {title}", fontsize=10)
        paths.append(_save(fig, out / "lesion.png"))
    return paths


def plot_comparison(results: dict[str, dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Overlay several models: ``comparison.png`` (similarity to the input, gradient correlation, signal)."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for i, (label, r) in enumerate(results.items()):
        c = f"C{i}"
        _dissipation(axes[0], r, "ridge_r2", label=label, color=c)
        _dissipation(axes[1], r, "cka_debiased", label=label, color=c)
        if "gradients" in r:
            g = r["gradients"]
            axes[2].plot([p["depth"] for p in g["probes"]], g["lag1"], "o-", ms=3, color=c, label=label)
        blocks = r["signal"]["blocks"]
        axes[3].plot([b["depth"] for b in blocks], [b["avg_var"] for b in blocks], ".-", color=c, label=label)
    for ax, t in zip(axes, ("ridge R² to the input (band: noise)", "debiased CKA to the input",
                            "neighbouring input-gradient correlation", "block output: average channel variance")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("depth (weight layers)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[3].set_yscale("log")
    paths = [_save(fig, out / "comparison.png")]
    return paths
