"""Test accuracy with and without precise BN after a short run (docs/design.md, "Precise BN").

Trains each model once with ``precise_bn=0``, then evaluates the final weights twice on the full
Fashion-MNIST test set (or its first ``--test-images``): with the running BatchNorm statistics training left, and after
re-estimating them on the first N training images (:func:`pnnh.train.engine.precise_bn`).

    python benchmarks/precise_bn.py --models pnnh20,resnet20 --steps 40 --seeds 0 --images 2048 --test-images 2000
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

import pnnh
from pnnh.data import InMemoryLoader, load_dataset
from pnnh.train import TrainConfig, train
from pnnh.train.engine import evaluate, precise_bn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="pnnh20,resnet20")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-images", type=int, default=None, help="Evaluate on the first N test images [all].")
    args = ap.parse_args()
    test = load_dataset("fashion-mnist", "test")
    if args.test_images:
        test = test.subset(args.test_images)
    train_ds = load_dataset("fashion-mnist", "train")
    loader = InMemoryLoader(test, 1000, train=False)
    rows = []
    for name in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as d:
                cfg = TrainConfig(model=name, steps=args.steps, seed=seed, precise_bn=0, threads=args.threads,
                                  progress=False, out=str(Path(d) / "run"))
                train(cfg)
                model = pnnh.load_model(Path(d) / "run" / "model.safetensors").to(memory_format=torch.channels_last)
            before = evaluate(model, loader, torch.device("cpu"))["acc"]
            precise_bn(model, train_ds, cfg.replace(precise_bn=args.images), torch.device("cpu"))
            after = evaluate(model, loader, torch.device("cpu"))["acc"]
            rows.append({"model": name, "seed": seed, "steps": args.steps, "running_stats": before, "precise_bn": after})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
