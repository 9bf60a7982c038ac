"""Summarise the ViT runs of docs/results/vit.md: mean ± std test accuracy over seeds, params, img/s.

Usage: python docs/results/vit_aggregate.py runs/vit [--reference vit] [--curves FILE.png]
(reads <root>/<model>/s<seed>/summary.json and metrics.jsonl as written by `pnnh train`).
The training loss is the label-smoothed mean over the last epoch. ``--reference`` adds each
model's difference to that model: mean minus mean ± the Welch standard error (a one-seed side has
no spread of its own, so the error then understates the uncertainty).
``--curves`` also prints, per model, the test accuracy and training loss after each epoch (mean
over the seeds that reached it) and plots both against the epoch into FILE.png. Runs still in
progress appear in the curves only.
"""

import argparse
import json
import statistics
from pathlib import Path

from pnnh.experiments.stats import difference

p = argparse.ArgumentParser()
p.add_argument("root", nargs="?", default="runs/vit")
p.add_argument("--reference", metavar="MODEL", help="report each model's difference to this one (Welch error)")
p.add_argument("--curves", metavar="FILE.png", help="per-epoch table and plot of test accuracy and training loss")
args = p.parse_args()
root = Path(args.root)


def depth_then_name(kv):
    return int(kv[0].rsplit("_d", 1)[1].split(":")[0].split("-")[0]) if "_d" in kv[0] else 0, kv[0]


def last_epoch_loss(run_dir: Path) -> float:
    """The training loss (epoch mean) of the run's last epoch in metrics.jsonl."""
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in epochs if "epoch" in r and "train_loss" in r][-1]["train_loss"]


rows = {}
for f in sorted(root.glob("*/s*/summary.json")):
    s = json.loads(f.read_text())
    if s.get("status") != "complete":
        continue
    rows.setdefault(f.parent.parent.name, []).append((s, last_epoch_loss(f.parent)))
if args.reference and args.reference not in rows:
    raise SystemExit(f"error: no finished run of reference {args.reference!r} under {root}")
ref = [100 * r["test_acc"] for r, _ in rows[args.reference]] if args.reference else None
diff_head = f" − {args.reference} ± Welch SE |" if ref else ""
print(f"| model | seeds | test acc % (mean ± std) | per seed |{diff_head} train loss, last epoch (mean) | params "
      "| train img/s (mean, shared machine) |")
print("|---|---|---|---|" + ("---|" if ref else "") + "---|---|---|")
for name, runs in sorted(rows.items(), key=depth_then_name):
    runs = sorted(runs, key=lambda r: r[0]["seed"])
    accs = [100 * r["test_acc"] for r, _ in runs]
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    ips = statistics.mean(r["train_img_per_s"] for r, _ in runs)
    loss = statistics.mean(loss for _, loss in runs)
    cell = ""
    if ref:
        d, se = difference(accs, ref)
        cell = " | " + ("—" if name == args.reference else f"{d:+.2f} ± {se:.2f}")
    print(f"| {name} | {len(runs)} | {statistics.mean(accs):.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)}"
          f"{cell} | {loss:.3f} | {runs[0][0]['params']:,} | {ips:.0f} |")

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
