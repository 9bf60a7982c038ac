"""Per-epoch training loss and test accuracy of the headline runs (docs/results/pnnh_cost.md).

Usage: python docs/results/headline_curves.py [RUNS] [--out FILE.png]
(RUNS: a folder of `pnnh ablate` runs, <budget>@lr<r>/d<depth>/<variant>/s<seed>/metrics.jsonl;
default docs/results/runs/pnnh_gpu). Plots every budget with ``e`` epochs of depth 56 present there,
one line per variant and budget: the mean over its seeds, shaded between the lowest and highest seed.
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("root", nargs="?", default="docs/results/runs/pnnh_gpu")
p.add_argument("--out", default="docs/results/pnnh_headline_e10.png")
p.add_argument("--depth", type=int, default=56)
args = p.parse_args()

curves = defaultdict(list)  # (budget, variant) -> one [(epoch, loss, acc)] per seed
for f in sorted(Path(args.root).glob(f"*/d{args.depth}/*/s*/metrics.jsonl")):
    budget, variant = f.parts[-5].split("@")[0], f.parts[-3]
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    curves[budget, variant].append([(r["epoch"], r["train_loss"], 100 * r["test_acc"]) for r in rows if "epoch" in r])

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for (budget, variant), seeds in sorted(curves.items()):
    n = min(len(s) for s in seeds)
    epochs = [seeds[0][i][0] for i in range(n)]
    label = f"{variant}, {budget} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
    for ax, k in zip(axes, (1, 2)):
        values = [[s[i][k] for s in seeds] for i in range(n)]
        line, = ax.plot(epochs, [statistics.mean(v) for v in values], marker=".", label=label)
        if len(seeds) > 1:
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    print(label, "final loss", round(statistics.mean(s[n - 1][1] for s in seeds), 3),
          "final test %", round(statistics.mean(s[n - 1][2] for s in seeds), 2))
axes[0].set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log")
axes[1].set(xlabel="epoch", ylabel="test accuracy %", ylim=(80, 95))
for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
axes[1].legend(fontsize=7, loc="lower right")
fig.suptitle(f"depth {args.depth}, Fashion-MNIST, fair recipe on the GPU: each family at its chosen rate")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print("wrote", args.out)
