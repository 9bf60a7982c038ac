"""Summarise the ViT runs of docs/results/vit.md: mean ± std test accuracy over seeds, params, img/s.

Usage: python docs/results/vit_aggregate.py runs/vit [--curves FILE.png]
(reads <root>/<model>/s<seed>/summary.json and metrics.jsonl as written by `pnnh train`).
``--curves`` also prints, per model, the test accuracy and training loss after each epoch (mean
over the seeds that reached it) and plots both against the epoch into FILE.png. Runs still in
progress appear in the curves only.
"""

import argparse
import json
import statistics
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("root", nargs="?", default="runs/vit")
p.add_argument("--curves", metavar="FILE.png", help="per-epoch table and plot of test accuracy and training loss")
args = p.parse_args()
root = Path(args.root)


def depth_then_name(kv):
    return int(kv[0].rsplit("_d", 1)[1].split(":")[0].split("-")[0]) if "_d" in kv[0] else 0, kv[0]


rows = {}
for f in sorted(root.glob("*/s*/summary.json")):
    s = json.loads(f.read_text())
    if s.get("status") != "complete":
        continue
    rows.setdefault(f.parent.parent.name, []).append(s)
print("| model | seeds | test acc % (mean ± std) | per seed | last train loss (mean) | params | train img/s (mean, shared machine) |")
print("|---|---|---|---|---|---|---|")
for name, runs in sorted(rows.items(), key=depth_then_name):
    accs = [100 * r["test_acc"] for r in sorted(runs, key=lambda r: r["seed"])]
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    ips = statistics.mean(r["train_img_per_s"] for r in runs)
    last = statistics.mean(r["curve"][-1][1] for r in runs)  # loss of the last logged step (label-smoothed)
    print(f"| {name} | {len(runs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)} "
          f"| {last:.3f} | {runs[0]['params']:,} | {ips:.0f} |")

if args.curves:
    curves = {}  # model -> epoch -> [(test acc %, train loss) per seed]
    for f in sorted(root.glob("*/s*/metrics.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if "epoch" in r and "test_acc" in r:
                curves.setdefault(f.parent.parent.name, {}).setdefault(r["epoch"], []).append(
                    (100 * r["test_acc"], r["train_loss"]))
    names = [n for n, _ in sorted(curves.items(), key=depth_then_name)]
    epochs = sorted({e for c in curves.values() for e in c})
    print()
    print("| epoch | " + " | ".join(f"{n} test acc % / train loss (seeds)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for e in epochs:
        cells = []
        for n in names:
            v = curves[n].get(e)
            cells.append(f"{statistics.mean(a for a, _ in v):.2f} / {statistics.mean(l for _, l in v):.3f} ({len(v)})"
                         if v else "")
        print(f"| {e} | " + " | ".join(cells) + " |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in names:
        es = sorted(curves[n])
        ax1.plot(es, [statistics.mean(a for a, _ in curves[n][e]) for e in es], marker=".", label=n)
        ax2.plot(es, [statistics.mean(l for _, l in curves[n][e]) for e in es], marker=".", label=n)
    ax1.set(xlabel="epoch", ylabel="test accuracy % (mean over seeds)", title="Fashion-MNIST test accuracy")
    ax2.set(xlabel="epoch", ylabel="training loss (label-smoothed, epoch mean)", title="training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.curves, dpi=110)
    print(f"\ncurves -> {args.curves}")
