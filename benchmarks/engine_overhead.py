"""Training throughput of the pnnh engine against a bare hand-written loop, side by side.

Both train the same model (resnet20 by default) with batch 128 on the same Fashion-MNIST
:class:`~pnnh.data.InMemoryLoader` batches (augmentation on) with the engine's own optimizer
(``build_optimizer``: SGD, Nesterov momentum 0.9, weight decay on conv/linear weights). The bare
loop is the minimum a person would write: next batch, forward, cross-entropy, zero_grad,
backward, step. Everything the engine adds -- the LR schedule, the divergence check
(``loss.item()``), running loss/accuracy sums, logging -- is what is measured.

The two alternate **step by step** in one process: ``pnnh.train.train`` runs with an ``on_step``
callback, and the callback runs one step of the bare loop (its own model, optimizer and loader
iterator). An engine step is the time from the end of one callback to the start of the next
(batch, forward, backward, update and all bookkeeping); a bare step is timed inside the
callback. Pairing every engine step with the bare step right after it makes the ratio robust to
the load of a shared machine. The first ``--warmup`` pairs are dropped.

Reported: images/s of each (from the summed step times) and the engine/bare throughput ratio, as
the ratio of summed times and as the median of per-pair ratios. Issue #2 asks for >= 0.95.

    OMP_NUM_THREADS=2 python benchmarks/engine_overhead.py --threads 2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pnnh.data import InMemoryLoader, load_dataset  # noqa: E402
from pnnh.models import create_model  # noqa: E402
from pnnh.train import TrainConfig, train  # noqa: E402
from pnnh.train.engine import build_optimizer  # noqa: E402


class BareLoop:
    """The hand-written loop, one step per call."""

    def __init__(self, cfg: TrainConfig):
        ds = load_dataset(cfg.data, "train", cfg.data_dir)
        self.loader = InMemoryLoader(ds, cfg.batch_size, train=True, augment=cfg.augment, seed=cfg.seed + 1,
                                     channels_last=cfg.channels_last)
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, num_classes=ds.num_classes, in_chans=ds.in_chans,
                                  img_size=ds.img_size, **cfg.model_kwargs)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = build_optimizer(self.model, cfg)
        self.epoch, self.it = 0, iter(self.loader)

    def step(self) -> None:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.it = iter(self.loader)
            x, y = next(self.it)
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def measure(cfg: TrainConfig, warmup: int) -> dict:
    bare = BareLoop(cfg)
    engine_t: list[float] = []
    bare_t: list[float] = []
    last = None

    def on_step(step: int) -> None:
        nonlocal last
        start = time.perf_counter()
        if last is not None:
            engine_t.append(start - last)
        bare.step()
        end = time.perf_counter()
        bare_t.append(end - start)
        last = end

    summary = train(cfg, on_step=on_step)
    # engine_t[k] is engine step k+2 (the first engine step has no previous callback); pair it with
    # the bare step that follows it
    pairs = list(zip(engine_t, bare_t[1:]))[warmup:]
    if not pairs:
        raise SystemExit("no measured steps: raise --steps above --warmup + 1")
    e, b = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return {"engine_img_per_s": len(pairs) * cfg.batch_size / e, "bare_img_per_s": len(pairs) * cfg.batch_size / b,
            "ratio": b / e, "median_pair_ratio": statistics.median(bt / et for et, bt in pairs), "pairs": len(pairs),
            "engine_step_ms": [round(t * 1e3, 2) for t, _ in pairs], "bare_step_ms": [round(t * 1e3, 2) for _, t in pairs],
            "engine_summary_img_per_s": summary["train_img_per_s"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60, help="engine steps (each paired with one bare step)")
    ap.add_argument("--warmup", type=int, default=5, help="pairs dropped at the start")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="NHWC, the engine default (--no-channels-last for NCHW)")
    ap.add_argument("--data-dir", help="Fashion-MNIST directory [the usual search path]")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, data_dir=args.data_dir,
                      test_subset=1000, progress=False, channels_last=args.channels_last, threads=args.threads,
                      augment=True)  # measure the data path with augmentation, whatever the run length
    result = {"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "channels_last": args.channels_last, "torch": torch.__version__, **measure(cfg, args.warmup)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}, batch {args.batch_size}, {result['pairs']} step pairs, {result['threads']} thread(s): "
              f"engine {result['engine_img_per_s']:.1f} img/s, bare loop {result['bare_img_per_s']:.1f} img/s, "
              f"engine/bare {result['ratio']:.3f} (median of pairs {result['median_pair_ratio']:.3f})")
    return result


if __name__ == "__main__":
    main()
