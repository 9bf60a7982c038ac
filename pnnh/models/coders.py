"""Cheap structural coders: PNNH layers whose code rows cost less than a full ``k x k`` conv.

A mirrored PNNH layer (:class:`~pnnh.models.pnnh_cnn.PNNHConv2d`) computes its ``C_c`` code rows
with the same ``k x k`` filters over all input channels as its learner rows. The layers here keep
the learner conv and the mirrored output ``[relu(a_l) | relu(e) | relu(-e)]``, and compute the
code ``e`` with a cheaper operator on the input ``x = [learner | relu(e') | relu(-e')]``::

    a = conv(x, W)                 # k x k, the C_l learner rows (+ rows for code channels the coder adds)
    e = coder(x)                   # the cheap part, below
    y = relu(mirror(BN(cat(a_l, e, a_new))))

The coders (``coder=`` option of ``pnnh*``; :data:`CHEAP_CODERS`):

- ``"pointwise"``: ``e = conv1x1(x)`` (strided), a 1x1 conv over all input channels. Identity at
  init: ``+1`` on ``relu(e'_j)``, ``-1`` on ``relu(-e'_j)`` (so ``e_j = e'_j``).
- ``"depthwise"``: ``e_j = conv_kxk([relu(e'_j), relu(-e'_j)])``, each code channel from its own
  input code pair (a grouped conv, 2 inputs per group). Identity at init: ``+1``/``-1`` at the
  centre tap.
- ``"code_conv"``: ``e = conv_kxk(x_code)``, a ``k x k`` conv over the input's ``2 C_c'`` code channels
  only (the code is its own group; learner channels do not enter it). Identity at init as above.
- ``"fixed"``: ``e_j = relu(e'_j) - relu(-e'_j) = e'_j`` (strided), no weights: the code is
  passed on. This is a *shortcut* of the code channels (a DenseNet-style concatenation of the
  input's code beside the learner computed from it), and
  :func:`~pnnh.analysis.structure.find_residual_connections` reports it: a control, not a plain net.

``depthwise`` and ``fixed`` carry ``min(C_c, C_c')`` channels; the code channels a wider layer adds
(stage transitions) are extra ``k x k`` rows of the learner conv, He-initialised like the mirrored
layer's. ``pointwise`` and ``code_conv`` compute all ``C_c`` code channels (rows beyond the input's
code: He). With ``path_param="dirac"`` (the default, as for the mirrored coder) both the learner
conv and the coder's weight are DiracNet-parametrised, ``W = diag(alpha) P + diag(beta) V/|V|``,
with the identity entries above as ``P``.

Each layer folds into one conv for deployment: :meth:`CheapCoderConv2d.conv_weight` is the dense
``k x k`` equivalent ``[W_l; W_c]`` (the 1x1 or grouped weights placed in a zero kernel), folded
with BN and mirrored as the mirrored layer's (:meth:`PNNHConv2d.folded_weight_bias`). The deployed
conv has the full stage width: the saving is in training, not in the deployed net.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import DiracWeight, _he_, init_dirac_param_, mirror
from .pnnh_cnn import CHEAP_CODERS, CoderSpec, PNNHConv2d

torch.fx.wrap("mirror")  # a leaf in torch.fx graphs (the structure checks trace PNNH nets)

__all__ = ["CheapCoderConv2d", "PointwiseCoder", "DepthwiseCoder", "CodeConvCoder", "FixedCoder", "CHEAP_CODERS"]


class _Coder(nn.Module):
    """The code rows of a :class:`CheapCoderConv2d`: ``forward(x)`` -> ``n_out`` code channels.

    ``x`` is laid out ``[learner (in_ch - 2 in_code) | relu(e') (in_code) | relu(-e') (in_code)]``;
    the output has the layer's stride and spatial size.
    """

    def __init__(self, in_ch: int, in_code: int, n_out: int, kernel_size: int, stride: int):
        super().__init__()
        self.in_ch, self.in_code, self.n_out = in_ch, in_code, n_out
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.n_in_learn = in_ch - 2 * in_code
        self.m = min(n_out, in_code)  # code channels carried from the input (identity at init)

    def pair_columns(self, j: int) -> tuple[int, int]:
        """Input channels of ``relu(e'_j)`` and ``relu(-e'_j)``."""
        return self.n_in_learn + j, self.n_in_learn + self.in_code + j

    def dense_weight(self) -> torch.Tensor:
        """The equivalent ``k x k`` filters over all input channels, ``(n_out, in_ch, k, k)``."""
        raise NotImplementedError


class _WeightedCoder(_Coder):
    """A coder with one weight ``V`` (optionally DiracNet-parametrised with the identity as path)."""

    def __init__(self, in_ch, in_code, n_out, kernel_size, stride, shape: tuple[int, ...], spec: CoderSpec):
        super().__init__(in_ch, in_code, n_out, kernel_size, stride)
        self.weight = nn.Parameter(torch.empty(shape))
        self.dirac = DiracWeight(torch.zeros(shape)) if spec.path_param == "dirac" else None

    def coder_weight(self) -> torch.Tensor:
        if self.dirac is None:
            return self.weight
        return self.dirac(self.weight)

    @torch.no_grad()
    def reset(self, spec: CoderSpec, identity: torch.Tensor, fan_in: int) -> None:
        """``identity`` (the path entries, same shape as the weight) plus He rows beyond the carried
        code; with ``spec.init == "he"`` all He (no path). DiracNet: ``identity`` becomes ``P``."""
        use_path = spec.init != "he" and self.m > 0
        if self.dirac is not None:
            self.dirac.path.copy_(identity if use_path else torch.zeros_like(identity))
            init_dirac_param_(self.weight, spec.path_beta)
            nn.init.ones_(self.dirac.alpha)
            nn.init.constant_(self.dirac.beta, spec.path_beta)
            return
        _he_(self.weight, fan_in)
        if use_path:
            self.weight[: self.m] = identity[: self.m]


class PointwiseCoder(_WeightedCoder):
    """``e = conv1x1(x, W_c)`` with the layer's stride: ``C_c x in_ch`` weights instead of ``x k^2``."""

    def __init__(self, in_ch, in_code, n_code, kernel_size, stride, spec: CoderSpec):
        super().__init__(in_ch, in_code, n_code, kernel_size, stride, (n_code, in_ch, 1, 1), spec)
        identity = torch.zeros(n_code, in_ch, 1, 1)
        for j in range(self.m):
            pos, neg = self.pair_columns(j)
            identity[j, pos], identity[j, neg] = 1.0, -1.0
        self.reset(spec, identity, in_ch)
        if self.dirac is None and spec.mix > 0 and self.n_in_learn > 0 and spec.init != "he":
            with torch.no_grad():  # a short gradient route from the learner channels, as the mirrored coder's
                _he_(self.weight[: self.m, : self.n_in_learn], in_ch, spec.mix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.coder_weight(), None, self.stride)

    def dense_weight(self) -> torch.Tensor:
        k, c = self.kernel_size, self.kernel_size // 2
        w = self.coder_weight()
        dense = w.new_zeros(self.n_out, self.in_ch, k, k)
        dense[:, :, c, c] = w[:, :, 0, 0]
        return dense


class DepthwiseCoder(_WeightedCoder):
    """``e_j = conv_kxk([relu(e'_j), relu(-e'_j)], W_j)``: one ``2 x k x k`` filter per carried code channel."""

    def __init__(self, in_ch, in_code, n_code, kernel_size, stride, spec: CoderSpec):
        m, k = min(n_code, in_code), kernel_size
        super().__init__(in_ch, in_code, m, k, stride, (m, 2, k, k), spec)
        pairs = [col for j in range(m) for col in self.pair_columns(j)]
        self.register_buffer("pairs", torch.tensor(pairs, dtype=torch.long), persistent=False)
        identity = torch.zeros(m, 2, k, k)
        identity[:, 0, k // 2, k // 2], identity[:, 1, k // 2, k // 2] = 1.0, -1.0
        self.reset(spec, identity, 2 * k * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.index_select(1, self.pairs)  # [relu(e'_0), relu(-e'_0), relu(e'_1), ...]: one pair per group
        return F.conv2d(x, self.coder_weight(), None, self.stride, self.padding, 1, self.m)

    def dense_weight(self) -> torch.Tensor:
        k = self.kernel_size
        w = self.coder_weight()
        dense = w.new_zeros(self.n_out, self.in_ch, k, k)
        for j in range(self.m):
            pos, neg = self.pair_columns(j)
            dense[j, pos], dense[j, neg] = w[j, 0], w[j, 1]
        return dense


class CodeConvCoder(_WeightedCoder):
    """``e = conv_kxk(x_code, W_c)``: a ``k x k`` conv over the input's code channels only."""

    def __init__(self, in_ch, in_code, n_code, kernel_size, stride, spec: CoderSpec):
        k = kernel_size
        super().__init__(in_ch, in_code, n_code, k, stride, (n_code, 2 * in_code, k, k), spec)
        q = torch.eye(self.m)
        if spec.init == "orthogonal" and self.m > 0:
            nn.init.orthogonal_(q)
        identity = torch.zeros(n_code, 2 * in_code, k, k)
        identity[: self.m, : self.m, k // 2, k // 2] = q
        identity[: self.m, in_code: in_code + self.m, k // 2, k // 2] = -q
        self.reset(spec, identity, 2 * in_code * k * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.n_in_learn:]
        return F.conv2d(x, self.coder_weight(), None, self.stride, self.padding)

    def dense_weight(self) -> torch.Tensor:
        w = self.coder_weight()
        dense = w.new_zeros(self.n_out, self.in_ch, self.kernel_size, self.kernel_size)
        dense[:, self.n_in_learn:] = w
        return dense


class FixedCoder(_Coder):
    """``e_j = relu(e'_j) - relu(-e'_j) = e'_j`` at the layer's stride: the code passed on, no weights."""

    def __init__(self, in_ch, in_code, n_code, kernel_size, stride, spec: CoderSpec):
        super().__init__(in_ch, in_code, min(n_code, in_code), kernel_size, stride)
        self.pos = slice(self.n_in_learn, self.n_in_learn + self.m)
        self.neg = slice(self.n_in_learn + in_code, self.n_in_learn + in_code + self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return x[:, self.pos, ::s, ::s] - x[:, self.neg, ::s, ::s]

    def dense_weight(self) -> torch.Tensor:
        k, c = self.kernel_size, self.kernel_size // 2
        dense = torch.zeros(self.n_out, self.in_ch, k, k)
        for j in range(self.m):
            pos, neg = self.pair_columns(j)
            dense[j, pos, c, c], dense[j, neg, c, c] = 1.0, -1.0
        return dense


_CODER_MODULES = {"pointwise": PointwiseCoder, "depthwise": DepthwiseCoder, "code_conv": CodeConvCoder,
                  "fixed": FixedCoder}


class CheapCoderConv2d(nn.Module):
    """A PNNH layer with a cheap coder: ``y = relu(mirror(BN(cat(conv(x, W)_l, coder(x), conv(x, W)_new))))``.

    The ``k x k`` conv ``W`` computes the ``C_l`` learner rows and the code channels the coder does
    not (``n_extra``: channels a wider layer adds to a carried code); ``self.coder`` (module
    docstring) computes the rest of the code. The output is laid out as the mirrored layer's,
    ``[relu(a_l) | relu(e) | relu(-e)]``, so layers of either kind read one another.

    Args: as :class:`~pnnh.models.pnnh_cnn.PNNHConv2d`; ``spec.coder`` picks the coder. The input
    must carry a code (``in_code > 0``): in a ``pnnh*`` net the stem is a mirrored layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *,
                 n_code: int | None = None, in_code: int | None = None, spec: CoderSpec | None = None,
                 shared=None):
        super().__init__()
        spec = spec or CoderSpec("pointwise")
        if spec.coder not in _CODER_MODULES:
            raise ConfigError(f"CheapCoderConv2d takes a cheap coder ({', '.join(CHEAP_CODERS)}), got {spec.coder!r}")
        if shared is not None:
            raise ConfigError(f"coder={spec.coder!r} has no stage-shared weight")
        in_ch, out_ch, k = in_channels, out_channels, kernel_size
        n_code, in_code = spec.code_layout(in_ch, out_ch, n_code, in_code)
        if in_code == 0 or n_code == 0:
            raise ConfigError(f"coder={spec.coder!r} carries an input code: it needs in_code > 0 and n_code > 0 "
                              f"(got {in_code} and {n_code}); use a mirrored layer for an image")
        self.in_ch, self.out_ch, self.n_code, self.in_code = in_ch, out_ch, n_code, in_code
        self.n_learn = out_ch - 2 * n_code
        self.stride, self.padding, self.kernel_size = stride, k // 2, k
        self.coder = _CODER_MODULES[spec.coder](in_ch, in_code, n_code, k, stride, spec)
        self.n_extra = n_code - self.coder.n_out
        n_conv = self.n_learn + self.n_extra
        self.weight = nn.Parameter(torch.empty(n_conv, in_ch, k, k))
        self.dirac = DiracWeight(torch.zeros(n_conv, in_ch, k, k)) if spec.path_param == "dirac" else None
        self.bn = nn.BatchNorm2d(self.n_learn + n_code)
        self.act = nn.ReLU(inplace=True)
        self.reset_parameters(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.conv2d(x, self.learner_weight(), None, self.stride, self.padding)
        e = self.coder(x)
        x = torch.cat([a[:, : self.n_learn], e, a[:, self.n_learn:]], 1)
        x = self.bn(x)
        x = mirror(x, self.n_learn)
        x = self.act(x)
        return x

    # -- weights ---------------------------------------------------------------------------------
    def learner_weight(self) -> torch.Tensor:
        """The ``k x k`` rows the layer convolves: ``C_l`` learner rows, then the ``n_extra`` new code rows."""
        if self.dirac is None:
            return self.weight
        return self.dirac(self.weight)

    def conv_weight(self) -> torch.Tensor:
        """``[W_l; W_c]`` as one dense ``k x k`` conv (the coder's weights placed in a zero kernel):
        what the layer computes before BN, as :meth:`PNNHConv2d.conv_weight`."""
        w, n = self.learner_weight(), self.n_learn
        return torch.cat([w[:n], self.coder.dense_weight().to(w), w[n:]], 0)

    @torch.no_grad()
    def reset_parameters(self, spec: CoderSpec) -> None:
        """Learner rows as the mirrored layer's (He; ``learner_init="dirac"``: identity on the input's
        learner channels); new code rows He; the coder's own init (module docstring)."""
        k, c, fan_in = self.kernel_size, self.kernel_size // 2, self.in_ch * self.kernel_size ** 2
        _he_(self.weight, fan_in)
        m_l = min(self.n_learn, self.in_ch - 2 * self.in_code)
        dirac = spec.learner_init == "dirac" and m_l > 0
        path = torch.zeros_like(self.weight)
        if dirac:
            path[:m_l, :m_l, c, c] = torch.eye(m_l)
        if self.dirac is not None:
            self.dirac.path.copy_(path)
            init_dirac_param_(self.weight, spec.path_beta)
            nn.init.ones_(self.dirac.alpha)
            nn.init.constant_(self.dirac.beta, spec.path_beta)
        elif dirac:
            learner = self.weight[:m_l]
            learner.zero_()
            if spec.learner_mix > 0:
                _he_(learner, fan_in, spec.learner_mix)
            learner += path[:m_l]
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        if dirac and spec.learner_bias != 0:
            self.bn.bias[:m_l] = spec.learner_bias

    # the fold of the mirrored layer, on the dense conv_weight(): one conv [s W_l; s W_c; -s W_c] + ReLU
    folded_weight_bias = PNNHConv2d.folded_weight_bias
    as_plain_conv = PNNHConv2d.as_plain_conv

    def extra_repr(self) -> str:
        return (f"{self.in_ch}->{self.out_ch} (learner {self.n_learn}, coder 2x{self.n_code}: "
                f"{type(self.coder).__name__}, {self.n_extra} new rows in the conv), k={self.kernel_size}, "
                f"stride={self.stride}")
