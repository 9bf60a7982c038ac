"""PNNH CNNs: plain nets whose layers are split into a *learner* and a weight-sharing *coder*.

The paper (arXiv 2402.08645) states the paradigm — a plain layer split into a learner that learns
new features and a coder that carries an encoding of the input across the non-linearity, with
shared weights, forming an internal path across depth — but not the block. The blocks here are
our design; ``docs/pnnh.md`` gives the equations and the ablation that chose the default.

A **mirrored PNNH layer** (``coder="mirror"``, the default) is ONE convolution producing ``C_l``
learner and ``C_c`` coder channels, one BatchNorm over them, and the activation::

    a = BN(W x)                           # C_l + C_c channels, W = [W_l; W_c]
    y = cat(relu(a_l), relu(a_c), relu(-a_c))    # C_l + 2 C_c = the stage width

``relu(a_c)`` and ``relu(-a_c)`` come from the same weights ``W_c`` (the weight sharing), and
``relu(e) - relu(-e) = e``: the next layer's coder, initialised with ``+I`` on ``relu(e)`` and
``-I`` on ``relu(-e)`` (looks-linear style), receives the code ``e`` unchanged through the ReLU.
That is the internal path: no shortcut, no addition, only a plain conv-BN-ReLU chain. After
BN folding the layer *is* a conv with tied rows ``[W_l; W_c; -W_c]`` followed by a ReLU
(:meth:`PNNHConv2d.as_plain_conv`), so a deployed PNNH net is a pure conv-ReLU chain.

Other coders (documented options, measured in ``docs/results/pnnh_ablation.md``):

- ``coder="shared"``: the mirrored layer with one coder weight ``W_c`` shared by every
  same-shape layer of a stage (an unrolled recurrent coder);
- ``coder="tied"``: a tied encoder-decoder coder summed with a full-width learner,
  ``y = relu(BN(W_l x + pad(E^T relu(BN(E x)))))`` — the decoder is the transpose of the encoder,
  there is no identity term;
- ``coder="pointwise"``, ``"depthwise"``, ``"code_conv"``, ``"fixed"``: the mirrored layer with
  code rows cheaper than a ``k x k`` conv over all inputs (:mod:`pnnh.models.coders`).

The ``llplain*`` family (looks-linear plain nets, Balduzzi et al. 2017: CReLU with mirrored
weights, linear at init) is the ``coder_ratio=1`` special case: every channel is coder.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import register_builder, register_cifar_depths
from .layers import (IMAGENET_LAYERS, DiracWeight, PooledClassifierHead, _he_, cifar_layers, cnn_layout,
                     fold_batchnorm, init_dirac_param_, mirror)

__all__ = ["mirror", "PNNHConv2d", "PNNHLayer", "PNNHSequential", "pnnh_stage", "PicksKernels", "TiedCoderLayer", "PNNHBlock", "PNNHNet", "CoderSpec", "CODERS",
           "CODER_INITS", "cifar_pnnh", "imagenet_pnnh", "upgrade_state_dict"]

torch.fx.wrap("mirror")  # a leaf in torch.fx graphs (the structure checks trace PNNH nets)

CHEAP_CODERS = ("pointwise", "depthwise", "code_conv", "fixed")  # pnnh/models/coders.py
CODERS = ("mirror", "shared", "tied", *CHEAP_CODERS)
CODER_INITS = ("identity", "orthogonal", "he")
LEARNER_INITS = ("he", "dirac")
PATH_PARAMS = ("auto", "init", "dirac")


class CoderSpec:
    """The coder options shared by every layer of a net (a plain record, validated once)."""

    def __init__(self, coder: str = "mirror", ratio: float = 0.25, init: str = "identity", mix: float = 0.1,
                 learner_init: str = "dirac", learner_mix: float = 0.0, learner_bias: float = 0.0,
                 path_param: str = "auto", path_beta: float = 0.1):
        if coder not in CODERS:
            raise ConfigError(f"unknown coder {coder!r}; choose one of {', '.join(CODERS)}")
        for name, value in (("coder_ratio", ratio), ("coder_mix", mix), ("learner_mix", learner_mix),
                            ("learner_bias", learner_bias)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"coder_ratio must be in [0, 1], got {ratio}")
        if init not in CODER_INITS:
            raise ConfigError(f"unknown coder_init {init!r}; choose one of {', '.join(CODER_INITS)}")
        if not math.isfinite(mix) or mix < 0:
            raise ConfigError(f"coder_mix must be a finite number >= 0, got {mix}")
        if learner_init not in LEARNER_INITS:
            raise ConfigError(f"unknown learner_init {learner_init!r}; choose one of {', '.join(LEARNER_INITS)}")
        if not math.isfinite(learner_mix) or learner_mix < 0:
            raise ConfigError(f"learner_mix must be a finite number >= 0, got {learner_mix}")
        if not math.isfinite(learner_bias):
            raise ConfigError(f"learner_bias must be a finite number, got {learner_bias}")
        self.coder, self.ratio, self.init, self.mix, self.learner_init = coder, ratio, init, mix, learner_init
        if path_param not in PATH_PARAMS:
            raise ConfigError(f"unknown path_param {path_param!r}; choose one of {', '.join(PATH_PARAMS)}")
        if path_param == "auto":  # the mirrored and cheap coders keep their path in the parametrisation (docs/pnnh.md)
            path_param = "dirac" if coder in ("mirror", *CHEAP_CODERS) else "init"
        if path_param == "dirac" and coder in ("shared", "tied"):
            raise ConfigError(f"path_param='dirac' needs a coder with its own weights per layer, not {coder!r}")
        if coder in ("depthwise", "fixed") and init == "orthogonal":
            raise ConfigError(f"coder_init='orthogonal' mixes code channels; coder={coder!r} maps each code "
                              "channel on its own (use identity or he)")
        if coder in CHEAP_CODERS and ratio == 0:
            raise ConfigError(f"coder={coder!r} computes code channels: it needs coder_ratio > 0")
        if coder == "fixed" and init != "identity":
            raise ConfigError("coder='fixed' has no weights: it passes the code on (coder_init must be identity)")
        if isinstance(path_beta, bool) or not isinstance(path_beta, (int, float)) or not (
                math.isfinite(path_beta) and path_beta > 0):
            raise ConfigError(f"path_beta must be a finite number > 0, got {path_beta!r}")
        self.learner_mix, self.learner_bias, self.path_param = learner_mix, learner_bias, path_param
        self.path_beta = float(path_beta)

    def split(self, width: int) -> tuple[int, int]:
        """(learner, coder) channels of a layer whose output is ``width`` channels wide."""
        n_code = int(round(self.ratio * width / 2))
        return width - 2 * n_code, n_code

    def code_layout(self, n_in: int, n_out: int, n_code: int | None, in_code: int | None,
                    unit: str = "channels") -> tuple[int, int]:
        """``(n_code, in_code)`` of a layer from ``n_in`` to ``n_out`` channels (or features): the
        given ones, or this spec's :meth:`split` of each width; checked to fit (``2 n_code <= n_out``)."""
        n_code = self.split(n_out)[1] if n_code is None else n_code
        in_code = self.split(n_in)[1] if in_code is None else in_code
        if 2 * n_code > n_out or 2 * in_code > n_in:
            raise ConfigError(f"coder {unit} do not fit: 2*{n_code} > {n_out} or 2*{in_code} > {n_in}")
        return n_code, in_code


class PicksKernels:
    """Mixin for modules holding PNNH layers: ``.train()``/``.eval()`` and ``.to()``/``.double()``/...
    end by giving each layer the kernel for its mode, device and memory format
    (:func:`pnnh.models.kernels.select_kernels`); the forward itself never checks."""

    def train(self, mode: bool = True):
        super().train(mode)
        kernels.select_kernels(self)
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        kernels.select_kernels(self)
        return self


class _WeightHolder(nn.Module):
    """Owns one coder weight shared by several layers (the layers refer to it, unregistered)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class PNNHConv2d(PicksKernels, nn.Module):
    """One mirrored PNNH layer: ``y = relu(mirror(BN(conv(x, [W_l; W_c]))))``.

    ``mirror(a) = cat(a_l, a_c, -a_c)``, so the output is ``[relu(a_l) | relu(a_c) | relu(-a_c)]``:
    ``C_l`` learner channels, then the code ``e = a_c`` carried across the ReLU as ``relu(e)`` and
    ``relu(-e)`` (``C_c`` channels each). Layers stack like ``nn.Conv2d``s: by default the layer
    reads its input as the output of a PNNH layer with the same coder ratio.

    Args:
        in_channels, out_channels: as ``nn.Conv2d``; ``out_channels = C_l + 2 C_c``.
        kernel_size, stride: of the convolution (padding keeps the size at stride 1).
        n_code: coder channels ``C_c`` [``spec.split(out_channels)``: a share ``spec.ratio`` of the width].
        in_code: coder channels of the input, laid out ``[learner | relu(e) | relu(-e)]``
            [``spec.split(in_channels)``, what a PNNH layer of that width writes]; 0 for an input
            that carries no code (an image, the output of an ordinary layer).
        spec: coder options (:class:`CoderSpec`; default ratio 0.25, identity coder, DiracNet path).
        shared: a :class:`_WeightHolder` whose weight is this layer's coder weight (stage-shared
            coder); ``None`` for a layer owning its own weights.

    With ``spec.path_param == "dirac"`` the conv weight is ``self.dirac(self.weight)``, the
    DiracNet parametrisation ``alpha P + beta V/|V|`` (:class:`~pnnh.models.layers.DiracWeight`)
    with the identity path as ``P``. Training on CPU in channels_last runs the same function
    through :mod:`pnnh.models.kernels` (switched in by ``.train()``/``.to()``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *,
                 n_code: int | None = None, in_code: int | None = None, spec: CoderSpec | None = None,
                 shared: _WeightHolder | None = None):
        super().__init__()
        spec = spec or CoderSpec()
        in_ch, out_ch, k = in_channels, out_channels, kernel_size
        n_code, in_code = spec.code_layout(in_ch, out_ch, n_code, in_code)
        self.in_ch, self.out_ch, self.n_code, self.in_code = in_ch, out_ch, n_code, in_code
        self.n_learn = out_ch - 2 * n_code
        self.stride, self.padding, self.kernel_size = stride, k // 2, k
        n_conv = self.n_learn + n_code
        if shared is None:
            self.weight = nn.Parameter(torch.empty(n_conv, in_ch, k, k))
        else:
            if tuple(shared.weight.shape) != (n_code, in_ch, k, k):
                raise ConfigError("shared coder weight has the wrong shape for this layer")
            self.weight = nn.Parameter(torch.empty(self.n_learn, in_ch, k, k))
        self.__dict__["_shared"] = shared  # referenced, not registered: one copy in the state dict
        # W = diag(alpha) P + diag(beta) V / |V| (DiracNets); P, the fixed internal-path kernel, is set below
        self.dirac = DiracWeight(torch.zeros(n_conv, in_ch, k, k)) if spec.path_param == "dirac" else None
        self.bn = nn.BatchNorm2d(n_conv)
        self.act = nn.ReLU(inplace=True)
        self.reset_parameters(spec)
        self._register_load_state_dict_pre_hook(_upgrade_layer_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.conv_weight(), None, self.stride, self.padding)
        x = self.bn(x)
        x = mirror(x, self.n_learn)
        x = self.act(x)
        return x

    # -- weights ---------------------------------------------------------------------------------
    def conv_weight(self) -> torch.Tensor:
        """``[W_l; W_c]``: the ``C_l + C_c`` trained filters (one tensor, possibly a shared part)."""
        if self.dirac is not None:
            return self.dirac(self.weight)
        if self._shared is None:
            return self.weight
        return torch.cat([self.weight, self._shared.weight], 0)

    @torch.no_grad()
    def reset_parameters(self, spec: CoderSpec) -> None:
        """Learner rows: He. Coder rows: ``spec.init`` on the input's code, ``spec.mix`` x He elsewhere.

        ``identity``: ``W_c[j, relu(e_j)] = +1``, ``W_c[j, relu(-e_j)] = -1`` at the centre tap, so
        ``W_c x = e`` (the code passes the ReLU unchanged); coder rows beyond the input's code get
        He. ``orthogonal``: the same with an orthogonal matrix ``Q`` in place of ``I``. ``he``: plain
        He (no internal path at init). A stride-2 layer's centre tap subsamples, like a pad shortcut.
        """
        k, fan_in = self.kernel_size, self.in_ch * self.kernel_size ** 2
        learner = self.weight[: self.n_learn]
        _he_(learner, fan_in)
        n_in_learn = self.in_ch - 2 * self.in_code
        m_l = min(self.n_learn, n_in_learn)
        dirac = spec.learner_init == "dirac" and m_l > 0 and self.in_code > 0
        if dirac:
            # identity on the previous learner channels (a DiracNet-style weight-level path), He beyond
            learner[:m_l].zero_()
            if spec.learner_mix > 0:  # random features on top of the identity (ResNet's x + F(x) at init)
                _he_(learner[:m_l], fan_in, spec.learner_mix)
            learner[:m_l, :m_l, k // 2, k // 2] += torch.eye(m_l)
        coder = self._shared.weight if self._shared is not None else self.weight[self.n_learn:]
        if self._shared is not None and getattr(self._shared, "_initialised", False):
            coder = None  # the first layer sharing this weight initialised it
        if coder is not None:
            m = min(self.n_code, self.in_code)
            if spec.init == "he" or m == 0:
                _he_(coder, fan_in)
            else:
                coder.zero_()
                if self.n_code > m:
                    _he_(coder[m:], fan_in)
                c = k // 2
                n_in_learn = self.in_ch - 2 * self.in_code
                if spec.init == "identity":
                    q = torch.eye(m)
                else:
                    q = torch.empty(m, m)
                    nn.init.orthogonal_(q)
                pos = slice(n_in_learn, n_in_learn + m)
                neg = slice(n_in_learn + self.in_code, n_in_learn + self.in_code + m)
                coder[:m, pos, c, c] = q
                coder[:m, neg, c, c] = -q
                if spec.mix > 0 and n_in_learn > 0:  # a short gradient route from learner channels
                    _he_(coder[:m, :n_in_learn], fan_in, spec.mix)
            if self._shared is not None:
                self._shared._initialised = True
        if self.dirac is not None:
            # the identity entries set above become the fixed path P; the trained V is He everywhere
            c = k // 2
            path = torch.zeros_like(self.weight)
            if dirac:
                path[:m_l, :m_l, c, c] = torch.eye(m_l)
            if coder is not None and spec.init != "he" and min(self.n_code, self.in_code) > 0:
                m = min(self.n_code, self.in_code)
                rows = slice(self.n_learn, self.n_learn + m)
                path[rows, n_in_learn:n_in_learn + m, c, c] = q
                path[rows, n_in_learn + self.in_code:n_in_learn + self.in_code + m, c, c] = -q
            self.dirac.path.copy_(path)
            # V's filters start at norm beta = path_beta (0.1 by default), so a step on V moves W as a
            # step on W itself would (dW = beta/|V| * dV, and dL/dV = beta/|V| * dL/dW); at He scale
            # (|V| ~ 1.4) the learner learns 200x slower: 82.92 % against 88.31 % at norm 0.1 after
            # one epoch (pnnh56, seed 0)
            init_dirac_param_(self.weight, spec.path_beta)
            nn.init.ones_(self.dirac.alpha)
            nn.init.constant_(self.dirac.beta, spec.path_beta)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        if dirac and spec.learner_bias != 0:
            # BN shift of the identity rows: relu(BN(x) + b) with x >= 0 passes every x > 0 once
            # b >= mean/std of x, so the learner path is not thinned by half at each layer at init
            # (pnnh56 at init, scripts/learner_density.py: 3.4 % of learner units active in the last layer at
            # b=0, 53 % at b=0.5). It trains worse (docs/pnnh.md): an option to study, not a remedy.
            self.bn.bias[:m_l] = spec.learner_bias

    @torch.no_grad()
    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent plain conv of this layer in eval mode: ``(weight, bias)`` such that
        ``layer(x) == relu(conv2d(x, weight, bias, stride, padding))``.

        BN (running statistics) is folded into the conv (:func:`~pnnh.models.layers.fold_batchnorm`):
        ``s = gamma / sqrt(var + eps)``, rows ``[s_l W_l; s_c W_c; -s_c W_c]`` and bias
        ``[b_l; b_c; -b_c]`` with ``b = beta - s * mean``. The tied rows are the coder's weight
        sharing made explicit.
        """
        wf, bf = fold_batchnorm(self.conv_weight(), None, self.bn)
        n = self.n_learn
        return torch.cat([wf, -wf[n:]], 0), torch.cat([bf, -bf[n:]], 0)

    @torch.no_grad()
    def as_plain_conv(self) -> nn.Sequential:
        """This layer (eval mode) as ``Sequential(Conv2d, ReLU)``: the protocol :func:`pnnh.deploy` uses."""
        w, b = self.folded_weight_bias()
        conv = nn.Conv2d(self.in_ch, w.shape[0], self.kernel_size, self.stride, self.padding, bias=True,
                         device=w.device, dtype=w.dtype)  # where the layer is: deploy keeps the model's device
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return nn.Sequential(conv, nn.ReLU(inplace=True))

    def extra_repr(self) -> str:
        shared = ", shared coder" if self._shared is not None else ""
        return (f"{self.in_ch}->{self.out_ch} (learner {self.n_learn}, coder 2x{self.n_code}), "
                f"k={self.kernel_size}, stride={self.stride}{shared}")


PNNHLayer = PNNHConv2d  # the name inside the model family


_RENAMED_KEYS = {"path": "dirac.path", "path_scale": "dirac.alpha", "weight_scale": "dirac.beta"}


def upgrade_state_dict(state_dict: dict) -> dict:
    """``state_dict`` with the DiracNet entries of PNNH layers saved by pnnh 0.1 renamed.

    Those layers stored ``P``, ``alpha`` and ``beta`` as ``<layer>.path``, ``.path_scale`` and
    ``.weight_scale``; the layer holds them in its :class:`DiracWeight` as ``<layer>.dirac.path``,
    ``.dirac.alpha`` and ``.dirac.beta``. Other keys are returned unchanged, in order.
    """
    layers = {k[: -len("path_scale")] for k in state_dict if k.endswith("path_scale")}
    out = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        out[prefix + _RENAMED_KEYS[leaf] if prefix in layers and leaf in _RENAMED_KEYS else key] = value
    return out


def _upgrade_layer_keys(state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of :class:`PNNHConv2d`: accepts the key names of pnnh 0.1."""
    if prefix + "path_scale" in state_dict:
        for old, new in _RENAMED_KEYS.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)


class TiedCoderLayer(nn.Module):
    """Tied encoder-decoder coder summed with a learner (``coder="tied"``).

    ``y = relu(BN(W_l x + pad(E^T relu(BN_e(E x)))))``: the learner ``W_l`` (``k x k``, all
    ``out_ch`` outputs) plus a 1x1 encoder ``E`` (``in_ch -> n_code``, carrying the stride) whose
    decoder is its transpose ``E^T`` (``n_code -> in_ch``), zero-padded (or cut) to ``out_ch``.
    No identity term: the coder is a parametric branch. It has an inner ReLU, so it does not
    fold into one conv (:meth:`as_plain_conv` raises).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *,
                 n_code: int = 1, in_code: int = 0, spec: CoderSpec | None = None, shared=None):
        super().__init__()
        spec = spec or CoderSpec(coder="tied")
        in_ch, out_ch = in_channels, out_channels
        self.in_ch, self.out_ch, self.n_code, self.in_code = in_ch, out_ch, max(1, n_code), in_code
        self.n_learn = out_ch
        self.stride, self.padding, self.kernel_size = stride, kernel_size // 2, kernel_size
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.enc = nn.Parameter(torch.empty(self.n_code, in_ch, 1, 1))
        self.bn_enc = nn.BatchNorm2d(self.n_code)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.extra = out_ch - in_ch
        with torch.no_grad():
            _he_(self.weight, in_ch * kernel_size ** 2)
            if spec.init == "he":
                _he_(self.enc, in_ch)
            else:  # orthogonal rows (identity is the orthogonal case for a square encoder)
                nn.init.orthogonal_(self.enc.view(self.n_code, in_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learned = F.conv2d(x, self.weight, None, self.stride, self.padding)
        code = F.relu(self.bn_enc(F.conv2d(x, self.enc, None, self.stride)))
        decoded = F.conv2d(code, self.enc.transpose(0, 1))  # tied: decoder = encoder transposed
        if self.extra > 0:
            decoded = F.pad(decoded, (0, 0, 0, 0, 0, self.extra))
        elif self.extra < 0:
            decoded = decoded[:, : self.out_ch]
        return self.act(self.bn(learned + decoded))

    def as_plain_conv(self):
        raise ConfigError("the tied encoder-decoder coder has an inner ReLU: it does not fold into one conv")


_LAYERS = {"mirror": PNNHConv2d, "shared": PNNHConv2d, "tied": TiedCoderLayer}  # + the cheap coders (bottom)


class PNNHBlock(nn.Module):
    """A chain of PNNH layers standing in for one residual block (2 layers basic, 3 bottleneck).

    Basic: ``3x3 (stride) -> 3x3``; bottleneck: ``1x1 -> 3x3 (stride) -> 1x1 (x4 channels)``.
    The block has the same convolutions (count, kernel sizes, strides, output widths) as its
    residual twin; it has no shortcut and no addition. ``blocks()`` of a PNNH net returns these,
    one per residual block of the twin, for diagnostics and lesion studies.
    """

    def __init__(self, in_ch: int, ch: int, stride: int, spec: CoderSpec, in_code: int, bottleneck: bool = False,
                 shared: dict | None = None):
        super().__init__()
        shared = {} if shared is None else shared  # (k, in, out) -> the stage's coder weight (coder="shared")
        self.expansion = 4 if bottleneck else 1
        plan = [(1, ch, 1), (3, ch, stride), (1, ch * 4, 1)] if bottleneck else [(3, ch, stride), (3, ch, 1)]
        layers, c_in, code_in = [], in_ch, in_code
        for k, c_out, s in plan:
            n_code = spec.split(c_out)[1]
            holder = None
            if spec.coder == "shared" and s == 1 and c_in == c_out and n_code > 0:
                key = (k, c_in, c_out)
                if key not in shared:
                    shared[key] = _WeightHolder((n_code, c_in, k, k))
                holder = shared[key]
            layer_cls = _LAYERS[spec.coder]
            if layer_cls is CheapCoderConv2d and (n_code == 0 or code_in == 0):
                layer_cls = PNNHConv2d  # no code to carry (a layer too narrow for a coder channel): mirrored
            layers.append(layer_cls(c_in, c_out, k, s, n_code=n_code, in_code=code_in, spec=spec, shared=holder))
            c_in, code_in = c_out, (n_code if spec.coder != "tied" else 0)
        self.layers = nn.Sequential(*layers)
        self.out_code = code_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PNNHSequential(PicksKernels, nn.Sequential):
    """``nn.Sequential`` of PNNH layers (and parameter-free modules: pooling, dropout) whose code layouts chain.

    Each PNNH layer must read what the previous one writes (channels and coder channels), else
    :class:`~pnnh.errors.ConfigError` names the two layers. The CPU training kernels are chosen for
    all its layers together, so a 1-channel stem follows the channels_last layers after it.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        prev = None
        for i, m in enumerate(self):
            if not isinstance(m, (PNNHConv2d, TiedCoderLayer, CheapCoderConv2d)):
                continue
            if prev is not None:
                j, p = prev
                out_code = 0 if isinstance(p, TiedCoderLayer) else p.n_code
                if (p.out_ch, out_code) != (m.in_ch, m.in_code):
                    raise ConfigError(f"layer {i} reads {m.in_ch} channels with {m.in_code} coder channels, but layer "
                                      f"{j} writes {p.out_ch} with {out_code}: build layer {i} with "
                                      f"in_channels={p.out_ch}, in_code={out_code}")
            prev = i, m


def pnnh_stage(in_channels: int, out_channels: int, depth: int, stride: int = 1, kernel_size: int = 3, *,
               in_code: int | None = None, spec: CoderSpec | None = None) -> PNNHSequential:
    """``depth`` PNNH layers: the first maps ``in_channels`` to ``out_channels`` with ``stride``
    (reading ``in_code`` coder channels; 0 for an image), the rest keep the width and size."""
    if depth < 1:
        raise ConfigError(f"a stage needs depth >= 1, got {depth}")
    layers = [PNNHConv2d(in_channels, out_channels, kernel_size, stride, in_code=in_code, spec=spec)]
    layers += [PNNHConv2d(out_channels, out_channels, kernel_size, spec=spec) for _ in range(depth - 1)]
    return PNNHSequential(*layers)


class PNNHNet(PicksKernels, PooledClassifierHead, nn.Module):
    """A PNNH CNN with the layout of a ResNet twin (same stages, widths, convolutions; no shortcut).

    Args:
        layers: blocks per stage, e.g. ``(9, 9, 9)`` for the twin of ResNet-56.
        bottleneck: bottleneck blocks (1x1-3x3-1x1, x4) instead of basic (3x3-3x3).
        layout: ``"cifar"`` (16/32/64) or ``"imagenet"`` (64/128/256/512).
        coder: ``"mirror"`` (default), ``"shared"`` (coder weights shared by the same-shape layers
            of a stage), ``"tied"`` (tied encoder-decoder summed with the learner), or a cheap
            coder (:mod:`pnnh.models.coders`): ``"pointwise"`` (1x1 code rows), ``"depthwise"``
            (each code channel from its own input pair), ``"code_conv"`` (``k x k`` over the
            input's code only), ``"fixed"`` (no weights: the code passed on, a shortcut the
            structure check reports).
        coder_ratio: share ``r`` of each layer's output channels that are coder channels
            (``2 C_c = r * width``; default 0.25, chosen by ``pnnh ablate``: it beat 0.5 at depths
            20, 56 and 110, docs/results/pnnh_ablation.md); ``r = 1`` is a looks-linear (all-CReLU)
            plain net.
        coder_init: ``"identity"`` (looks-linear: the code passes unchanged), ``"orthogonal"`` or
            ``"he"`` (no internal path at init).
        coder_mix: scale (x He) of the coder's weights reading the input's *learner* channels, so
            learner features get a short route along the coder path; 0 reads only the code.
        learner_init: ``"dirac"`` (default: learner rows start as the identity on the input's learner
            channels, as in a dirac-initialised plain net; extra rows He) or ``"he"``.
        learner_mix: with ``learner_init="dirac"``, He noise of this scale added to the identity
            rows (over all input channels), so learners start with random features as a ResNet
            block's ``x + F(x)`` does; 0 (default) is the pure identity.
        learner_bias: with ``learner_init="dirac"``, the initial BatchNorm shift ``beta`` of the
            identity rows. At 0 (default) each layer's ReLU keeps only the above-mean part of
            ``BN(x)``, so the identity-carried features thin out with depth; ``b > 0`` keeps them
            (and trained worse at 0.5: docs/pnnh.md).
        path_param: ``"dirac"``: the internal path is kept in the weights' parametrisation, as in
            DiracNets (Zagoruyko & Komodakis 2017): ``W = diag(alpha) P + diag(beta) V / |V|`` per
            output filter, ``P`` the fixed path kernel (a buffer: the identity entries of
            ``learner_init``/``coder_init``), ``V`` trained (He directions at filter norm 0.1),
            ``alpha = 1`` and ``beta = path_beta`` at init (1-D, so no weight decay). Still one conv per
            layer; it folds like any other (``deploy``). ``"init"``: the path is only where the
            weights *start* and training may move it. ``"auto"``
            (default): ``"dirac"`` for the mirrored coder, chosen by ``pnnh ablate`` (5 epochs, depth
            56, 3 seeds: docs/pnnh.md), and for the cheap coders (the same parametrisation of their
            weights); ``"init"`` for ``shared``/``tied``, which it does not support.
        path_beta: with ``path_param="dirac"``, the initial norm ``beta`` of each filter's trained
            part (and of ``V``, so a step on ``V`` moves ``W`` as a step on ``W`` would). Each layer
            adds this much random filter to its path, and BatchNorm renormalises after it, so the
            share of the input a net's last layer carries at initialisation falls geometrically
            with depth: 0.1 (default) suits depth 56-110; a 1,202-layer net keeps the input to its
            end only with a smaller one (0.02: docs/results/pnnh_cost.md).
        width: multiplier on the stage widths.
        stem: ``"auto"``, ``"cifar"`` (3x3 s1), ``"small"`` (3x3 s1, ImageNet layout) or
            ``"imagenet"`` (7x7 s2 + max-pool). The stem is a PNNH layer: it makes the first code.
    """

    def __init__(self, layers, bottleneck: bool = False, *, layout: str = "cifar", num_classes: int = 10,
                 in_chans: int = 1, width: float = 1.0, coder: str = "mirror", coder_ratio: float = 0.25,
                 coder_init: str = "identity", coder_mix: float = 0.1, learner_init: str = "dirac",
                 learner_mix: float = 0.0, learner_bias: float = 0.0, path_param: str = "auto", path_beta: float = 0.1,
                 stem: str = "auto",
                 img_size: int | None = None,
                 drop_rate: float = 0.0):
        super().__init__()
        spec = CoderSpec(coder, coder_ratio, coder_init, coder_mix, learner_init, learner_mix, learner_bias, path_param,
                         path_beta)
        widths, img_size, stem = cnn_layout(layout, layers, width, img_size, stem, min_width=2)
        if stem not in ("cifar", "small", "imagenet"):
            raise ConfigError(f"unknown stem {stem!r}; use auto, cifar, small or imagenet")
        self.num_classes, self.in_chans, self.layout, self.stem_kind = num_classes, in_chans, layout, stem
        self.coder, self.coder_ratio = coder, coder_ratio
        self.drop_rate = drop_rate

        stem_ch = widths[0]
        stem_code = spec.split(stem_ch)[1] if coder != "tied" else 0  # a tied net carries no mirrored code
        stem_spec = CoderSpec("mirror", coder_ratio, coder_init, coder_mix, learner_init, learner_mix, learner_bias,
                              spec.path_param, path_beta)  # as resolved for the net's coder
        if stem == "imagenet":
            self.stem = nn.Sequential(PNNHConv2d(in_chans, stem_ch, 7, 2, n_code=stem_code, in_code=0, spec=stem_spec),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(PNNHConv2d(in_chans, stem_ch, 3, 1, n_code=stem_code, in_code=0, spec=stem_spec))
        code = stem_code

        stages, in_ch = [], stem_ch
        self.shared_coders = nn.ModuleList()  # stage-shared coder weights (coder="shared"), owned here once
        for i, (n, ch) in enumerate(zip(layers, widths)):
            shared: dict = {}  # one coder weight per layer shape, per stage
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blk = PNNHBlock(in_ch, ch, stride, spec, code, bottleneck, shared)
                blocks.append(blk)
                in_ch, code = ch * blk.expansion, blk.out_code
            stages.append(nn.Sequential(*blocks))
            self.shared_coders.extend(shared.values())
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_ch, num_classes)
        self.init_classifier_(self.fc)
        self.default_cfg = dict(input_size=(in_chans, img_size, img_size), num_classes=num_classes, layout=layout)

    # -- uniform interface ---------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """All blocks in forward order (one per residual block of the twin)."""
        return [b for stage in self.stages for b in stage]

    def pnnh_layers(self) -> list[nn.Module]:
        """Every PNNH layer (stem first) in forward order."""
        return [m for m in self.modules() if isinstance(m, (PNNHConv2d, TiedCoderLayer, CheapCoderConv2d))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return x


# -------------------------------------------------------------------------------------------------
# Registered entry points: pnnh* (default coder) and llplain* (looks-linear, all channels coder)
# -------------------------------------------------------------------------------------------------

def cifar_pnnh(depth: int, *, bottleneck: bool = False, **kwargs) -> PNNHNet:
    """CIFAR-layout PNNH net of ``depth`` weighted layers (6n+2 basic / 9n+2 bottleneck)."""
    return PNNHNet(cifar_layers(depth, bottleneck), bottleneck, layout="cifar", **kwargs)


def imagenet_pnnh(depth: int, **kwargs) -> PNNHNet:
    """ImageNet-layout PNNH-18/34/50/101/152."""
    block, layers = IMAGENET_LAYERS[depth]
    return PNNHNet(layers, block == "bottleneck", layout="imagenet", **kwargs)


def _looks_linear(builder):
    def build(**kwargs):
        for k in ("coder", "coder_ratio"):
            if k in kwargs:
                raise ConfigError(f"llplain models fix {k}; use pnnh* with coder_ratio=1.0 to vary it")
        kwargs.setdefault("path_param", "init")  # the literature's looks-linear net: an init, not a parametrisation
        return builder(coder="mirror", coder_ratio=1.0, **kwargs)

    return build


def _add(name: str, family: str, depth: int, layout: str, builder, doc: str) -> None:
    register_builder(globals(), name, builder, doc, family=family, depth=depth, layout=layout, fixed=("bottleneck",))


def _register_family() -> None:
    for d in (8, 20, 32, 44, 56, 110, 1202):
        _add(f"pnnh{d}", "pnnh", d, "cifar", lambda d=d, **k: cifar_pnnh(d, **k),
             f"PNNH-{d}: ResNet-{d}'s layout as mirrored learner+coder layers, no shortcut.")
        _add(f"llplain{d}", "looks_linear", d, "cifar", _looks_linear(lambda d=d, **k: cifar_pnnh(d, **k)),
             f"Looks-linear plain-{d}: CReLU with mirrored identity init on every channel.")
    for d in (164, 1001):
        _add(f"pnnh{d}", "pnnh", d, "cifar", lambda d=d, **k: cifar_pnnh(d, bottleneck=True, **k),
             f"PNNH-{d}: bottleneck ResNet-{d}'s layout as learner+coder layers, no shortcut.")
        _add(f"llplain{d}", "looks_linear", d, "cifar",
             _looks_linear(lambda d=d, **k: cifar_pnnh(d, bottleneck=True, **k)),
             f"Looks-linear plain-{d} (bottleneck layout).")
    for d in IMAGENET_LAYERS:
        _add(f"pnnh{d}", "pnnh", d, "imagenet", lambda d=d, **k: imagenet_pnnh(d, **k),
             f"PNNH-{d}: ResNet-{d}'s ImageNet layout as learner+coder layers, no shortcut.")
        _add(f"llplain{d}", "looks_linear", d, "imagenet", _looks_linear(lambda d=d, **k: imagenet_pnnh(d, **k)),
             f"Looks-linear plain-{d} (ImageNet layout).")


_register_family()


def _add_cifar_depth(name: str, prefix: str, d: int, bottleneck: bool) -> None:
    builder = lambda **k: cifar_pnnh(d, bottleneck=bottleneck, **k)  # noqa: E731
    family = "pnnh" if prefix == "pnnh" else "looks_linear"
    _add(name, family, d, "cifar", builder if family == "pnnh" else _looks_linear(builder),
         f"{prefix} of depth {d}, CIFAR layout, {'bottleneck' if bottleneck else 'basic'} blocks.")


register_cifar_depths(("pnnh", "llplain"), _add_cifar_depth)


from . import kernels  # noqa: E402  (the CPU training kernels subclass the layer above)
from .coders import CheapCoderConv2d  # noqa: E402  (the cheap coders reuse the layer above)

_LAYERS.update(dict.fromkeys(CHEAP_CODERS, CheapCoderConv2d))
