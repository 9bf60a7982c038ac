"""Where a training step spends its time: torch.profiler over a few engine-style steps.

Runs ``--steps`` training steps of a model on real Fashion-MNIST batches from
:class:`~pnnh.data.InMemoryLoader` (the engine's data path, augmentation on) under
``torch.profiler`` and prints the operators by self CPU time, grouped into the buckets that
matter for deciding what to optimise: convolution (forward and backward), BatchNorm, ReLU,
pointwise/other, optimizer, data (batch assembly, augmentation, normalisation).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model plain56 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --model plain56 --threads 1 --channels-last
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnnh.data import InMemoryLoader, load_dataset  # noqa: E402
from pnnh.models import create_model  # noqa: E402
from pnnh.train import TrainConfig  # noqa: E402
from pnnh.train.engine import build_optimizer  # noqa: E402

BUCKETS = (  # first match wins; matched against the lower-cased operator name
    ("convolution", ("conv", "mkldnn_convolution")),
    ("batchnorm", ("batch_norm",)),
    ("relu", ("relu", "threshold")),
    ("optimizer", ("optimizer", "_foreach", "sgd")),
    ("data", ("data:",)),
)


def bucket(name: str) -> str:
    low = name.lower()
    for label, keys in BUCKETS:
        if any(k in low for k in keys):
            return label
    return "other"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--amp", choices=["bf16"], help="bf16 autocast")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist", "train")
    loader = InMemoryLoader(ds, args.batch_size, train=True, augment=True, channels_last=args.channels_last)
    model = create_model(args.model, num_classes=10, in_chans=1, img_size=28)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, TrainConfig())
    it = iter(loader)

    def step():
        with record_function("data: next batch"):
            x, y = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer.step"):
            opt.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    sums = defaultdict(float)
    for e in events:
        sums[bucket(e.key)] += e.self_cpu_time_total
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"channels_last={args.channels_last}, amp={args.amp}: {total / args.steps / 1e3:.1f} ms/step (profiled)")
    for label, t in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<12}{t / total * 100:6.1f}%  {t / args.steps / 1e3:8.1f} ms/step")
    print(f"top {args.top} operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key[:48]:<48}{e.self_cpu_time_total / total * 100:6.1f}%  calls/step {e.count // args.steps}")


if __name__ == "__main__":
    main()
