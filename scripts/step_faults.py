"""Minor page faults and time per CPU training step, model by model, with or without the malloc tuning.

A training step frees its activations in the backward pass; untuned, glibc hands that memory back
to the kernel and the next step faults it in again page by page (docs/benchmarks.md, "PNNH vs ResNet")::

    python scripts/step_faults.py --models plain56,pnnh56,resnet56
    PNNH_MALLOC_TUNING=0 python scripts/step_faults.py --models plain56,pnnh56,resnet56

Batch 128 of random 1x28x28 images, channels_last, SGD; the models run one after another in one
process (3 warm-up steps, then ``--steps`` counted), so compare the fault counts, and time ratios
only with ``pnnh bench``, which alternates the models.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

import pnnh
from pnnh.train.malloc import tune_glibc_malloc


def sgd_step(model: torch.nn.Module, batch_size: int = 128):
    """A function making one SGD training step of ``model`` (channels_last, training mode) on a fixed
    random batch of 1x28x28 images; the scripts here time it."""
    m = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step():
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_faults(name: str, steps: int = 4, batch_size: int = 128) -> tuple[float, float]:
    """(minor faults per step, ms per step) of ``steps`` training steps of ``name``."""
    step = sgd_step(pnnh.create_model(name), batch_size)
    for _ in range(3):
        step()
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return faults / steps, (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="plain56,pnnh56,resnet56")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"malloc tuned: {tune_glibc_malloc()}")
    for name in args.models.split(","):
        faults, ms = step_faults(name, args.steps)
        print(f"{name:12s} {faults:9.0f} minor faults/step {ms:8.1f} ms/step")


if __name__ == "__main__":
    main()
