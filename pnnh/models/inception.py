"""Inception-ResNet and its Inception twin, at CIFAR / Fashion-MNIST size.

Szegedy, Ioffe, Vanhoucke, Alemi, *Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning* (AAAI 2017, arXiv:1602.07261). An Inception-ResNet block runs parallel
branches of convolutions on the trunk ``x``, concatenates them, projects the result back to the
trunk width with a 1x1 convolution that has no activation (the *linear* projection), scales it and
adds it to the trunk:

    y = relu(x + s · proj(cat(b_1(x), ..., b_k(x))))      residual (``inception_resnet_*``)
    y = relu(proj(cat(b_1(x), ..., b_k(x))))              Inception twin (``inception_*``)

The twin has the same layers and parameters; its projection output replaces the trunk. The paper
scales the residual by ``s`` in 0.1-0.3 to keep very wide residual Inception nets from dying in
training; the default here is 0.2.

Layout (ours, scaled from the paper's 35/17/8 px grids to 28/14/7 px): a 3x3 stem, then three
stages of Inception blocks separated by reduction blocks that halve the grid and double the width:

- stage A (block A): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 (the double-3x3 branch)
- stage B (block B): 1x1 | 1x1 -> 1x5 -> 5x1 (the factorised 7x7 of the paper, 5 on a 14 px grid)
- stage C (block C): 1x1 | 1x1 -> 1x3 -> 3x1
- reduction: 3x3 max-pool -> 1x1 | 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2, concatenated

Every convolution but the projection is conv-BN-ReLU; the projection is a 1x1 conv with a bias and
no BN, as in the paper (batch norm "on top of the traditional layers, but not on top of the
summations"). The paper's reduction blocks carry the input through a bare max-pool branch; here the
pool branch ends in a 1x1 conv (GoogLeNet's "pool projection"), because a bare pooled copy of the
input concatenated beside convolved parts is itself a skip path (DenseNet-like, flagged by
:func:`pnnh.analysis.structure.find_residual_connections`), and the twin is meant to have none.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._registry import register_builder
from .layers import PooledClassifierHead, init_weights

__all__ = ["InceptionNet", "InceptionBlock", "InceptionBlockA", "InceptionBlockB", "InceptionBlockC", "Reduction",
           "conv_bn_relu"]


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int | tuple[int, int] = 1, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, "same" padding for odd kernels) -> BN -> ReLU."""
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = (k[0] // 2, k[1] // 2)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, stride, pad, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class InceptionBlock(nn.Module):
    """Branches, concatenated, then a linear 1x1 projection to the trunk width ``ch``; with a shortcut
    ``relu(x + scale · proj)``, without one (``residual=False``, the Inception twin) ``relu(proj)``.

    Subclasses define :meth:`make_branches`; ``b`` is the base branch width, ``ch // 4``.
    """

    def __init__(self, ch: int, residual: bool = True, scale: float = 0.2):
        super().__init__()
        self.branches = nn.ModuleList(self.make_branches(ch, max(1, ch // 4)))
        cat_ch = sum(branch[-1][0].out_channels for branch in self.branches)
        self.proj = nn.Conv2d(cat_ch, ch, 1, bias=True)  # linear: no BN, no activation
        self.scale = scale if residual else 1.0
        self.shortcut = nn.Identity() if residual else None
        self.act = nn.ReLU(inplace=True)

    @staticmethod
    def make_branches(ch: int, b: int) -> list[nn.Sequential]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.cat([branch(x) for branch in self.branches], 1)
        r = self.proj(r)
        if self.shortcut is not None:
            r = self.shortcut(x) + self.scale * r
        return self.act(r)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}" if self.shortcut is not None else "no shortcut"


class InceptionBlockA(InceptionBlock):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 (widths b, b, 3b/2 -> 2b): Inception-ResNet-A."""

    @staticmethod
    def make_branches(ch: int, b: int) -> list[nn.Sequential]:
        return [nn.Sequential(conv_bn_relu(ch, b)),
                nn.Sequential(conv_bn_relu(ch, b), conv_bn_relu(b, b, 3)),
                nn.Sequential(conv_bn_relu(ch, b), conv_bn_relu(b, 3 * b // 2, 3), conv_bn_relu(3 * b // 2, 2 * b, 3))]


class InceptionBlockB(InceptionBlock):
    """1x1 | 1x1 -> 1x5 -> 5x1 (widths b, 5b/4, 3b/2): Inception-ResNet-B, a factorised 5x5."""

    k = 5

    @classmethod
    def make_branches(cls, ch: int, b: int) -> list[nn.Sequential]:
        mid, out = 5 * b // 4, 3 * b // 2
        return [nn.Sequential(conv_bn_relu(ch, b)),
                nn.Sequential(conv_bn_relu(ch, b), conv_bn_relu(b, mid, (1, cls.k)), conv_bn_relu(mid, out, (cls.k, 1)))]


class InceptionBlockC(InceptionBlockB):
    """1x1 | 1x1 -> 1x3 -> 3x1 (widths b, 5b/4, 3b/2): Inception-ResNet-C, a factorised 3x3."""

    k = 3


class Reduction(nn.Module):
    """Halve the grid: 3x3 max-pool -> 1x1 | 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2, concatenated to
    ``out_ch`` channels (out/4 + 3 out/8 + 3 out/8). No shortcut, in either net."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        pool, conv = out_ch // 4, 3 * out_ch // 8
        mid = max(1, in_ch // 2)
        self.branches = nn.ModuleList([
            nn.Sequential(nn.MaxPool2d(3, 2, 1), conv_bn_relu(in_ch, pool)),
            nn.Sequential(conv_bn_relu(in_ch, conv, 3, 2)),
            nn.Sequential(conv_bn_relu(in_ch, mid), conv_bn_relu(mid, mid, 3),
                          conv_bn_relu(mid, out_ch - pool - conv, 3, 2)),
        ])
        self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class InceptionNet(PooledClassifierHead, nn.Module):
    """Stem, three stages of Inception blocks (A, B, C) with a reduction between stages, pooled head.

    Args:
        blocks: Inception blocks per stage, e.g. ``(2, 4, 2)``.
        residual: ``True`` for Inception-ResNet, ``False`` for the Inception twin (same parameters).
        scale: residual scale ``s`` of every block [0.2]; Inception-ResNet only.
        width: multiplier on the stage widths 64/128/256.
        img_size: default input size recorded in ``default_cfg``.
        drop_rate: dropout before the classifier (the paper keeps 0.8 of the units on ImageNet).
        init: conv initialiser (:func:`pnnh.models.layers.init_weights`).
    """

    def __init__(self, blocks=(2, 4, 2), *, residual: bool = True, scale: float | None = None, num_classes: int = 10,
                 in_chans: int = 1, width: float = 1.0, img_size: int = 28, drop_rate: float = 0.0,
                 init: str = "he"):
        super().__init__()
        if len(blocks) != 3 or min(blocks) < 1:
            raise ConfigError(f"blocks takes three positive counts (stages A, B, C), got {blocks}")
        if width <= 0:
            raise ConfigError(f"width must be positive, got {width}")
        if scale is not None and not residual:
            raise ConfigError("scale acts on a residual branch; the Inception twin has none")
        scale = 0.2 if scale is None else scale
        widths = [max(4, int(round(w * width))) for w in (64, 128, 256)]
        self.num_classes, self.in_chans, self.residual = num_classes, in_chans, residual
        self.has_shortcut = residual
        self.stem = conv_bn_relu(in_chans, widths[0], 3)
        stages = []
        for i, (n, kind) in enumerate(zip(blocks, (InceptionBlockA, InceptionBlockB, InceptionBlockC))):
            stage = [Reduction(widths[i - 1], widths[i])] if i else []
            stage += [kind(widths[i], residual, scale) for _ in range(n)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, init, skip=(self.stem,))
        self.default_cfg = dict(input_size=(in_chans, img_size, img_size), num_classes=num_classes, layout="cifar")

    def blocks(self) -> list[nn.Module]:
        """Inception and reduction blocks in forward order."""
        return [b for stage in self.stages for b in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def inception_depth(blocks) -> int:
    """Weighted layers on the longest path: stem, 4 per Inception block (3 convs + projection) for
    block A and B/C alike, 3 per reduction, the classifier."""
    return 1 + 4 * sum(blocks) + 3 * (len(blocks) - 1) + 1


def _register() -> None:
    sizes = {"s": (2, 4, 2), "m": (5, 10, 5)}  # m: the paper's 5/10/5 blocks per stage
    for size, blocks in sizes.items():
        d = inception_depth(blocks)

        def build(residual, blocks=blocks):
            return lambda **k: InceptionNet(blocks, residual=residual, **k)

        register_builder(globals(), f"inception_resnet_{size}", build(True),
                         f"Inception-ResNet, {'/'.join(map(str, blocks))} blocks, residual scale 0.2 "
                         "(Szegedy et al. 2017); option scale=.",
                         family="inception_resnet", depth=d, layout="cifar", fixed=("residual", "blocks"))
        register_builder(globals(), f"inception_{size}", build(False),
                         f"Inception twin of inception_resnet_{size}: the same blocks with no shortcut.",
                         family="inception", depth=d, layout="cifar", fixed=("residual", "blocks"))


_register()
