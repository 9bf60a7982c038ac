"""``pnnh.convert``: the plain or PNNH twin of a residual CNN or Vision Transformer, found by structure.

A residual block is recognised by what it holds, not by its class:

- pnnh's own blocks (:mod:`pnnh.models.resnet`: basic, bottleneck and their pre-activation forms);
- any module shaped like torchvision's or timm's ``BasicBlock`` / ``Bottleneck``: ``conv1``/``bn1``,
  ``conv2``/``bn2`` (and ``conv3``/``bn3``) as ``nn.Conv2d``/``nn.BatchNorm2d``, and a ``downsample``
  attribute (``None`` or the projection shortcut);
- pre-norm Transformer blocks: pnnh's residual ViT ``Block`` and modules shaped like timm's ViT
  ``Block`` (``norm1``, ``attn`` with ``qkv``/``proj`` linears and ``num_heads``, ``ls1``,
  ``norm2``, ``mlp`` with ``fc1``/``fc2``, ``ls2``), which compute
  ``x + ls1(attn(norm1 x))`` then ``x + ls2(mlp(norm2 x))``.

Each CNN block becomes its twin with the same convolutions (count, kernel sizes, strides, widths):

- ``to="plain"``: the block's own convs, norms and activations in forward order, without the
  shortcut (weights kept; a pnnh block keeps its class with ``shortcut=None``);
- ``to="pnnh"``: one :class:`~pnnh.models.pnnh_cnn.PNNHConv2d` per conv (fresh weights), chained
  across consecutive blocks so each block's coder carries the code of the one before.

Each Transformer block becomes, with ``to="plain"``, a :class:`PlainTransformerBlock` of its own
modules (weights kept, the two adds removed) and, with ``to="pnnh"``, a
:class:`~pnnh.models.vit.PNNHParallelBlock` of the same width, heads, MLP width and ``qkv`` bias
(fresh weights; layer scale and the block's second norm have no place in it).

Everything else (stem, pooling, head) is kept as it is. A module that looks residual (it has a
``downsample`` or ``shortcut``, or ``norm1``, ``attn`` and ``mlp``) but is none of the above
raises :class:`~pnnh.errors.ConfigError` naming it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn as nn

from ..errors import ConfigError
from .pnnh_cnn import CoderSpec, PNNHConv2d, PNNHSequential
from .resnet import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from .vit import PNNH_CODERS, DiracBlock, PNNHParallelBlock, SkiplessBlock
from .vit import Block as ViTBlock, PlainBlock as PlainViTBlock

__all__ = ["convert", "PlainBlock", "PlainTransformerBlock"]

_PNNH_BLOCKS = (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck)
_CODER_OPTIONS = {"coder_ratio": "ratio", "coder_init": "init", "coder_mix": "mix", "learner_init": "learner_init",
                  "learner_mix": "learner_mix", "learner_bias": "learner_bias", "path_param": "path_param",
                  "path_beta": "path_beta"}


class PlainBlock(nn.Sequential):
    """The plain twin of a torchvision/timm-shaped residual block: ``conv1, bn1, act1, conv2, bn2, act2
    [, conv3, bn3, act3]`` in forward order (the block's own modules, so its weights load by name)."""


class PlainTransformerBlock(nn.Module):
    """A pre-norm Transformer block without its adds: ``x = ls1(attn(norm1(x)))``, then
    ``ls2(mlp(norm2(x)))`` (the block's own modules, so its weights load by name)."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, ls1: nn.Module, norm2: nn.Module, mlp: nn.Module,
                 ls2: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.norm2, self.mlp, self.ls2 = norm1, attn, ls1, norm2, mlp, ls2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is None and not is_causal:
            x = self.ls1(self.attn(self.norm1(x)))
        else:  # an attention module that takes a mask (timm's)
            x = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return self.ls2(self.mlp(self.norm2(x)))


_PLAIN_VIT_BLOCKS = (PlainViTBlock, DiracBlock, SkiplessBlock, *PNNH_CODERS.values(), PlainTransformerBlock)


def _transformer_parts(block: nn.Module) -> dict[str, nn.Module] | None:
    """The modules of a pnnh or timm-shaped pre-norm residual Transformer block, ``None`` if it is not one."""
    if isinstance(block, _PLAIN_VIT_BLOCKS) or not isinstance(block, ViTBlock) and not hasattr(block, "ls1"):
        return None
    parts = {n: getattr(block, n, None) for n in ("norm1", "attn", "norm2", "mlp")}
    parts["ls1"], parts["ls2"] = getattr(block, "ls1", nn.Identity()), getattr(block, "ls2", nn.Identity())
    attn, mlp = parts["attn"], parts["mlp"]
    linears = (getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(mlp, "fc1", None),
               getattr(mlp, "fc2", None))
    if not all(isinstance(m, nn.Linear) for m in linears) or not isinstance(getattr(attn, "num_heads", None), int):
        return None
    return parts


def _looks_transformer(block: nn.Module) -> bool:
    return all(hasattr(block, n) for n in ("norm1", "attn", "mlp")) and not isinstance(block, _PLAIN_VIT_BLOCKS)


def _pnnh_transformer_twin(name: str, block: nn.Module, parts: dict[str, nn.Module]) -> nn.Module:
    attn, mlp = parts["attn"], parts["mlp"]
    for owner, attr in ((attn, "q_norm"), (attn, "k_norm"), (attn, "norm"), (mlp, "norm")):
        if not _is_identity(getattr(owner, attr, None)):
            raise _unsupported(name, block, f"its {attr} ({type(getattr(owner, attr)).__name__}) has no place in a "
                                            "PNNH Transformer block")
    if not isinstance(getattr(mlp, "act", None), nn.GELU):
        raise _unsupported(name, block, f"the PNNH Transformer block's learner units are GELUs, the block uses "
                                        f"{type(getattr(mlp, 'act', None)).__name__}")
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or attn.proj.in_features != dim:
        raise _unsupported(name, block, "its attention width differs from the token width")
    drop = getattr(attn, "proj_drop", None)
    attn_drop = attn.attn_drop.p if isinstance(attn.attn_drop, nn.Dropout) else float(attn.attn_drop)
    drop_path = getattr(block, "drop_path1", None)
    return PNNHParallelBlock(dim, attn.num_heads, mlp_ratio=mlp.fc1.out_features / dim,
                             qkv_bias=attn.qkv.bias is not None, attn_drop=attn_drop,
                             proj_drop=drop.p if isinstance(drop, nn.Dropout) else 0.0,
                             drop_path=getattr(drop_path, "p", getattr(drop_path, "drop_prob", 0.0)) or 0.0
                             ).to(attn.qkv.weight.device, attn.qkv.weight.dtype)


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
    ``learner_init``, ``learner_mix``, ``learner_bias``, ``path_param``, ``path_beta`` as for ``pnnh*`` models.
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
            parts = _transformer_parts(child)
            if parts is not None:
                new = (_pnnh_transformer_twin(name, child, parts) if to == "pnnh"
                       else PlainTransformerBlock(**parts))
                setattr(parent, child_name, new)
                count += 1
                continue
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
                    if _looks_transformer(child):
                        raise _unsupported(name, child, "it looks like a Transformer block but is not a pre-norm "
                                                        "one convert knows (pnnh's ViT Block, or timm's: norm1, "
                                                        "attn.qkv/proj, ls1, norm2, mlp.fc1/fc2, ls2)")
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
                          "blocks, modules shaped like torchvision's/timm's BasicBlock and Bottleneck "
                          "(conv1/bn1/conv2/bn2[/conv3/bn3] and downsample) and pre-norm Transformer blocks "
                          "(pnnh's ViT Block, timm's ViT Block)")
    for attr in ("pnnh_name", "pnnh_kwargs"):  # the registered name no longer describes the twin
        twin.__dict__.pop(attr, None)
    if hasattr(twin, "has_shortcut"):
        twin.has_shortcut = False
    return twin
