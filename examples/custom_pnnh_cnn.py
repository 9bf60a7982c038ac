"""Build your own PNNH CNN from ``pnnh.layers`` and train it twice: with pnnh's engine, then with a bare loop.

    python examples/custom_pnnh_cnn.py --steps 200              # Fashion-MNIST, found as pnnh finds it
    python examples/custom_pnnh_cnn.py --steps 20 --data-dir DIR --train-subset 1024 --out runs/example
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.data import InMemoryLoader, load_dataset
from pnnh.layers import PNNHConv2d, pnnh_stage
from pnnh.train import TrainConfig, train


class SmallPNNHNet(nn.Module):
    """A stem, three stages of ``depth`` PNNH layers (16/32/64 channels), pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, depth: int = 3):
        super().__init__()
        self.stem = PNNHConv2d(in_chans, 16, in_code=0)  # the image carries no code
        self.stages = nn.Sequential(pnnh_stage(16, 16, depth),  # each layer reads the code the last one wrote
                                    pnnh_stage(16, 32, depth, stride=2),
                                    pnnh_stage(32, 64, depth, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        x = self.pool(x).flatten(1)
        return self.fc(x)


@pnnh.register_model(family="example", depth=11)
def example_pnnh11(img_size: int | None = None, **kwargs) -> SmallPNNHNet:
    """The example's PNNH CNN, 11 weighted layers, registered so every pnnh tool can build it by name.

    ``img_size`` (which the engine passes) is not needed: global pooling takes any input size."""
    return SmallPNNHNet(**kwargs)


def bare_loop(args) -> tuple[float, list[float]]:
    """Plain PyTorch: SGD on pnnh's in-memory loader; returns the test accuracy and the losses."""
    train_ds = load_dataset("fashion-mnist", "train", args.data_dir)
    test_ds = load_dataset("fashion-mnist", "test", args.data_dir)
    if args.train_subset:
        train_ds = dataclasses.replace(train_ds, images=train_ds.images[:args.train_subset],
                                       labels=train_ds.labels[:args.train_subset])
    torch.manual_seed(0)
    model = SmallPNNHNet().to(memory_format=torch.channels_last).train()  # CPU training kernels: switched in here
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loader = InMemoryLoader(train_ds, 128, train=True, channels_last=True)
    losses: list[float] = []
    while len(losses) < args.steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) % 20 == 0 or len(losses) == args.steps:
                print(f"bare loop: step {len(losses)} loss {losses[-1]:.3f}")
            if len(losses) == args.steps:
                break
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in InMemoryLoader(test_ds, 1000, train=False))
    return correct / len(test_ds.labels), losses


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--data-dir", help="Fashion-MNIST IDX files [pnnh's search path]")
    ap.add_argument("--train-subset", type=int, help="use the first N training images")
    ap.add_argument("--out", default="runs/example_pnnh11", help="the engine's run directory")
    args = ap.parse_args(argv)
    summary = train(TrainConfig(model="example_pnnh11", data="fashion-mnist", data_dir=args.data_dir,
                                train_subset=args.train_subset, steps=args.steps, lr=0.05, out=args.out,
                                progress=False))
    print(f"engine: test accuracy {summary['test_acc']:.4f} ({summary['params']:,} parameters)")
    acc, losses = bare_loop(args)
    print(f"bare loop: test accuracy {acc:.4f}")
    return {"engine": summary, "bare_loop_acc": acc, "bare_loop_losses": losses}


if __name__ == "__main__":
    main()
