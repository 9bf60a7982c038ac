"""Forward+backward time of one PNNH layer per coder, and of the convolutions a cheap coder calls.

One stage-1 layer of a CIFAR-layout net (16 channels, 28x28, batch 128), in NCHW and channels_last,
in alternating rounds (the minimum over rounds is printed, in ms):

    OMP_NUM_THREADS=1 python benchmarks/coder_layer_cost.py --threads 1 --rounds 5

It separates what the cheap coders (``pnnh/models/coders.py``) save in FLOPs from what they cost in
time on a CPU: a second convolution call, a grouped convolution, and the gradient of the input
summed from two branches. Results: docs/results/pnnh_coders.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnnh.models.coders import CheapCoderConv2d
from pnnh.models.pnnh_cnn import CoderSpec, PNNHConv2d


class ConvBNReLU(nn.Module):
    """A plain (ResNet-twin) layer: conv -> BN -> ReLU."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def layers(ch: int) -> dict[str, nn.Module]:
    out = {"conv-BN-ReLU": ConvBNReLU(ch), "mirror r=0.25": PNNHConv2d(ch, ch, spec=CoderSpec())}
    for coder in ("pointwise", "depthwise", "code_conv", "fixed"):
        out[f"{coder} r=0.25"] = CheapCoderConv2d(ch, ch, spec=CoderSpec(coder))
    out["mirror r=0.5"] = PNNHConv2d(ch, ch, spec=CoderSpec(ratio=0.5))
    out["depthwise r=0.5"] = CheapCoderConv2d(ch, ch, spec=CoderSpec("depthwise", ratio=0.5))
    return out


def convs(ch: int) -> dict[str, tuple]:
    """(weight shape, groups, padding) of the convolutions the layers above call."""
    return {f"conv {ch}->{ch} 3x3": ((ch, ch, 3, 3), 1, 1), f"conv {ch}->{ch // 2} 3x3": ((ch // 2, ch, 3, 3), 1, 1),
            f"conv {ch}->2 1x1": ((2, ch, 1, 1), 1, 0), "grouped 8->4 3x3 (4 pairs)": ((4, 2, 3, 3), 4, 1)}


def step_ms(fn, x: torch.Tensor, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        y = fn(x)
        y.backward(torch.ones_like(y))
    return (time.perf_counter() - t) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ch = 16
    cases: dict[str, tuple] = {}
    for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        for name, layer in layers(ch).items():
            m = layer.to(memory_format=fmt).train()
            cases[f"layer {name}, {fmt_name}"] = (m, ch, fmt)
        for name, (shape, groups, pad) in convs(ch).items():
            w = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
            cases[f"{name}, {fmt_name}"] = (lambda x, w=w, g=groups, p=pad: F.conv2d(x, w, None, 1, p, 1, g),
                                            shape[1] * groups, fmt)
    best = {k: float("inf") for k in cases}
    for _ in range(a.rounds):
        for k, (fn, c_in, fmt) in cases.items():
            x = torch.randn(a.batch, c_in, 28, 28).contiguous(memory_format=fmt).requires_grad_()
            best[k] = min(best[k], step_ms(fn, x, a.reps))
    for k, v in best.items():
        print(f"{k:<44} {v:8.1f} ms")


if __name__ == "__main__":
    main()
