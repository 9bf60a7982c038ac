"""Residual CNNs and their plain (shortcut-free) twins, CIFAR and ImageNet layouts.

One configurable class, :class:`ResNet`, builds every member of the family. A block is a
small module; ``shortcut=None`` turns a residual block into its *plain twin* with exactly the
same convolutions, norms and activations, so plain vs residual comparisons differ in the
shortcut and nothing else.

Layouts:
- ``cifar`` (He et al. 2016, Sec. 4.2): a 3x3 stem, three stages of widths 16/32/64 (times
  ``width``), basic blocks for depth 6n+2 or bottleneck blocks for depth 9n+2.
- ``imagenet``: the 4-stage 64/128/256/512 layout of ResNet-18/34/50/101/152 with a 7x7
  stride-2 stem and max-pool, or a 3x3 stride-1 stem (``stem="small"``) for 28-64 px inputs.

Every model has the uniform interface ``forward_features`` / ``forward_head`` /
``reset_classifier`` and a ``default_cfg`` with its default input size.
"""

from __future__ import annotations

from typing import Type

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._registry import register_builder, register_cifar_depths
from .layers import (IMAGENET_LAYERS, PadShortcut, PooledClassifierHead, ProjectionShortcut, cifar_layers, cnn_layout,
                     conv1x1, conv3x3, init_weights)

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBottleneck", "make_shortcut"]


def make_shortcut(kind: str | None, in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """The shortcut of a residual block: ``None`` (plain twin), ``"A"`` or ``"B"``.

    Where in and out shapes agree the shortcut is the identity for both "A" and "B".
    """
    if kind is None:
        return None
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_ch, out_ch, stride)
    if kind == "B":
        return ProjectionShortcut(in_ch, out_ch, stride)
    raise ConfigError(f"unknown shortcut {kind!r}; use 'A', 'B' or None")


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``; without shortcut, the plain twin."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str | None = "A"):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1, self.bn1 = conv3x3(in_ch, ch, stride), nn.BatchNorm2d(ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(ch, out_ch), nn.BatchNorm2d(out_ch)
        self.shortcut = make_shortcut(shortcut, in_ch, out_ch, stride)
        self.act2 = nn.ReLU(inplace=True)

    def residual_branch_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), post-activation, optional shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str | None = "B"):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1, self.bn1, self.act1 = conv1x1(in_ch, ch), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.act2 = conv3x3(ch, ch, stride), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)
        self.conv3, self.bn3 = conv1x1(ch, out_ch), nn.BatchNorm2d(out_ch)
        self.shortcut = make_shortcut(shortcut, in_ch, out_ch, stride)
        self.act3 = nn.ReLU(inplace=True)

    def residual_branch_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act3(out)


class PreActBasicBlock(nn.Module):
    """Pre-activation block (He et al. 2016b): ``conv(relu(bn(conv(relu(bn(x)))))) + x``.

    The shortcut carries the un-normalised input; a stride/width change takes its shortcut
    from the pre-activated tensor, as in the reference implementation.
    """

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str | None = "B"):
        super().__init__()
        out_ch = ch * self.expansion
        self.bn1, self.act1, self.conv1 = nn.BatchNorm2d(in_ch), nn.ReLU(inplace=False), conv3x3(in_ch, ch, stride)
        self.bn2, self.act2, self.conv2 = nn.BatchNorm2d(ch), nn.ReLU(inplace=True), conv3x3(ch, out_ch)
        self.shortcut = make_shortcut(shortcut, in_ch, out_ch, stride)
        self.shortcut_from_preact = stride != 1 or in_ch != out_ch

    def residual_branch_norm(self) -> nn.BatchNorm2d | None:
        return None  # the branch ends in a conv: zero-init has nothing to act on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        if self.shortcut is not None:
            out = out + self.shortcut(pre if self.shortcut_from_preact else x)
        return out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1(x4), plus shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str | None = "B"):
        super().__init__()
        out_ch = ch * self.expansion
        self.bn1, self.act1, self.conv1 = nn.BatchNorm2d(in_ch), nn.ReLU(inplace=False), conv1x1(in_ch, ch)
        self.bn2, self.act2, self.conv2 = nn.BatchNorm2d(ch), nn.ReLU(inplace=True), conv3x3(ch, ch, stride)
        self.bn3, self.act3, self.conv3 = nn.BatchNorm2d(ch), nn.ReLU(inplace=True), conv1x1(ch, out_ch)
        self.shortcut = make_shortcut(shortcut, in_ch, out_ch, stride)
        self.shortcut_from_preact = stride != 1 or in_ch != out_ch

    def residual_branch_norm(self) -> nn.BatchNorm2d | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.act2(self.bn2(out)))
        out = self.conv3(self.act3(self.bn3(out)))
        if self.shortcut is not None:
            out = out + self.shortcut(pre if self.shortcut_from_preact else x)
        return out


BLOCKS: dict[str, Type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}


class ResNet(PooledClassifierHead, nn.Module):
    """Residual or plain CNN.

    Args:
        layers: blocks per stage, e.g. ``(9, 9, 9)`` for ResNet-56.
        block: ``"basic"``, ``"bottleneck"``, ``"preact_basic"``, ``"preact_bottleneck"`` or a
            block class taking ``(in_ch, ch, stride, shortcut, **block_kwargs)``.
        shortcut: ``"A"`` (pad, parameter-free), ``"B"`` (projection where the shape changes) or
            ``None`` for the plain twin.
        layout: ``"cifar"`` or ``"imagenet"``.
        width: multiplier on the stage widths (a float; ``k`` of a wide ResNet).
        stem: ``"auto"``, ``"cifar"`` (3x3 stride 1), ``"imagenet"`` (7x7 s2 + max-pool) or
            ``"small"`` (3x3 stride 1, for 28-64 px inputs in the ImageNet layout).
        init: ``"he"`` (default), ``"dirac"`` (identity on same-shape 3x3 convs),
            ``"dirac_param"`` (that identity kept in the parametrisation of every 3x3 conv but the
            stem's, DiracNets: :class:`pnnh.models.layers.DiracWeight`) or ``"delta_orthogonal"``;
            see :func:`pnnh.models.layers.init_weights`.
        zero_init_residual: start every residual branch's last norm at 0 (Goyal et al.), so each
            block begins as its shortcut. Ignored by plain twins, where it would cut the signal.
        img_size: default input size recorded in ``default_cfg`` (and used by ``stem="auto"``).
        stem_width: channels out of the stem (default: the first stage's width); wide ResNets
            keep a 16-channel stem whatever their width ``k``.
        block_kwargs: passed to every block (catalogue options such as squeeze-excitation).
    """

    def __init__(self, layers, block="basic", *, shortcut: str | None = "A", layout: str = "cifar",
                 num_classes: int = 10, in_chans: int = 1, width: float = 1.0, stem: str = "auto",
                 init: str = "he", zero_init_residual: bool = False, img_size: int | None = None,
                 drop_rate: float = 0.0, block_kwargs: dict | None = None, stem_width: int | None = None):
        super().__init__()
        block_cls = BLOCKS[block] if isinstance(block, str) else block
        widths, img_size, stem = cnn_layout(layout, layers, width, img_size, stem)
        self.num_classes, self.in_chans, self.layout, self.stem_kind = num_classes, in_chans, layout, stem
        self.preact = block_cls in (PreActBasicBlock, PreActBottleneck) or getattr(block_cls, "preact", False)
        self.has_shortcut = shortcut is not None
        self.drop_rate = drop_rate

        stem_ch = stem_width or widths[0]
        if stem in ("cifar", "small"):
            conv = nn.Conv2d(in_chans, stem_ch, 3, 1, 1, bias=False)
            stem_layers = [conv] if self.preact else [conv, nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True)]
        elif stem == "imagenet":
            conv = nn.Conv2d(in_chans, stem_ch, 7, 2, 3, bias=False)
            stem_layers = [conv, nn.BatchNorm2d(stem_ch), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        else:
            raise ConfigError(f"unknown stem {stem!r}; use auto, cifar, small or imagenet")
        self.stem = nn.Sequential(*stem_layers)

        stages, in_ch = [], stem_ch
        for i, (n, ch) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(in_ch, ch, stride, shortcut, **(block_kwargs or {})))
                in_ch = ch * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        # pre-activation nets end with the BN-ReLU that their last block does not apply
        self.final_norm = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)) if self.preact else nn.Identity()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_ch, num_classes)

        init_weights(self, init, skip=(self.stem,))
        if zero_init_residual and self.has_shortcut:
            for blk in self.blocks():
                norm = getattr(blk, "residual_branch_norm", lambda: None)()
                if norm is not None:
                    nn.init.zeros_(norm.weight)
        self.default_cfg = dict(input_size=(in_chans, img_size, img_size), num_classes=num_classes, layout=layout)

    # -- uniform interface ---------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """All blocks in forward order (for diagnostics and lesion studies)."""
        return [b for stage in self.stages for b in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.stages(self.stem(x)))



# -------------------------------------------------------------------------------------------------
# Registered entry points
# -------------------------------------------------------------------------------------------------

def cifar_resnet(depth: int, *, plain: bool = False, preact: bool = False, bottleneck: bool = False, **kwargs) -> ResNet:
    """Build a CIFAR-layout net of the given depth (6n+2 basic / 9n+2 bottleneck)."""
    block = ("preact_" if preact else "") + ("bottleneck" if bottleneck else "basic")
    default_sc = "B" if (bottleneck or preact) else "A"  # He et al.'s choices for each variant
    kwargs.setdefault("shortcut", None if plain else default_sc)
    return ResNet(cifar_layers(depth, bottleneck), block, layout="cifar", **kwargs)


def imagenet_resnet(depth: int, *, plain: bool = False, **kwargs) -> ResNet:
    """Build an ImageNet-layout ResNet-18/34/50/101/152 (or its plain twin)."""
    block, layers = IMAGENET_LAYERS[depth]
    kwargs.setdefault("shortcut", None if plain else "B")
    return ResNet(layers, block, layout="imagenet", **kwargs)


def _keeps_shortcut(builder):
    def build(**kwargs):
        if "shortcut" in kwargs and kwargs["shortcut"] is None:
            raise ConfigError("shortcut=None removes the residual connection: use the plain twin (plainN) instead")
        return builder(**kwargs)

    return build


def _add(name: str, family: str, depth: int, layout: str, builder, doc: str) -> None:
    """Register one net of the family. The name says residual or plain: a plain twin takes no shortcut
    option, a residual net no ``shortcut=None``."""
    fixed = ("plain", "preact", "bottleneck") + (("shortcut",) if family == "plain" else ())
    register_builder(globals(), name, _keeps_shortcut(builder) if family != "plain" else builder, doc,
                     family=family, depth=depth, layout=layout, fixed=fixed)


def _register_family() -> None:
    for d in (8, 20, 32, 44, 56, 110, 1202):
        _add(f"resnet{d}", "resnet", d, "cifar", lambda d=d, **k: cifar_resnet(d, **k),
             f"ResNet-{d}, CIFAR layout, basic blocks, option-A shortcuts (He et al. 2016).")
        _add(f"plain{d}", "plain", d, "cifar", lambda d=d, **k: cifar_resnet(d, plain=True, **k),
             f"Plain-{d}: ResNet-{d}'s layers with no shortcut.")
        _add(f"preact_resnet{d}", "preact_resnet", d, "cifar", lambda d=d, **k: cifar_resnet(d, preact=True, **k),
             f"Pre-activation ResNet-{d}, CIFAR layout (He et al. 2016b).")
    for d in (164, 1001):
        _add(f"resnet{d}", "resnet", d, "cifar", lambda d=d, **k: cifar_resnet(d, bottleneck=True, **k),
             f"ResNet-{d}, CIFAR layout, bottleneck blocks.")
        _add(f"plain{d}", "plain", d, "cifar", lambda d=d, **k: cifar_resnet(d, bottleneck=True, plain=True, **k),
             f"Plain-{d}: bottleneck ResNet-{d}'s layers with no shortcut.")
        _add(f"preact_resnet{d}", "preact_resnet", d, "cifar",
             lambda d=d, **k: cifar_resnet(d, bottleneck=True, preact=True, **k),
             f"Pre-activation bottleneck ResNet-{d} (He et al. 2016b).")
    for d in IMAGENET_LAYERS:
        _add(f"resnet{d}", "resnet", d, "imagenet", lambda d=d, **k: imagenet_resnet(d, **k),
             f"ResNet-{d}, ImageNet layout.")
        _add(f"plain{d}", "plain", d, "imagenet", lambda d=d, **k: imagenet_resnet(d, plain=True, **k),
             f"Plain-{d}: ResNet-{d}'s layers (ImageNet layout) with no shortcut.")


_register_family()


def _add_cifar_depth(name: str, family: str, d: int, bottleneck: bool) -> None:
    opts = dict(plain=family == "plain", preact=family == "preact_resnet", bottleneck=bottleneck)
    _add(name, family, d, "cifar", lambda **k: cifar_resnet(d, **opts, **k),
        f"{family} of depth {d}, CIFAR layout, {'bottleneck' if bottleneck else 'basic'} blocks.")


register_cifar_depths(("resnet", "plain", "preact_resnet"), _add_cifar_depth)
