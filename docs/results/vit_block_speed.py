"""Training-step time of one block-coder PNNH block with the coder's path in the parametrisation
(``path_param="param"``, the default) and in the initial weights only (``"init"``).

Usage: OMP_NUM_THREADS=1 python docs/results/vit_block_speed.py [--dim 96] [--heads 3] [--rounds 30] [--reps 20]
Each round times ``reps`` forward + backward passes of each block in turn on one fixed input of
128 x 17 tokens (the mini ViT's batch at patch 7), by this process's CPU time. Prints the median
time per pass of each form and the quartiles of the per-round speed ratio param / init.
"""

import argparse
import statistics
import time

import torch

from pnnh.models.vit import PNNHParallelBlock
from pnnh.train.malloc import tune_glibc_malloc

p = argparse.ArgumentParser()
p.add_argument("--dim", type=int, default=96)
p.add_argument("--heads", type=int, default=3)
p.add_argument("--rounds", type=int, default=30)
p.add_argument("--reps", type=int, default=20)
args = p.parse_args()
tune_glibc_malloc()  # as `pnnh train` does on CPU
torch.manual_seed(0)
blocks = {pp: PNNHParallelBlock(args.dim, args.heads, path_param=pp) for pp in ("param", "init")}
x = torch.randn(128, 17, args.dim, requires_grad=True)


def run(block: torch.nn.Module, reps: int) -> float:
    start = time.process_time()
    for _ in range(reps):
        block(x).sum().backward()
    return time.process_time() - start


for b in blocks.values():  # warm-up
    run(b, 5)
times = {pp: [] for pp in blocks}
for _ in range(args.rounds):
    for pp, b in blocks.items():
        times[pp].append(run(b, args.reps))
ratios = [i / p_ for p_, i in zip(times["param"], times["init"])]  # speed of param relative to init
q1, med, q3 = statistics.quantiles(ratios, n=4)
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), dim {args.dim}, {args.rounds} rounds x {args.reps}")
for pp, t in times.items():
    print(f"path_param={pp:<6} {1000 * statistics.median(t) / args.reps:7.2f} ms per forward + backward (median)")
print(f"speed param / init: median of per-round ratios {statistics.median(ratios):.3f}, quartiles {q1:.3f}-{q3:.3f}")
