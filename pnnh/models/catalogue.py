"""The residual catalogue: the variants of residual learning around ResNet, in one block.

Every variant here is the CIFAR :class:`~pnnh.models.resnet.ResNet` with a
:class:`ResidualBlock` whose options switch on one idea of the literature. The options compose
(``create_model("wrn28_10", se=True, drop_path=0.2)`` is valid) and are accepted by every
catalogue model:

=====================  ==========================================================================
option                 what it does (reference)
=====================  ==========================================================================
``scale=s``            residual scaling: ``x + s·F(x)`` (Szegedy et al. 2017, Inception-ResNet;
                       they pick s in 0.1-0.3)
``branches=k``         multi-residual block: ``x + F_1(x) + ... + F_k(x)`` (Abdi & Nahavandi 2016)
``se=True``            squeeze-and-excitation on the branch output (Hu et al. 2018)
``gate=True``          highway block: ``T·F(x) + (1 - T)·x``, ``T = sigmoid(W x + b)``, ``b`` the
                       carry bias ``gate_bias`` (Srivastava et al. 2015)
``cardinality=C``      grouped bottleneck of ResNeXt, ``group_width=d`` channels per group in the
                       first stage (Xie et al. 2017)
``drop_path=p``        stochastic depth: whole-sample branch drop, rate rising linearly to ``p`` at
                       the last block, identity in eval (Huang et al. 2016)
``branch_init=s``      small-weight init of 2-layer shortcuts: each branch starts at ``s`` times
                       its usual output (Li et al. 2016, "Demystifying ResNet"); ``s=0`` is
                       ``zero_init_residual``
``share_weights=True`` the RNN view: blocks after the first of each stage reuse one block's weights
                       (Liao & Poggio 2016)
=====================  ==========================================================================

Wide ResNets (Zagoruyko & Komodakis 2016) are pre-activation basic blocks at width ``k`` with a
16-channel stem: a configuration, not a new block. Looks-linear initialisation (Balduzzi et al.
2017) lives with the plain/PNNH models, not here.

A block's ``shortcut`` is a module (``nn.Identity``, a pad or a projection) as in the ResNet
family, so diagnostics and lesion studies treat catalogue blocks like any residual block.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import register_builder
from .layers import DropPath, cifar_layers, conv1x1, conv3x3
from .resnet import ResNet, make_shortcut

__all__ = [
    "ResidualBlock", "BasicResidual", "BottleneckResidual", "PreActBasicResidual", "PreActBottleneckResidual",
    "SqueezeExcite", "HighwayGate", "DropPath", "catalogue_resnet", "set_drop_path", "share_stage_weights",
    "init_branches",
]


# -------------------------------------------------------------------------------------------------
# small modules
# -------------------------------------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    """``x * sigmoid(W2 relu(W1 mean_hw(x)))``: one weight in [0, 1] per channel and sample.

    Hu et al. 2018 use a reduction of 16; a floor of ``min_hidden`` channels keeps the bottleneck
    of 16-channel CIFAR stages from shrinking to a single unit (our choice).
    """

    def __init__(self, ch: int, reduction: int = 16, min_hidden: int = 4):
        super().__init__()
        hidden = max(min_hidden, ch // reduction)
        self.fc1, self.fc2, self.gate = nn.Conv2d(ch, hidden, 1), nn.Conv2d(hidden, ch, 1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # functional ReLU: diagnostics probe every ReLU *module* as a layer of the signal path,
        # and this one acts on pooled (N, hidden, 1, 1) descriptors, not on the feature maps
        s = F.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * self.gate(self.fc2(s))


class HighwayGate(nn.Module):
    """Transform gate ``T(x) = sigmoid(conv1x1(x) + b)``, one value per output channel and pixel.

    Initialised to carry: weights 0 and bias ``bias`` (-3 by default; Srivastava et al. suggest a
    negative bias such as -1 or -3), so ``T = sigmoid(bias) ≈ 0.05`` for every input and a highway
    block starts close to its carry path. Its parameters are plain ``Parameter``s,
    not an ``nn.Conv2d``, so the model-wide conv initialiser leaves them alone.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, bias: float = -3.0):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.full((out_ch,), float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.conv2d(x, self.weight, self.bias, stride=self.stride))


# -------------------------------------------------------------------------------------------------
# branches: the residual functions F
# -------------------------------------------------------------------------------------------------

def _basic_branch(in_ch: int, ch: int, out_ch: int, stride: int, preact: bool, **_) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv3x3(-BN). Pre-activation: the block normalises the input, and the
    branch ends in the conv."""
    layers = [conv3x3(in_ch, ch, stride), nn.BatchNorm2d(ch), nn.ReLU(inplace=True), conv3x3(ch, out_ch)]
    return nn.Sequential(*layers) if preact else nn.Sequential(*layers, nn.BatchNorm2d(out_ch))


def _bottleneck_branch(in_ch: int, ch: int, out_ch: int, stride: int, preact: bool, *, cardinality: int = 1,
                       group_width: int | None = None, first_width: int | None = None) -> nn.Sequential:
    """1x1 reduce to D, 3x3 in ``cardinality`` groups, 1x1 expand to ``out_ch``.

    ``D = ch`` (He et al.'s bottleneck) unless ``group_width`` is given; then, as in Xie et al.'s
    "C x d" naming, ``D = C·d`` in the first stage (stage width ``first_width``) and doubles with
    the stage width: ``D = C·d·ch/first_width``.
    """
    if group_width is None:
        mid = ch
    else:
        mid = cardinality * max(1, int(round(group_width * ch / (first_width or ch))))
    layers = [conv1x1(in_ch, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
              conv3x3(mid, mid, stride, groups=cardinality), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
              conv1x1(mid, out_ch)]
    return nn.Sequential(*layers) if preact else nn.Sequential(*layers, nn.BatchNorm2d(out_ch))


# -------------------------------------------------------------------------------------------------
# the block
# -------------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """A residual block with the catalogue's options. Post-activation, it computes

        r = drop_path(scale · se(F_1(x) + ... + F_k(x)))
        y = relu(shortcut(x) + r)                       (residual)
        y = relu(T(x) · r + (1 - T(x)) · shortcut(x))   (highway, ``gate=True``)

    Pre-activation (``preact = True`` subclasses): the branches and the gate read
    ``p = relu(bn(x))``, the shortcut reads ``x`` (``p`` where the shape changes, as in
    He et al.'s and the WRN reference code), and there is no final ReLU.

    With every option at its default it computes exactly the ResNet family's block of the same
    kind (tested). Use subclasses; the class attributes tell :class:`ResNet` the expansion and
    activation order.

    Args:
        in_ch, ch, stride, shortcut: as for every ResNet block (``shortcut=None``: plain twin).
        branches: ``k`` residual functions summed (multi-residual).
        scale: factor on the summed branch before the add (residual scaling).
        se: squeeze-and-excitation on the summed branch; ``se_reduction`` its reduction.
        gate: highway gating instead of the plain sum; ``gate_bias`` the carry bias of ``T``.
        cardinality, group_width: ResNeXt's grouped bottleneck (bottleneck blocks only): ``C``
            groups of ``d`` channels in the first stage; ``first_width`` is that stage's width.
        drop_path: stochastic-depth rate of this block (the builder sets it per depth).
    """

    expansion = 1
    preact = False
    branch_fn = staticmethod(_basic_branch)

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str | None = "A", *, branches: int = 1,
                 scale: float = 1.0, se: bool = False, se_reduction: int = 16, gate: bool = False,
                 gate_bias: float = -3.0, cardinality: int = 1, group_width: int | None = None,
                 first_width: int | None = None, drop_path: float = 0.0):
        super().__init__()
        out_ch = ch * self.expansion
        if branches < 1:
            raise ConfigError(f"branches must be >= 1, got {branches}")
        if shortcut is None and (gate or scale != 1.0 or drop_path):
            raise ConfigError("gate, scale and drop_path act on a residual branch; they need a shortcut")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"drop_path must be in [0, 1), got {drop_path}")
        grouped = dict(cardinality=cardinality, group_width=group_width, first_width=first_width)
        if self.expansion == 1 and (cardinality != 1 or group_width is not None):
            raise ConfigError("cardinality/group_width apply to bottleneck (ResNeXt) blocks only")
        if self.expansion == 1:
            grouped = {}
        if self.preact:  # named as in PreActBasicBlock: tools apply bn1/act1 before a preact shortcut
            self.bn1, self.act1 = nn.BatchNorm2d(in_ch), nn.ReLU(inplace=False)
        # SE and gate are registered before the branches so that the last conv of the block outside
        # its shortcut is a branch's last conv (what diagnostics take as the branch end)
        self.se = SqueezeExcite(out_ch, se_reduction) if se else None
        self.gate = HighwayGate(in_ch, out_ch, stride, gate_bias) if gate else None
        self.branches = nn.ModuleList(
            [self.branch_fn(in_ch, ch, out_ch, stride, self.preact, **grouped) for _ in range(branches)])
        self.scale = scale
        self.drop_path = DropPath(drop_path)
        self.branch_out = nn.Identity()  # a hook point: the residual r as merged (after SE, scale, drop-path)
        # highway carries x unchanged where shapes agree, a zero-padded x where they do not
        self.shortcut = make_shortcut("A" if gate else shortcut, in_ch, out_ch, stride)
        self.shortcut_from_preact = self.preact and (stride != 1 or in_ch != out_ch)
        self.act_out = None if self.preact else nn.ReLU(inplace=True)

    def residual_branch_norm(self) -> nn.BatchNorm2d | None:
        """The last norm of the single branch (what ``zero_init_residual`` zeroes), if any."""
        last = self.branches[0][-1]
        return last if len(self.branches) == 1 and isinstance(last, nn.BatchNorm2d) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.act1(self.bn1(x)) if self.preact else x
        r = self.branches[0](inp)
        for branch in self.branches[1:]:
            r = r + branch(inp)
        if self.se is not None:
            r = self.se(r)
        if self.scale != 1.0:
            r = r * self.scale
        r = self.branch_out(self.drop_path(r))
        if self.shortcut is not None:
            sc = self.shortcut(inp if self.shortcut_from_preact else x)
            if self.gate is not None:
                t = self.gate(inp)
                r = t * r + (1.0 - t) * sc
            else:
                r = r + sc
        return r if self.act_out is None else self.act_out(r)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}" if self.scale != 1.0 else ""


class BasicResidual(ResidualBlock):
    """Two 3x3 convs, post-activation (ResNet's basic block + catalogue options)."""


class PreActBasicResidual(ResidualBlock):
    """Two 3x3 convs, pre-activation (the wide-ResNet block + catalogue options)."""

    preact = True


class BottleneckResidual(ResidualBlock):
    """1x1-3x3-1x1 bottleneck (x4), post-activation; grouped 3x3 with ``cardinality > 1`` (ResNeXt)."""

    expansion = 4
    branch_fn = staticmethod(_bottleneck_branch)


class PreActBottleneckResidual(BottleneckResidual):
    """Pre-activation bottleneck + catalogue options."""

    preact = True


# -------------------------------------------------------------------------------------------------
# model-level steps: per-depth drop rates, branch init, weight sharing
# -------------------------------------------------------------------------------------------------

def set_drop_path(model: ResNet, rate: float) -> None:
    """Linear decay rule of Huang et al.: block ``l`` of ``L`` drops its branch with ``rate·l/L``."""
    blocks = model.blocks()
    for i, blk in enumerate(blocks, start=1):
        blk.drop_path.p = rate * i / len(blocks)


@torch.no_grad()
def init_branches(model: ResNet, s: float) -> None:
    """Start every residual branch at ``s`` times its usual output (``s = 0``: zero-init).

    Li et al. (Demystifying ResNet) start 2-layer shortcut nets from small weights. In a
    batch-normalised branch a conv's scale is undone by the BN after it, so the factor goes where
    it reaches the output: the branch's last BN weight (post-activation) or its last conv
    (pre-activation, where the branch ends in a conv).
    """
    for blk in model.blocks():
        for branch in blk.branches:
            branch[-1].weight.mul_(s)


def share_stage_weights(model: ResNet) -> None:
    """The RNN view (Liao & Poggio 2016): in each stage, blocks 3..n reuse block 2's weights.

    Block 1 changes the shape, so the recurrence starts at block 2; a stage of n blocks then has
    2 distinct blocks unrolled n-1 times. Convs, SE and gate weights are the *same* Parameter
    objects (one storage); BatchNorm stays per block, since the statistics of unrolled step t
    differ from those of step t+1 (our choice; it costs 2·C parameters per block).
    """
    for stage in model.stages:
        if len(stage) < 3:
            continue
        ref = stage[1]
        for blk in stage[2:]:
            for m_ref, m in zip(ref.modules(), blk.modules()):
                if isinstance(m, nn.BatchNorm2d) or type(m) is not type(m_ref):
                    continue
                for name, p in list(m.named_parameters(recurse=False)):
                    setattr(m, name, getattr(m_ref, name))


_BLOCKS = {("basic", False): BasicResidual, ("basic", True): PreActBasicResidual,
           ("bottleneck", False): BottleneckResidual, ("bottleneck", True): PreActBottleneckResidual}
_BLOCK_OPTIONS = ("branches", "scale", "se", "se_reduction", "gate", "gate_bias", "cardinality", "group_width")


def catalogue_resnet(layers, *, block: str = "basic", preact: bool = False, drop_path: float = 0.0,
                     branch_init: float | None = None, zero_init_residual: bool = False,
                     share_weights: bool = False, **kwargs) -> ResNet:
    """A CIFAR-layout :class:`ResNet` of :class:`ResidualBlock` s with the catalogue's options.

    ``kwargs`` holds block options (see :class:`ResidualBlock`) and ResNet options (``width``,
    ``shortcut``, ``init``, ``stem_width`` ...). Model-level steps run after the ResNet's own
    init: drop-path rates by depth, branch init, then weight sharing (so shared blocks also share
    their initial values).
    """
    block_kwargs = {k: kwargs.pop(k) for k in _BLOCK_OPTIONS if k in kwargs}
    kwargs.setdefault("shortcut", "B" if (preact or block == "bottleneck") else "A")
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1), got {drop_path}")
    if drop_path:
        block_kwargs["drop_path"] = drop_path  # validated per block against the shortcut
    if "group_width" in block_kwargs:  # D = C·d in the first stage, whatever the width multiplier
        block_kwargs["first_width"] = max(1, int(round(16 * kwargs.get("width", 1.0))))
    model = ResNet(layers, _BLOCKS[block, preact], layout="cifar", block_kwargs=block_kwargs, **kwargs)
    if drop_path:
        set_drop_path(model, drop_path)
    if zero_init_residual and branch_init is None:
        branch_init = 0.0
    if branch_init is not None and model.has_shortcut:
        init_branches(model, branch_init)
    if share_weights:
        share_stage_weights(model)
    return model


# -------------------------------------------------------------------------------------------------
# registered entry points
# -------------------------------------------------------------------------------------------------

def _wrn_layers(depth: int) -> tuple[int, int, int]:
    if (depth - 4) % 6 or depth < 10:
        raise ConfigError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    return (n, n, n)


def _register() -> None:
    def add(name, family, depth, builder, doc):
        register_builder(globals(), name, builder, doc, family=family, depth=depth, layout="cifar", fixed=("block",))

    def basic(depth, **preset):
        def build(**kwargs):
            return catalogue_resnet(cifar_layers(depth, False), **{**preset, **kwargs})
        return build

    for d in (20, 56, 110):
        add(f"scaled_resnet{d}", "scaled_resnet", d, basic(d, scale=0.2),
            f"ResNet-{d} with residual scaling x + 0.2·F(x) (Szegedy et al. 2017); option scale=.")
        add(f"multires{d}_k2", "multires", d, basic(d, branches=2),
            f"Multi-residual ResNet-{d}: x + F1(x) + F2(x) per block (Abdi & Nahavandi 2016); option branches=.")
        add(f"se_resnet{d}", "se_resnet", d, basic(d, se=True),
            f"SE-ResNet-{d}: squeeze-and-excitation on each branch (Hu et al. 2018).")
        add(f"highway{d}", "highway", d, basic(d, gate=True),
            f"Highway net, ResNet-{d} layout: T·F(x) + (1-T)·x, carry-biased gate (Srivastava et al. 2015).")
        add(f"demystify{d}", "demystify", d, basic(d, branch_init=0.1),
            f"ResNet-{d} with 2-layer branches started at 0.1x (Li et al. 2016); option branch_init=.")
        add(f"shared_resnet{d}", "shared_resnet", d, basic(d, share_weights=True),
            f"ResNet-{d} with weights shared within each stage, an unrolled RNN (Liao & Poggio 2016).")
        add(f"droppath_resnet{d}", "droppath_resnet", d, basic(d, drop_path=0.5),
            f"ResNet-{d} with stochastic depth, drop rate rising linearly to 0.5 (Huang et al. 2016); option drop_path=.")
    add("multires56_k4", "multires", 56, basic(56, branches=4),
        "Multi-residual ResNet-56 with 4 residual functions per block (Abdi & Nahavandi 2016).")

    def wrn(depth, k):
        def build(**kwargs):
            preset = dict(preact=True, width=k, stem_width=16)
            return catalogue_resnet(_wrn_layers(depth), **{**preset, **kwargs})
        return build

    # the paper's nets, and a k=2 series with the block counts of ResNet-20/56/110 (WRN-22/58/112)
    for d, k in ((16, 4), (16, 8), (22, 8), (28, 10), (40, 2), (40, 4), (22, 2), (58, 2), (112, 2)):
        add(f"wrn{d}_{k}", "wrn", d, wrn(d, k),
            f"WRN-{d}-{k}: pre-activation basic blocks, width x{k} (Zagoruyko & Komodakis 2016).")

    def resnext(depth, c, d, width):
        def build(**kwargs):
            preset = dict(block="bottleneck", cardinality=c, group_width=d, width=width)
            return catalogue_resnet(cifar_layers(depth, True), **{**preset, **kwargs})
        return build

    # Xie et al.'s CIFAR template: stage widths 64/128/256 (width 4), block outputs 256/512/1024
    for depth, c, d in ((29, 8, 64), (29, 16, 64)):
        add(f"resnext{depth}_{c}x{d}d", "resnext", depth, resnext(depth, c, d, 4.0),
            f"ResNeXt-{depth} ({c}x{d}d), CIFAR template: grouped bottleneck, cardinality {c} (Xie et al. 2017).")
    # small members at CIFAR-ResNet widths (16/32/64, outputs 64/128/256) for CPU runs and depth
    # studies; they sort first among the family's depth-29 names, so a study by (family, depth) picks them
    for depth in (20, 29, 56, 110):
        add(f"resnext{depth}_8x4d", "resnext", depth, resnext(depth, 8, 4, 1.0),
            f"ResNeXt-{depth} (8x4d) at CIFAR-ResNet widths: cardinality 8, 4 channels per group (Xie et al. 2017).")


_register()
