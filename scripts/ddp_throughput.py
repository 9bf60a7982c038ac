"""Training throughput of 1 process vs N torchrun (gloo DDP) processes at the same global batch.

Runs the configurations in alternation (A B C A B C ...), so slow drifts of a shared machine hit
all of them alike, and prints each run's train images/s (training time only: no start-up, no
evaluation, no checkpoint I/O, as ``summary.json`` reports it) and the medians.

    OMP_NUM_THREADS=1 python scripts/ddp_throughput.py --rounds 3

Run it from the repository root on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    common = ["--model", args.model, "-k", f"width={args.width}", "--train-subset", str(args.global_batch * args.steps),
              "--test-subset", "500", "--steps", str(args.steps), "--no-progress"]
    n = args.nproc
    configs = {
        f"1 process x {cores} threads": [sys.executable, "-m", "pnnh", "train", "--threads", str(cores),
                                         "--batch-size", str(args.global_batch)],
        "1 process x 1 thread": [sys.executable, "-m", "pnnh", "train", "--threads", "1",
                                 "--batch-size", str(args.global_batch)],
        f"{n} processes (gloo DDP) x {max(1, cores // n)} thread(s)": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "pnnh",
            "train", "--batch-size", str(args.global_batch // n)],
    }
    rates: dict[str, list[float]] = {k: [] for k in configs}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, cmd) in enumerate(configs.items()):
                out = Path(tmp) / f"r{r}c{i}"
                subprocess.run(cmd + common + ["--out", str(out)], cwd=REPO, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rate = json.loads((out / "summary.json").read_text())["train_img_per_s"]
                rates[name].append(rate)
                print(f"round {r + 1}  {name:<40} {rate:8.1f} img/s", flush=True)
    base = statistics.median(rates[next(iter(configs))])
    print(f"\n{args.model} width {args.width}, global batch {args.global_batch}, {args.steps} steps, {cores} cores")
    for name, v in rates.items():
        med = statistics.median(v)
        print(f"{name:<40} median {med:8.1f} img/s   x{med / base:.2f} of the first")


if __name__ == "__main__":
    main()
