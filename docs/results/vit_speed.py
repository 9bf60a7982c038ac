"""Side-by-side training throughput of residual / plain / PNNH ViTs, alternating in one process.

Usage: OMP_NUM_THREADS=1 python docs/results/vit_speed.py [--depth 12] [--rounds 5] [--steps 3]
Each round times `steps` AdamW training steps (forward, backward, step) of every model in turn
(A B C A B C ...) on one fixed batch of 128 28x28 images; prints the median images/s per model
and its ratio to the residual ViT. Alternation makes the ratios fair on a shared machine.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pnnh

p = argparse.ArgumentParser()
p.add_argument("--depth", type=int, default=12)
p.add_argument("--size", default="mini")
p.add_argument("--patch-size", type=int, default=7)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--steps", type=int, default=3)
args = p.parse_args()
torch.manual_seed(0)
names = [f"{f}_{args.size}_d{args.depth}" for f in ("vit", "plain_vit", "pnnh_vit")]
models = {n: pnnh.create_model(n, patch_size=args.patch_size) for n in names}
opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))


def run(n: str, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(models[n](x), y)
        opts[n].zero_grad(set_to_none=True)
        loss.backward()
        opts[n].step()
    return args.batch_size * steps / (time.perf_counter() - t)


for n in names:  # warm-up
    run(n, 1)
rates = {n: [] for n in names}
for _ in range(args.rounds):
    for n in names:
        rates[n].append(run(n, args.steps))
base = statistics.median(rates[names[0]])
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, "
      f"patch {args.patch_size}, {args.rounds} rounds x {args.steps} steps")
for n in names:
    params = sum(q.numel() for q in models[n].parameters())
    med = statistics.median(rates[n])
    print(f"{n:<22} {params:>10,} params  {med:7.1f} img/s  x{med / base:.2f}  (rounds: {', '.join(f'{r:.0f}' for r in rates[n])})")
