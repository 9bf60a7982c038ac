"""How many learner units of a fresh PNNH net are active, layer by layer, for several ``learner_bias``.

The dirac learner carries the previous layer's features through ``relu(BN(x) + b)``; at ``b = 0``
the ReLU keeps only the above-mean part of each channel, so the carried features thin out with
depth. This prints the active fraction of the learner channels at a few depths and the gradient
norm of the first and last layer's weight (a random batch of Fashion-MNIST training images, batch
statistics, as the first training step sees them)::

    python scripts/learner_density.py --model pnnh56 --biases -0.5,0,0.5,1

``--path-param init`` (the default here) keeps the internal path in the initial weights only (the net
of the learner-bias ablation, docs/results/pnnh_log.md); with ``dirac`` (the model default) the
gradients are those of ``V``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import pnnh
from pnnh.analysis.diagnose import load_images
from pnnh.analysis.probes import learner_activity
from pnnh.models.pnnh_cnn import PNNHLayer


def learner_density(model_name: str, bias: float, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                    path_param: str = "init"):
    """(active fraction of learner units per PNNH layer, first-layer and last-layer weight-gradient norms)."""
    torch.manual_seed(seed)
    model = pnnh.create_model(model_name, num_classes=10, in_chans=images.shape[1], learner_bias=bias,
                              path_param=path_param).train()
    layers = [m for m in model.modules() if isinstance(m, PNNHLayer)]
    density, logits = learner_activity(model, images)
    F.cross_entropy(logits, labels).backward()
    return density, layers[0].weight.grad.norm().item(), layers[-1].weight.grad.norm().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pnnh56")
    ap.add_argument("--biases", default="-0.5,0,0.5,1", help="comma-separated learner_bias values")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path-param", default="init", choices=["init", "dirac"])
    args = ap.parse_args()
    x, y, _ = load_images("fashion-mnist", args.images, split="train", seed=args.seed)
    for b in (float(s) for s in args.biases.split(",")):
        density, g_first, g_last = learner_density(args.model, b, x, y, args.seed, args.path_param)
        picks = sorted({0, 4, 9, 19, len(density) // 2, len(density) - 1})
        cols = ", ".join(f"layer {i + 1}: {100 * density[i]:.1f} %" for i in picks)
        print(f"learner_bias {b:+.2f}  active learner units  {cols}  |  weight-grad norm first {g_first:.3g}, last {g_last:.3g}")


if __name__ == "__main__":
    main()
