"""``pnnh.convert``: the plain or PNNH twin of a residual CNN, found by structure.

A residual block is recognised by what it holds, not by its class:

- pnnh's own blocks (:mod:`pnnh.models.resnet`: basic, bottleneck and their pre-activation forms);
- any module shaped like torchvision's or timm's ``BasicBlock`` / ``Bottleneck``: ``conv1``/``bn1``,
  ``conv2``/``bn2`` (and ``conv3``/``bn3``) as ``nn.Conv2d``/``nn.BatchNorm2d``, and a ``downsample``
  attribute (``None`` or the projection shortcut).

Each block becomes its twin with the same convolutions (count, kernel sizes, strides, widths):

- ``to="plain"``: the block's own convs, norms and activations in forward order, without the
  shortcut (weights kept; a pnnh block keeps its class with ``shortcut=None``);
- ``to="pnnh"``: one :class:`~pnnh.models.pnnh_cnn.PNNHConv2d` per conv (fresh weights), chained
  across consecutive blocks so each block's coder carries the code of the one before.

Everything else (stem, pooling, head) is kept as it is. A module that looks residual (it has a
``downsample`` or ``shortcut``) but is none of the above raises :class:`~pnnh.errors.ConfigError`
naming it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch.nn as nn

from ..errors import ConfigError
from .pnnh_cnn import CoderSpec, PNNHConv2d, PNNHSequential
from .resnet import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck

__all__ = ["convert", "PlainBlock"]

_PNNH_BLOCKS = (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)
_CODER_OPTIONS = {"coder_ratio": "ratio", "coder_init": "init", "coder_mix": "mix", "learner_init": "learner_init",
                  "learner_mix": "learner_mix", "learner_bias": "learner_bias", "path_param": "path_param"}


class PlainBlock(nn.Sequential):
    """The plain twin of a torchvision/timm-shaped residual block: ``conv1, bn1, act1, conv2, bn2, act2
    [, conv3, bn3, act3]`` in forward order (the block's own modules, so its weights load by name)."""


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _shaped_block_layers(block: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module | None]] | None:
    """``[(conv, bn, act), ...]`` of a torchvision/timm-shaped block, ``None`` if it is not one."""
    if not hasattr(block, "downsample"):
        return None
    layers = []
    for i in (1, 2, 3):
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if conv is None and i == 3:
            break
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            return None
        act = getattr(block, f"act{i}", None) or getattr(block, "relu", None)  # timm: act1..3; torchvision: relu
        layers.append((conv, bn, act))
    return layers


def _unsupported(name: str, block: nn.Module, why: str) -> ConfigError:
    return ConfigError(f"convert: block {name!r} ({type(block).__name__}) is not supported: {why}")


def _check_shaped(name: str, block: nn.Module, layers, to: str) -> None:
    for attr in ("se", "aa", "drop_block"):
        if not _is_identity(getattr(block, attr, None)):
            raise _unsupported(name, block, f"it has {attr}={type(getattr(block, attr)).__name__}")
    for conv, _, act in layers:
        if to == "pnnh" and not isinstance(act, nn.ReLU):
            raise _unsupported(name, block, f"PNNH layers mirror a ReLU, the block uses {type(act).__name__}")
        if to == "pnnh" and (conv.groups != 1 or conv.dilation != (1, 1)):
            raise _unsupported(name, block, f"grouped or dilated convolution (groups={conv.groups}, "
                                            f"dilation={conv.dilation}) has no PNNH layer")
        k = conv.kernel_size[0]
        if to == "pnnh" and (conv.kernel_size != (k, k) or conv.padding != (k // 2, k // 2)):
            raise _unsupported(name, block, f"PNNH layers take square kernels padded k//2, got {conv}")


def _pnnh_twin(convs: list[nn.Conv2d], in_code: int, spec: CoderSpec) -> PNNHSequential:
    layers = []
    for conv in convs:
        layers.append(PNNHConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                                 in_code=in_code, spec=spec))
        in_code = layers[-1].n_code
    return PNNHSequential(*layers)


def _plain_twin(block: nn.Module, layers) -> nn.Module:
    if isinstance(block, _PNNH_BLOCKS):
        block.shortcut = None
        return block
    parts = []
    for i, (conv, bn, act) in enumerate(layers, 1):
        act = copy.deepcopy(act) if isinstance(act, nn.Module) else nn.ReLU(inplace=True)
        parts += [(f"conv{i}", conv), (f"bn{i}", bn), (f"act{i}", act)]
    return PlainBlock(OrderedDict(parts))


def convert(model: nn.Module, to: str = "pnnh", **coder_options) -> nn.Module:
    """The plain (``to="plain"``) or PNNH (``to="pnnh"``) twin of the residual CNN ``model``.

    ``model`` is not modified; the twin is a copy with every residual block replaced (module
    docstring). ``coder_options`` (PNNH only): ``coder_ratio``, ``coder_init``, ``coder_mix``,
    ``learner_init``, ``learner_mix``, ``learner_bias``, ``path_param`` as for ``pnnh*`` models.
    Blocks are assumed to feed one another in the order they are registered, as in a ResNet.

    Raises:
        ConfigError: ``to`` unknown, an unknown option, a residual-looking block that is not
            supported (named), or no residual block at all.
    """
    if to not in ("pnnh", "plain"):
        raise ConfigError(f"convert: to must be 'pnnh' or 'plain', got {to!r}")
    unknown = sorted(set(coder_options) - set(_CODER_OPTIONS))
    if unknown or (coder_options and to == "plain"):
        allowed = ", ".join(_CODER_OPTIONS) if to == "pnnh" else "none for to='plain'"
        raise ConfigError(f"convert: unknown option(s) {', '.join(unknown or coder_options)}; options: {allowed}")
    spec = CoderSpec("mirror", **{_CODER_OPTIONS[k]: v for k, v in coder_options.items()})
    twin = copy.deepcopy(model)
    code, count = 0, 0

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal code, count
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if isinstance(child, _PNNH_BLOCKS):
                layers = [(child.conv1, None, None), (child.conv2, None, None)]
                layers += [(child.conv3, None, None)] if hasattr(child, "conv3") else []
            else:
                layers = _shaped_block_layers(child)
                if layers is None:
                    if hasattr(child, "downsample") or hasattr(child, "shortcut"):
                        raise _unsupported(name, child, "it has a shortcut but not the layers convert knows "
                                                        "(conv1/bn1/conv2/bn2[/conv3/bn3] with downsample, or a "
                                                        "pnnh ResNet block)")
                    visit(child, name + ".")
                    continue
                _check_shaped(name, child, layers, to)
            if to == "pnnh":
                new = _pnnh_twin([conv for conv, _, _ in layers], code, spec)
                code = new[-1].n_code
            else:
                new = _plain_twin(child, layers)
            setattr(parent, child_name, new)
            count += 1

    visit(twin, "")
    if count == 0:
        raise ConfigError(f"convert: no residual block found in {type(model).__name__}; convert knows pnnh's ResNet "
                          "blocks and modules shaped like torchvision's/timm's BasicBlock and Bottleneck "
                          "(conv1/bn1/conv2/bn2[/conv3/bn3] and downsample)")
    for attr in ("pnnh_name", "pnnh_kwargs"):  # the registered name no longer describes the twin
        twin.__dict__.pop(attr, None)
    if hasattr(twin, "has_shortcut"):
        twin.has_shortcut = False
    return twin
