"""Side-by-side training throughput of ViT variants, alternating in one process.

Usage: OMP_NUM_THREADS=1 python docs/results/vit_speed.py [--models vit_mini_d12,pnnh_vit_mini_d12:coder=sublayer]
       [--rounds 5] [--steps 3]
Each round times `steps` AdamW training steps (forward, backward, step) of every model in turn
(A B C A B C ...) on one fixed batch of 128 28x28 images (patch 7). A model is NAME or
NAME:key=value:key=value (model options). Prints per model the parameters, the median images/s
over rounds by wall clock and by this process's CPU time, and each ratio to the first model
(the median of per-round ratios; the inter-quartile range of the CPU-time ratios says how much
the rounds disagree: single rounds of a few steps vary by several per cent on a shared machine).
glibc's malloc is tuned as in `pnnh train`. On a machine shared with other jobs the wall clock
counts the time other processes hold the cores; the CPU-time rate does not, so it is the steadier
ratio.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pnnh
from pnnh.train.malloc import tune_glibc_malloc


def parse(spec: str) -> tuple[str, dict]:
    name, *opts = spec.split(":")
    kwargs = {}
    for o in opts:
        k, v = o.split("=", 1)
        kwargs[k] = float(v) if v.replace(".", "", 1).isdigit() else v
    return name, kwargs


p = argparse.ArgumentParser()
p.add_argument("--models", default="vit_mini_d12,plain_vit_mini_d12,pnnh_vit_mini_d12")
p.add_argument("--patch-size", type=int, default=7)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--steps", type=int, default=3)
args = p.parse_args()
tune_glibc_malloc()  # as `pnnh train` does on CPU: freed activations stay in the heap
torch.manual_seed(0)
specs = args.models.split(",")
models = {}
for s in specs:
    name, kw = parse(s)
    models[s] = pnnh.create_model(name, patch_size=args.patch_size, **kw)
opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))


def run(n: str, steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = F.cross_entropy(models[n](x), y)
        opts[n].zero_grad(set_to_none=True)
        loss.backward()
        opts[n].step()
    images = args.batch_size * steps
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


for n in specs:  # warm-up
    run(n, 1)
rates = {n: [] for n in specs}
for _ in range(args.rounds):
    for n in specs:
        rates[n].append(run(n, args.steps))
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, "
      f"patch {args.patch_size}, {args.rounds} rounds x {args.steps} steps")
print(f"{'model':<46} {'params':>10}  {'wall img/s':>10} {'ratio':>6}  {'cpu img/s':>9} {'ratio':>6}  {'ratio IQR':>11}")
for n in specs:
    params = sum(q.numel() for q in models[n].parameters())
    wall = [r[0] for r in rates[n]]
    cpu = [r[1] for r in rates[n]]
    wall_ratio = statistics.median(a[0] / b[0] for a, b in zip(rates[n], rates[specs[0]]))
    cpu_ratios = [a[1] / b[1] for a, b in zip(rates[n], rates[specs[0]])]
    q1, _, q3 = statistics.quantiles(cpu_ratios, n=4) if len(cpu_ratios) > 1 else (cpu_ratios[0],) * 3
    print(f"{n:<46} {params:>10,}  {statistics.median(wall):10.1f} {wall_ratio:6.3f}  "
          f"{statistics.median(cpu):9.1f} {statistics.median(cpu_ratios):6.3f}  {q1:.3f}-{q3:.3f}")
