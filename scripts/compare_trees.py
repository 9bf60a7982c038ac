"""Training-step time of models from two source trees of pnnh, loaded side by side in one process.

To measure a change to the training path against the code before it on a noisy machine: both
versions step alternately (the order rotates each round), so machine noise hits them alike::

    git worktree add --detach ../pnnh-old 497f297
    python scripts/compare_trees.py --old ../pnnh-old --models new:resnet56,old:pnnh56,new:pnnh56 --rounds 12

Prints each model's median and minimum step time and its throughput relative to the first. Batch
128 of random 1x28x28 images, channels_last, SGD; the malloc tuning of ``pnnh.train.malloc`` is
applied (once: it is process-wide).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def load_tree(alias: str, root: Path):
    """The ``pnnh`` package under ``root``, imported as module ``alias``."""
    spec = importlib.util.spec_from_file_location(alias, root / "pnnh" / "__init__.py",
                                                  submodule_search_locations=[str(root / "pnnh")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="root of the other checkout (imported as 'old')")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1]), help="default: this checkout")
    ap.add_argument("--models", required=True, help="comma-separated TREE:MODEL, TREE in {old,new}")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trees = {"new": load_tree("pnnh", Path(args.new)), "old": load_tree("pnnh_old", Path(args.old))}
    print("malloc tuned:", trees["new"].train.malloc.tune_glibc_malloc())
    from step_faults import sgd_step  # scripts/ is on sys.path when this runs as a script

    runs = []
    for spec in args.models.split(","):
        tree, name = spec.split(":")
        torch.manual_seed(0)
        step = sgd_step(trees[tree].create_model(name))
        for _ in range(2):
            step()
        runs.append((spec, step, []))
    for r in range(args.rounds):
        for spec, step, times in runs[r % len(runs):] + runs[:r % len(runs)]:
            t = time.perf_counter()
            step()
            step()
            times.append((time.perf_counter() - t) / 2)
    base = statistics.median(runs[0][2])
    for spec, _, times in runs:
        med = statistics.median(times)
        print(f"{spec:24s} median {med * 1e3:7.1f} ms  min {min(times) * 1e3:7.1f} ms  throughput x{base / med:.3f}")


if __name__ == "__main__":
    main()
