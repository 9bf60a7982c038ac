"""The dynamic ensemble over training: path-length distributions of ResNets at snapshots of a run.

For each model, trains one run through the engine (Fashion-MNIST, the catalogue recipe) and saves
the weights every ``--snapshot-every`` steps (and at step 0) to ``<out>/<model>/snapshots/``.
Then, for every snapshot, :func:`pnnh.analysis.ensemble.effective_path_lengths` on ``--images``
test images (batch statistics) gives the share of path weight on each path length, with branches
weighted by their BN scale (``gamma``) and by their measured size against the shortcut (``norm``).
Writes ``<report>/dynamic_ensemble.json``, ``.png`` and ``_table.md``. A model whose run finished
(``summary.json`` complete) is not trained again.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/dynamic_ensemble.py --out runs/dynamic_ensemble
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pnnh  # noqa: E402
from pnnh.analysis.diagnose import load_images  # noqa: E402
from pnnh.analysis.ensemble import dynamic_ensemble  # noqa: E402
from pnnh.train import TrainConfig, train  # noqa: E402
from pnnh.train.checkpoint import load_model, save_weights  # noqa: E402


def snapshot_path(run: Path, step: int) -> Path:
    return run / "snapshots" / f"step{step:06d}.safetensors"


def train_with_snapshots(name: str, run: Path, args) -> dict:
    """Train ``name`` into ``run``, saving its weights at step 0 and every ``--snapshot-every`` steps."""
    summary = run / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "complete":
        return json.loads(summary.read_text())
    torch.manual_seed(args.seed)  # as the engine seeds before building a model by name
    model = pnnh.create_model(name, num_classes=10, in_chans=1)
    snapshot_path(run, 0).parent.mkdir(parents=True, exist_ok=True)
    save_weights(snapshot_path(run, 0), model)

    def on_step(step: int) -> None:
        if step % args.snapshot_every == 0 or step == args.steps:
            save_weights(snapshot_path(run, step), model)

    cfg = TrainConfig(model=model, data="fashion-mnist", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, test_subset=args.test_subset, threads=args.threads, log_every=args.snapshot_every,
                      out=str(run), progress=False)
    return train(cfg, on_step=on_step)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    for row, name in zip(axes, models):
        snaps = results[name]["snapshots"]
        cmap = plt.get_cmap("viridis")
        for j, snap in enumerate(snaps):
            c = cmap(j / max(1, len(snaps) - 1))
            for ax, key in zip(row[:2], ("gamma", "norm")):
                d = snap[key]
                ax.plot(d["length"], d["fraction"], color=c, label=f"step {snap['step']}")
        u = snaps[0]["uniform"]
        for ax, key in zip(row[:2], ("gamma", "norm")):
            ax.plot(u["length"], u["fraction"], "k--", lw=1, label="binomial (all weights 1)")
            ax.set_xlabel("path length (residual branches taken)")
            ax.set_ylabel("share of path weight")
            ax.set_title(f"{name}: " + ("weight |gamma|" if key == "gamma" else "weight branch/shortcut RMS"))
        row[0].legend(fontsize=7)
        steps = [s["step"] for s in snaps]
        row[2].plot(steps, [s["gamma"]["mean"] for s in snaps], "o-", label="gamma-weighted mean length")
        row[2].plot(steps, [s["norm"]["mean"] for s in snaps], "s-", label="norm-weighted mean length")
        row[2].axhline(u["mean"], color="k", ls="--", lw=1, label="binomial mean n/2")
        ax2 = row[2].twinx()
        ax2.plot(steps, [s["mean_gamma"] for s in snaps], "^:", color="tab:red", label="mean |gamma| (right)")
        ax2.set_ylabel("mean |gamma| of branch norms", color="tab:red")
        row[2].set_xlabel("training step")
        row[2].set_ylabel("mean path length")
        row[2].set_title(f"{name}: effective depth over training")
        row[2].legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["# The dynamic ensemble: path-length statistics per snapshot", "",
             "Written by `scripts/dynamic_ensemble.py`; the command and the reading are in "
             "[catalogue.md](catalogue.md). Train loss: the loss of the batch at that step.", ""]
    for name, res in results.items():
        n = res["snapshots"][0]["uniform"]["n_blocks"]
        lines += [f"**{name}** ({n} residual blocks; binomial mean {n / 2:g}, std {res['snapshots'][0]['uniform']['std']:.2f}; "
                  f"final test accuracy {100 * res['test_acc']:.1f}%)", "",
                  "| step | train loss | mean \\|gamma\\| | gamma-weighted mean (std) | mean branch/shortcut RMS "
                  "| norm-weighted mean (std) |", "|---:|---:|---:|---:|---:|---:|"]
        for s in res["snapshots"]:
            loss = s.get("train_loss")
            lines.append(f"| {s['step']} | {'' if loss is None else f'{loss:.3f}'} | {s['mean_gamma']:.3f} "
                         f"| {s['gamma']['mean']:.2f} ({s['gamma']['std']:.2f}) | {s['mean_norm']:.3f} "
                         f"| {s['norm']['mean']:.2f} ({s['norm']['std']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet56,preact_resnet56", help="comma-separated registry names")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--snapshot-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--images", type=int, default=256, help="test images the branches are measured on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/dynamic_ensemble")
    ap.add_argument("--report", default=str(ROOT / "docs/results"), help="folder for the JSON, plot and table")
    args = ap.parse_args(argv)
    if args.snapshot_every < 1 or args.steps < 1:
        ap.error("--steps and --snapshot-every must be >= 1")
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        pnnh.model_info(name)  # unknown names fail before any training

    x, _, _ = load_images("fashion-mnist", args.images, split="test", seed=args.seed)
    results = {}
    for name in models:
        run = Path(args.out) / name
        print(f"== {name} -> {run}", flush=True)
        summary = train_with_snapshots(name, run, args)
        losses = dict((int(s), l) for s, l in summary.get("curve", []))
        files = sorted((run / "snapshots").glob("step*.safetensors"))
        snaps = dynamic_ensemble(((int(f.stem[4:]), load_model(f)) for f in files), x, norm_stats="batch")
        for s in snaps:
            blocks = s.pop("blocks")
            s["train_loss"] = losses.get(s["step"])
            s["mean_gamma"] = sum(b["gamma"] for b in blocks) / len(blocks)
            s["mean_norm"] = sum(b["norm"] for b in blocks) / len(blocks)
            s["block_gamma"] = [b["gamma"] for b in blocks]
            s["block_norm"] = [b["norm"] for b in blocks]
            print(f"   step {s['step']:>5}: mean |gamma| {s['mean_gamma']:.3f}  mean length gamma-weighted "
                  f"{s['gamma']['mean']:.2f}, norm-weighted {s['norm']['mean']:.2f}", flush=True)
        results[name] = {"test_acc": summary["test_acc"], "snapshots": snaps}

    rep = Path(args.report)
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "dynamic_ensemble.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    plot(results, rep / "dynamic_ensemble.png")
    (rep / "dynamic_ensemble_table.md").write_text(table(results))
    print(f"wrote {rep / 'dynamic_ensemble.png'} and {rep / 'dynamic_ensemble_table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
