"""Measure the residual catalogue on Fashion-MNIST and write docs/results/catalogue.md.

Each (model, seed) trains through the engine into its own directory ``<out>/<model>-s<seed>``.
Finished runs (``summary.json`` with status complete) are skipped and interrupted ones resume
from their last checkpoint, so the script can be stopped and started again at any time.
``--report-only`` rebuilds the table from the run directories without training. ``--curves
FILE.png`` also plots the models' training-loss curves side by side (mean over seeds of a running
mean; ``--log-every 1`` records the loss of every step).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/catalogue_table.py --out runs/catalogue
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pnnh  # noqa: E402
from pnnh.train import TrainConfig, train  # noqa: E402

# depth 56 where the family has it; WRN and ResNeXt at their nearest cheap canonical members
DEFAULT_MODELS = ("resnet56,scaled_resnet56,se_resnet56,highway56,demystify56,shared_resnet56,droppath_resnet56,"
                  "multires56_k2,resnext29_8x4d,wrn16_4")


def run_dir(out: Path, model: str, seed: int) -> Path:
    return out / f"{model}-s{seed}"


def finished(d: Path) -> dict | None:
    f = d / "summary.json"
    if not f.exists():
        return None
    s = json.loads(f.read_text())
    return s if s.get("status") == "complete" else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated registry names")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--test-subset", type=int, default=2000, help="first N test images (0: all 10,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/catalogue")
    ap.add_argument("--report", default=str(ROOT / "docs/results/catalogue.md"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--log-every", type=int, default=20, help="steps between training-loss records")
    ap.add_argument("--curves", help="also write the training-loss curves of the models to this PNG")
    ap.add_argument("--smooth", type=int, default=10, help="running-mean window of the plotted curves (records)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    for name in models:
        pnnh.model_info(name)  # unknown names fail before any training

    if not args.report_only:
        for seed in seeds:  # seed-major: one full pass gives a first number for every model
            for name in models:
                d = run_dir(out, name, seed)
                if finished(d):
                    continue
                print(f"== {name} seed {seed} -> {d}", flush=True)
                cfg = TrainConfig(model=name, data="fashion-mnist", steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, seed=seed, test_subset=args.test_subset or None, threads=args.threads,
                                  checkpoint_every=20, log_every=args.log_every, out=str(d), resume=True,
                                  progress=False)
                s = train(cfg)
                print(f"   test acc {s['test_acc']:.4f}  {s['train_img_per_s']:.0f} img/s", flush=True)

    rows = []
    for name in models:
        runs = [s for seed in seeds if (s := finished(run_dir(out, name, seed)))]
        info = pnnh.model_info(name)
        rows.append((name, info.family, info.depth, runs[0]["params"] if runs else None,
                     [100 * r["test_acc"] for r in runs], [r["train_img_per_s"] for r in runs]))
    write_report(Path(args.report), rows, args, seeds)
    if args.curves:
        plot_curves(Path(args.curves), {name: [s["curve"] for seed in seeds if (s := finished(run_dir(out, name, seed)))]
                                        for name in models}, args)
    return 0


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(path: Path, curves: dict[str, list[list[list[float]]]], args) -> None:
    """One line per model: the mean over seeds of each seed's running-mean training loss; seeds thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, runs) in enumerate(curves.items()):
        if not runs:
            continue
        color = f"C{i}"
        steps = [p[0] for p in runs[0]]
        smooth = [running_mean([p[1] for p in c], args.smooth) for c in runs]
        for c in smooth:
            ax.plot(steps[:len(c)], c, color=color, lw=0.6, alpha=0.35)
        n = min(len(c) for c in smooth)
        mean = [statistics.mean(c[j] for c in smooth) for j in range(n)]
        ax.plot(steps[:n], mean, color=color, lw=1.8, label=f"{name} ({len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {args.smooth} records)")
    ax.set_title(f"Fashion-MNIST, batch {args.batch_size}, peak lr {args.lr}, {args.steps} steps", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def write_report(path: Path, rows, args, seeds) -> None:
    cmd = (f"OMP_NUM_THREADS=1 nice -n 10 python scripts/catalogue_table.py --models {args.models} "
           f"--seeds {args.seeds} --steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} "
           f"--test-subset {args.test_subset} --threads {args.threads} --out {args.out}"
           + (f" --log-every {args.log_every}" if args.log_every != 20 else ""))
    lines = [
        "# The residual catalogue on Fashion-MNIST (short budget)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()} CPU, torch {torch.__version__}, "
        f"{args.threads} thread(s), **shared with other jobs**: img/s is indicative only (the machine was "
        "loaded by other processes while this ran; compare speeds only from a quiet re-run).",
        "",
        f"Setup: Fashion-MNIST 28x28, {args.steps} SGD steps (Nesterov, one-cycle, peak lr {args.lr}, weight decay "
        f"5e-4, crop+flip), batch {args.batch_size} ({args.steps * args.batch_size} images, about "
        f"{args.steps * args.batch_size / 60000:.2f} epoch), test accuracy on the first "
        f"{args.test_subset or 10000} test images, seeds {', '.join(map(str, seeds))}. Every model at its registered "
        "defaults. Accuracy: mean ± sample std over seeds. A budget this short ranks how fast each variant "
        "starts to learn, not where it ends.",
        "",
        "Command:",
        "",
        "```bash",
        cmd,
        "```",
        "",
        "| model | family | depth | params | test acc % (mean ± std) | seeds | train img/s (shared machine) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, family, depth, params, accs, ips in rows:
        if not accs:
            lines.append(f"| `{name}` | {family} | {depth} | | not measured yet | 0 | |")
            continue
        std = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        lines.append(f"| `{name}` | {family} | {depth} | {params / 1e6:.3f}M | {statistics.mean(accs):.1f}{std} "
                     f"| {len(accs)} | {statistics.mean(ips):.0f} |")
    if any(len(r[4]) < len(seeds) for r in rows):
        lines += ["", "Rows with fewer seeds than listed did not finish on the shared machine; the command "
                  "above resumes and completes them (finished runs are skipped)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
