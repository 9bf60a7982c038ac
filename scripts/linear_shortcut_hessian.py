"""Hessian of the loss at the zero initial point of deep linear nets with n-layer shortcuts.

Writes a Markdown table and a plot of the condition number against depth (Li et al., "Demystifying
ResNet"): ``python scripts/linear_shortcut_hessian.py --out docs/results``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pnnh.analysis.linear_shortcuts import RegressionTask, shortcut_depth_table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="2,4,6,8,12,16,24,32")
    p.add_argument("--shortcuts", default="0,1,2,3")
    p.add_argument("--dim", type=int, default=3)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    a = p.parse_args()
    depths = [int(d) for d in a.depths.split(",")]
    shortcuts = [int(n) for n in a.shortcuts.split(",")]
    task = RegressionTask(dim=a.dim, n_samples=a.samples, seed=a.seed)
    rows = shortcut_depth_table(depths, shortcuts, task)

    a.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in shortcuts:
        pts = [(r["depth"], r["condition_number"]) for r in rows if r["shortcut"] == n and math.isfinite(r["condition_number"])]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{n}-layer shortcuts" if n else "no shortcut")
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("condition number of the Hessian at zero")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"deep linear nets, d={a.dim}, {a.samples} samples")
    fig.tight_layout()
    fig.savefig(a.out / "linear_shortcuts.png", dpi=110)

    def fmt(x: float) -> str:
        return "zero Hessian" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:,.4g}")

    lines = ["| shortcut | depth | params | condition number | max abs eig | min abs eig |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shortcut'] or 'none'} | {r['depth']} | {r['params']} | {fmt(r['condition_number'])} | "
                     f"{r['max_abs_eig']:.4g} | {r['min_abs_eig']:.4g} |")
    (a.out / "linear_shortcuts_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
