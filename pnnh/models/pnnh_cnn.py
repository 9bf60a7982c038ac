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
(:meth:`PNNHLayer.as_plain_conv`), so a deployed PNNH net is a pure conv-ReLU chain.

Other coders (documented options, measured in ``docs/results/pnnh_ablation.md``):

- ``coder="shared"``: the mirrored layer with one coder weight ``W_c`` shared by every
  same-shape layer of a stage (an unrolled recurrent coder);
- ``coder="tied"``: a tied encoder-decoder coder summed with a full-width learner,
  ``y = relu(BN(W_l x + pad(E^T relu(BN(E x)))))`` — the decoder is the transpose of the encoder,
  there is no identity term.

The ``llplain*`` family (looks-linear plain nets, Balduzzi et al. 2017: CReLU with mirrored
weights, linear at init) is the ``coder_ratio=1`` special case: every channel is coder.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import register_builder, register_resolver
from .layers import PooledClassifierHead, cnn_layout, dirac_weight, init_dirac_param_

__all__ = ["mirror", "tied_rows", "PNNHLayer", "TiedCoderLayer", "PNNHBlock", "PNNHNet", "CoderSpec", "CODERS", "CODER_INITS",
           "cifar_pnnh", "imagenet_pnnh"]

CODERS = ("mirror", "shared", "tied")
CODER_INITS = ("identity", "orthogonal", "he")
LEARNER_INITS = ("he", "dirac")
PATH_PARAMS = ("auto", "init", "dirac")


def _he_(w: torch.Tensor, fan_in: int, scale: float = 1.0) -> None:
    with torch.no_grad():
        w.normal_(0.0, scale * math.sqrt(2.0 / fan_in))


class _MirrorFunction(torch.autograd.Function):
    """``cat(a, -a[:, n:], dim=1)`` written once into a buffer in ``a``'s memory format.

    The eager form (``neg`` then ``cat``) makes an extra tensor, and its backward hands the
    convolution a sum of channel slices; here the gradient w.r.t. ``a`` is one dense tensor in
    ``a``'s layout (NCHW or channels_last), ``g[:, :C]`` minus ``g[:, C:]`` on the coder channels.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, n: int) -> torch.Tensor:
        N, C, H, W = a.shape
        channels_last = _memory_format(a) is torch.channels_last
        y = torch.empty((N, 2 * C - n, H, W), dtype=a.dtype, device=a.device,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        y[:, :C] = a
        torch.neg(a[:, n:], out=y[:, C:])
        ctx.n, ctx.c, ctx.channels_last = n, C, channels_last
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        n, C = ctx.n, ctx.c
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        grad = g[:, :C].contiguous(memory_format=fmt)
        grad[:, n:].sub_(g[:, C:])
        return grad, None


def mirror(a: torch.Tensor, n_learn: int) -> torch.Tensor:
    """``cat(a, -a[:, n_learn:], dim=1)``: learner channels, then the code ``e`` and ``-e``."""
    return _MirrorFunction.apply(a, n_learn)


torch.fx.wrap("mirror")  # a leaf in torch.fx graphs (the structure checks trace PNNH nets)
torch.fx.wrap("dirac_weight")  # likewise for the imported name (fx.wrap patches this module's globals)


class _TiedRowsFunction(torch.autograd.Function):
    """``cat(t, sign * t.narrow(dim, n, C - n), dim)`` written once into one buffer (``t``'s memory format).

    The tied rows of a mirrored layer (``[W_l; W_c; -W_c]``, BN's ``[gamma; gamma_c]`` and
    ``[beta; -beta_c]``) for a whole stack of layers at once; the backward folds the tied rows'
    gradient back onto ``t`` in one dense tensor. As ``slice``/``neg``/``cat`` per layer these were
    ~20 autograd nodes per layer and step (a profile of pnnh110 put them at 3 % of the step).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, n: int, dim: int, sign: float) -> torch.Tensor:
        c = t.shape[dim]
        shape = list(t.shape)
        shape[dim] = 2 * c - n
        fmt = _memory_format(t)  # a channels_last conv weight stays channels_last (else oneDNN reorders it)
        y = torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=fmt)
        y.narrow(dim, 0, c).copy_(t)
        tail = y.narrow(dim, c, c - n)
        tail.copy_(t.narrow(dim, n, c - n))
        if sign < 0:
            tail.neg_()
        ctx.n, ctx.c, ctx.dim, ctx.sign, ctx.fmt = n, c, dim, sign, fmt
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        n, c, dim = ctx.n, ctx.c, ctx.dim
        grad = g.narrow(dim, 0, c).clone(memory_format=ctx.fmt)
        grad.narrow(dim, n, c - n).add_(g.narrow(dim, c, c - n), alpha=ctx.sign)
        return grad, None, None, None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def tied_rows(t: torch.Tensor, n: int, dim: int = 0, sign: float = -1.0) -> torch.Tensor:
    """``cat(t, sign * t[n:], dim)`` along ``dim`` (rows ``n..C`` repeated with ``sign``), as one op."""
    return _TiedRowsFunction.apply(t, n, dim, sign)


def _channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (contiguous as NCHW *and* as channels_last: 1 channel or 1x1) with channels_last strides.

    The same memory, element for element. oneDNN picks a convolution's output format from the
    strides of its input and weight; a 1-channel batch keeps NCHW strides after
    ``.contiguous(memory_format=torch.channels_last)`` (already "contiguous"), and the expanded
    weight of :meth:`PNNHLayer.forward` is a fresh NCHW tensor, so without this the stem would
    write NCHW and the next layer would fall off the channels_last path.
    """
    n, c, h, w = x.shape
    return x.as_strided(x.shape, (c * h * w, 1, w * c, c))


class CoderSpec:
    """The coder options shared by every layer of a net (a plain record, validated once)."""

    def __init__(self, coder: str = "mirror", ratio: float = 0.25, init: str = "identity", mix: float = 0.1,
                 learner_init: str = "dirac", learner_mix: float = 0.0, learner_bias: float = 0.0,
                 path_param: str = "auto"):
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
        if path_param == "auto":  # the mirrored coder keeps its path in the parametrisation (docs/pnnh.md)
            path_param = "dirac" if coder == "mirror" else "init"
        if path_param == "dirac" and coder != "mirror":
            raise ConfigError("path_param='dirac' needs coder='mirror' (one weight per layer to reparametrise)")
        self.learner_mix, self.learner_bias, self.path_param = learner_mix, learner_bias, path_param

    def split(self, width: int) -> tuple[int, int]:
        """(learner, coder) channels of a layer whose output is ``width`` channels wide."""
        n_code = int(round(self.ratio * width / 2))
        return width - 2 * n_code, n_code


class _WeightHolder(nn.Module):
    """Owns one coder weight shared by several layers (the layers refer to it, unregistered)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class PNNHLayer(nn.Module):
    """One mirrored PNNH layer: ``cat(relu(a_l), relu(a_c), relu(-a_c))`` with ``a = BN(conv(x))``.

    Args:
        in_ch: input channels.
        out_ch: output channels (the width): ``n_learn + 2 * n_code``.
        n_code: coder channels ``C_c`` (``relu(e)`` and ``relu(-e)`` each take ``C_c`` outputs).
        in_code: coder channels of the *input* (its layout is ``[learner | relu(e) | relu(-e)]``);
            0 when the input carries no code (the image).
        kernel_size, stride: of the convolution (padding keeps the size at stride 1).
        spec: coder options (init and mix; see :class:`CoderSpec`).
        shared: a :class:`_WeightHolder` whose weight is this layer's coder weight (stage-shared
            coder); ``None`` for a layer owning its own weights.

    Output channel layout: ``[learner (C_l) | relu(e) (C_c) | relu(-e) (C_c)]``.
    """

    def __init__(self, in_ch: int, out_ch: int, n_code: int, in_code: int = 0, kernel_size: int = 3,
                 stride: int = 1, spec: CoderSpec | None = None, shared: _WeightHolder | None = None):
        super().__init__()
        spec = spec or CoderSpec()
        if 2 * n_code > out_ch or 2 * in_code > in_ch:
            raise ConfigError(f"coder channels do not fit: 2*{n_code} > {out_ch} or 2*{in_code} > {in_ch}")
        self.in_ch, self.out_ch, self.n_code, self.in_code = in_ch, out_ch, n_code, in_code
        self.n_learn = out_ch - 2 * n_code
        self.stride, self.padding, self.kernel_size = stride, kernel_size // 2, kernel_size
        n_conv = self.n_learn + n_code
        k = kernel_size
        if shared is None:
            self.weight = nn.Parameter(torch.empty(n_conv, in_ch, k, k))
            self.__dict__["_shared"] = None
        else:
            if tuple(shared.weight.shape) != (n_code, in_ch, k, k):
                raise ConfigError("shared coder weight has the wrong shape for this layer")
            self.weight = nn.Parameter(torch.empty(self.n_learn, in_ch, k, k))
            self.__dict__["_shared"] = shared  # referenced, not registered: one copy in the state dict
        if spec.path_param == "dirac":
            # W = diag(alpha) P + diag(beta) V / |V| (DiracNets): P, the fixed internal-path kernel, is a buffer
            self.register_buffer("path", torch.zeros(n_conv, in_ch, k, k))
            self.path_scale = nn.Parameter(torch.ones(n_conv))
            self.weight_scale = nn.Parameter(torch.full((n_conv,), 0.1))
        self.bn = nn.BatchNorm2d(n_conv)
        self.act = nn.ReLU(inplace=True)
        self.reset_parameters(spec)

    # -- weights ---------------------------------------------------------------------------------
    def conv_weight(self) -> torch.Tensor:
        """``[W_l; W_c]``: the ``C_l + C_c`` trained filters (one tensor, possibly a shared part)."""
        if "path" in self._buffers:  # path_param="dirac"
            w = self.__dict__.get("_step_weight")  # computed for this forward by the net, with its peers
            if w is not None:
                return w
            step = self.__dict__.get("_step_tied")  # likewise, as tied rows: the first C_l + C_c are W
            if step is not None:
                return step[0][: self.n_learn + self.n_code]
            return dirac_weight(self.path, self.path_scale, self.weight, self.weight_scale)
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
        if "path" in self._buffers:
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
            self.path.copy_(path)
            # V's filters start at norm beta = 0.1, so a step on V moves W as a step on W itself would
            # (dW = beta/|V| * dV, and dL/dV = beta/|V| * dL/dW); at He scale (|V| ~ 1.4) the learner
            # learns 200x slower: 82.92 % against 88.31 % at norm 0.1 after one epoch (pnnh56, seed 0)
            init_dirac_param_(self.weight, 0.1)
            nn.init.ones_(self.path_scale)
            nn.init.constant_(self.weight_scale, 0.1)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        if dirac and spec.learner_bias != 0:
            # BN shift of the identity rows: relu(BN(x) + b) with x >= 0 passes every x > 0 once
            # b >= mean/std of x, so the learner path is not thinned by half at each layer at init
            # (pnnh56 at init, scripts/learner_density.py: 3.4 % of learner units active in the last layer at
            # b=0, 53 % at b=0.5). It trains worse (docs/pnnh.md): an option to study, not a remedy.
            self.bn.bias[:m_l] = spec.learner_bias

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``cat(relu(a_l), relu(a_c), relu(-a_c))`` with ``a = BN(conv(x, [W_l; W_c]))``, two ways.

        Training on CPU in channels_last: one conv with the tied rows ``[W_l; W_c; -W_c]``, then a
        BatchNorm with the tied affine (:meth:`_mirrored_bn`) and a ReLU: the conv-BN-ReLU of a plain
        layer of the full width. oneDNN computes output channels in blocks of 16, so a conv with
        ``C_l + C_c`` = 12 or 14 outputs costs nearly what 16 cost, and channels_last BatchNorm at
        widths that are not multiples of 16 falls to a slow kernel; the tied conv avoids both
        (measured: pnnh56/resnet56 training 0.66x -> 1.02x at two threads, docs/benchmarks.md).
        Elsewhere (NCHW, CUDA, eval): conv to ``C_l + C_c`` channels, BN, then :func:`mirror` —
        fewer FLOPs. Both compute the same function.
        """
        if self.n_code == 0:
            return self.act(self.bn(F.conv2d(x, self.conv_weight(), None, self.stride, self.padding)))
        if self._expanded_bn_is_faster(x):
            if x.is_contiguous():  # also NCHW-contiguous (1 channel): make the strides say channels_last
                x = _channels_last_view(x)
            step = self.__dict__.get("_step_tied")  # the net expanded every layer's rows in a few ops
            if step is not None:
                w, gamma, beta = step
            else:  # the tied rows [W_l; W_c; -W_c]: one conv makes e and -e
                w = self.conv_weight()
                w, gamma, beta = torch.cat([w, -w[self.n_learn:]]), None, None
            return self.act(self._mirrored_bn(F.conv2d(x, w, None, self.stride, self.padding), gamma, beta))
        a = F.conv2d(x, self.conv_weight(), None, self.stride, self.padding)
        return self.act(mirror(self.bn(a), self.n_learn))

    def _expanded_bn_is_faster(self, x: torch.Tensor) -> bool:
        # training on CPU in channels_last, with a plain BatchNorm (a SyncBatchNorm must run itself;
        # torch.fx tracing sees the reference path). An input that is both NCHW- and
        # channels_last-contiguous (the stem's 1-channel image) counts as channels_last: taking the
        # reference path there cost about 3 % of pnnh56's step (docs/benchmarks.md).
        return (not isinstance(x, torch.fx.Proxy) and self.bn.training and type(self.bn) is nn.BatchNorm2d
                and self.bn.track_running_stats and x.device.type == "cpu"
                and x.is_contiguous(memory_format=torch.channels_last))

    def _mirrored_bn(self, e: torch.Tensor, weight: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """``cat(BN(a), -BN(a)[:, n:])`` computed as a batch norm of ``e = cat(a, -a[:, n:])``.

        The negated channels have batch mean ``-mu`` and the same variance, so normalising ``e``
        with the tied affine ``(gamma, beta)`` on ``a`` and ``(gamma_c, -beta_c)`` on ``-a_c`` is
        exactly the mirror of ``BN(a)``: one BatchNorm (``self.bn``, over ``a``'s ``C_l + C_c``
        channels, whose running statistics are updated here) whatever path computes it. PyTorch's
        channels_last CPU BatchNorm is vectorised at the stage widths (16/32/64) but not at
        ``C_l + C_c`` (14/28/56 at the default ratio, 12/24/48 at 0.5): measured 13.3 ms against
        2.6 ms per forward+backward at 12 vs 16 channels, 2 threads, batch 128 at 28x28.
        """
        bn, n = self.bn, self.n_learn
        if weight is None:  # else the tied affine, expanded by the net for all its layers at once
            weight, bias = torch.cat([bn.weight, bn.weight[n:]]), torch.cat([bn.bias, -bn.bias[n:]])
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        mean, var = self._full_width_running_stats()
        return F.batch_norm(e, mean, var, weight, bias, True, momentum, bn.eps)

    @torch.no_grad()
    def _full_width_running_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width running-statistics tensors whose first ``C_l + C_c`` entries *are* ``bn``'s.

        ``bn.running_mean``/``running_var`` are re-pointed (``Tensor.set_``, same objects, same
        state-dict shapes) at the start of a full-width storage, so the batch norm of ``e`` updates
        them in place. The mirrored tail is the kernel's scratch: in training BN normalises with
        batch statistics, and eval reads only the first ``C_l + C_c``, so the tail is never read and
        may go stale (after ``load_state_dict`` or a DDP broadcast) without effect. Building the
        full-width statistics by concatenation and copying them back cost 12 small ops per layer
        and step: 4 % of pnnh56's training step on 2 CPU threads (measured against this).
        ``.to()``, ``deepcopy`` or ``load_state_dict(assign=True)`` give the module new tensors;
        the pointer check notices and links them again.
        """
        bn, n = self.bn, self.n_learn
        rm, rv = bn.running_mean, bn.running_var
        full = self.__dict__.get("_full_stats")
        if full is not None and full[0].data_ptr() == rm.data_ptr() and full[1].data_ptr() == rv.data_ptr():
            return full
        c = bn.num_features
        mean, var = torch.cat([rm, -rm[n:]]), torch.cat([rv, rv[n:]])
        rm.set_(mean.untyped_storage(), 0, (c,), (1,))
        rv.set_(var.untyped_storage(), 0, (c,), (1,))
        self.__dict__["_full_stats"] = (mean, var)  # not a buffer: the state dict keeps bn's shapes
        return mean, var

    @torch.no_grad()
    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent plain conv of this layer in eval mode: ``(weight, bias)`` such that
        ``layer(x) == relu(conv2d(x, weight, bias, stride, padding))``.

        BN (running statistics) is folded into the conv: ``s = gamma / sqrt(var + eps)``,
        rows ``[s_l W_l; s_c W_c; -s_c W_c]`` and bias ``[b_l; b_c; -b_c]`` with
        ``b = beta - s * mean``. The tied rows are the coder's weight sharing made explicit.
        """
        w = self.conv_weight()
        bn = self.bn
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        wf = w * s.view(-1, 1, 1, 1)
        bf = bn.bias - s * bn.running_mean
        n = self.n_learn
        return torch.cat([wf, -wf[n:]], 0).clone(), torch.cat([bf, -bf[n:]], 0).clone()

    @torch.no_grad()
    def as_plain_conv(self) -> nn.Sequential:
        """This layer (eval mode) as ``Sequential(Conv2d, ReLU)``: the protocol :func:`pnnh.deploy` uses."""
        w, b = self.folded_weight_bias()
        conv = nn.Conv2d(self.in_ch, w.shape[0], self.kernel_size, self.stride, self.padding, bias=True)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return nn.Sequential(conv, nn.ReLU(inplace=True))

    def extra_repr(self) -> str:
        shared = ", shared coder" if self._shared is not None else ""
        return (f"{self.in_ch}->{self.out_ch} (learner {self.n_learn}, coder 2x{self.n_code}), "
                f"k={self.kernel_size}, stride={self.stride}{shared}")


def batched_dirac_weights(layers: list[PNNHLayer], tied: bool = False) -> list:
    """``conv_weight()`` of every ``path_param="dirac"`` layer, computed per group of equal shapes.

    One stacked :func:`dirac_weight` per group (3 in a CIFAR net) instead of one per layer: the same
    values, about 15 ops per group instead of 9 per layer. Per-layer calls cost pnnh56 ~4 % of its
    CPU training step (measured: 441 vs 419 ms with the same weights as leaves, 2 threads). In
    channels_last the stack is taken over ``(C, k, k, C_in)`` views, so each weight comes back
    channels_last, as the conv wants it.

    With ``tied=True`` each entry is ``(W_tied, gamma_tied, beta_tied)`` instead: the tied-row conv
    weight ``[W_l; W_c; -W_c]`` and BN affine ``[gamma; gamma_c]``, ``[beta; -beta_c]`` of the
    training fast path (:meth:`PNNHLayer.forward`), expanded per group by :func:`tied_rows`.
    """
    out: list = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        v = layer.weight
        cl = _memory_format(v) is torch.channels_last
        groups.setdefault((tuple(v.shape), layer.n_learn, v.dtype, v.device, cl), []).append(i)
    for (_, n, _, _, cl), idx in groups.items():
        if len(idx) == 1 and not tied:
            out[idx[0]] = layers[idx[0]].conv_weight()
            continue
        nhwc = (lambda t: t.permute(0, 2, 3, 1)) if cl else (lambda t: t)
        ls = [layers[i] for i in idx]
        w = dirac_weight(torch.stack([nhwc(m.path) for m in ls]), torch.stack([m.path_scale for m in ls]),
                         torch.stack([nhwc(m.weight) for m in ls]), torch.stack([m.weight_scale for m in ls]))
        if tied:
            w = tied_rows(w, n, dim=1, sign=-1.0)
            gamma = tied_rows(torch.stack([m.bn.weight for m in ls]), n, dim=1, sign=1.0).unbind(0)
            beta = tied_rows(torch.stack([m.bn.bias for m in ls]), n, dim=1, sign=-1.0).unbind(0)
        for j, (i, wi) in enumerate(zip(idx, w.unbind(0))):
            wi = wi.permute(0, 3, 1, 2) if cl else wi
            out[i] = (wi, gamma[j], beta[j]) if tied else wi
    return out


class TiedCoderLayer(nn.Module):
    """Tied encoder-decoder coder summed with a learner (``coder="tied"``).

    ``y = relu(BN(W_l x + pad(E^T relu(BN_e(E x)))))``: the learner ``W_l`` (``k x k``, all
    ``out_ch`` outputs) plus a 1x1 encoder ``E`` (``in_ch -> n_code``, carrying the stride) whose
    decoder is its transpose ``E^T`` (``n_code -> in_ch``), zero-padded (or cut) to ``out_ch``.
    No identity term: the coder is a parametric branch. It has an inner ReLU, so it does not
    fold into one conv (:meth:`as_plain_conv` raises).
    """

    def __init__(self, in_ch: int, out_ch: int, n_code: int, in_code: int = 0, kernel_size: int = 3,
                 stride: int = 1, spec: CoderSpec | None = None, shared=None):
        super().__init__()
        spec = spec or CoderSpec(coder="tied")
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


_LAYERS = {"mirror": PNNHLayer, "shared": PNNHLayer, "tied": TiedCoderLayer}


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
            layers.append(_LAYERS[spec.coder](c_in, c_out, n_code, code_in, k, s, spec, holder))
            c_in, code_in = c_out, (n_code if spec.coder != "tied" else 0)
        self.layers = nn.Sequential(*layers)
        self.out_code = code_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PNNHNet(PooledClassifierHead, nn.Module):
    """A PNNH CNN with the layout of a ResNet twin (same stages, widths, convolutions; no shortcut).

    Args:
        layers: blocks per stage, e.g. ``(9, 9, 9)`` for the twin of ResNet-56.
        bottleneck: bottleneck blocks (1x1-3x3-1x1, x4) instead of basic (3x3-3x3).
        layout: ``"cifar"`` (16/32/64) or ``"imagenet"`` (64/128/256/512).
        coder: ``"mirror"`` (default), ``"shared"`` (coder weights shared by the same-shape layers
            of a stage) or ``"tied"`` (tied encoder-decoder summed with the learner).
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
            ``alpha = 1`` and ``beta = 0.1`` at init (1-D, so no weight decay). Still one conv per
            layer; it folds like any other (``deploy``). ``"init"``: the path is only where the
            weights *start* and training may move it. ``"auto"``
            (default): ``"dirac"`` for the mirrored coder, chosen by ``pnnh ablate`` (5 epochs, depth
            56, 3 seeds: docs/pnnh.md), ``"init"`` for ``shared``/``tied``, which it does not support.
        width: multiplier on the stage widths.
        stem: ``"auto"``, ``"cifar"`` (3x3 s1), ``"small"`` (3x3 s1, ImageNet layout) or
            ``"imagenet"`` (7x7 s2 + max-pool). The stem is a PNNH layer: it makes the first code.
    """

    def __init__(self, layers, bottleneck: bool = False, *, layout: str = "cifar", num_classes: int = 10,
                 in_chans: int = 1, width: float = 1.0, coder: str = "mirror", coder_ratio: float = 0.25,
                 coder_init: str = "identity", coder_mix: float = 0.1, learner_init: str = "dirac",
                 learner_mix: float = 0.0, learner_bias: float = 0.0, path_param: str = "auto", stem: str = "auto",
                 img_size: int | None = None,
                 drop_rate: float = 0.0):
        super().__init__()
        spec = CoderSpec(coder, coder_ratio, coder_init, coder_mix, learner_init, learner_mix, learner_bias, path_param)
        widths, img_size, stem = cnn_layout(layout, layers, width, img_size, stem, min_width=2)
        if stem not in ("cifar", "small", "imagenet"):
            raise ConfigError(f"unknown stem {stem!r}; use auto, cifar, small or imagenet")
        self.num_classes, self.in_chans, self.layout, self.stem_kind = num_classes, in_chans, layout, stem
        self.coder, self.coder_ratio = coder, coder_ratio
        self.drop_rate = drop_rate

        stem_ch = widths[0]
        stem_code = spec.split(stem_ch)[1] if coder != "tied" else 0  # a tied net carries no mirrored code
        stem_spec = CoderSpec("mirror", coder_ratio, coder_init, coder_mix, learner_init, learner_mix, learner_bias,
                              spec.path_param)  # as resolved for the net's coder
        if stem == "imagenet":
            self.stem = nn.Sequential(PNNHLayer(in_chans, stem_ch, stem_code, 0, 7, 2, stem_spec),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(PNNHLayer(in_chans, stem_ch, stem_code, 0, 3, 1, stem_spec))
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
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.default_cfg = dict(input_size=(in_chans, img_size, img_size), num_classes=num_classes, layout=layout)
        # the path_param="dirac" layers (a plain list, not submodules: they are registered above)
        self.__dict__["_dirac_layers"] = [m for m in self.pnnh_layers() if "path" in m._buffers]

    # -- uniform interface ---------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """All blocks in forward order (one per residual block of the twin)."""
        return [b for stage in self.stages for b in stage]

    def pnnh_layers(self) -> list[nn.Module]:
        """Every PNNH layer (stem first) in forward order."""
        return [m for m in self.modules() if isinstance(m, (PNNHLayer, TiedCoderLayer))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.__dict__["_dirac_layers"]
        if not layers or not torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy):
            return self.stages(self.stem(x))
        # training: every layer's W = alpha P + beta V/|V| for this step, in a few stacked ops; on
        # the CPU fast path (PNNHLayer.forward) also its tied rows and BN affine, expanded likewise
        bn = layers[0].bn
        tied = (x.device.type == "cpu" and bn.training and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats and layers[-1].weight.is_contiguous(memory_format=torch.channels_last))
        key = "_step_tied" if tied else "_step_weight"
        for layer, w in zip(layers, batched_dirac_weights(layers, tied)):
            layer.__dict__[key] = w
        try:
            return self.stages(self.stem(x))
        finally:
            for layer in layers:
                layer.__dict__[key] = None



# -------------------------------------------------------------------------------------------------
# Registered entry points: pnnh* (default coder) and llplain* (looks-linear, all channels coder)
# -------------------------------------------------------------------------------------------------

def _cifar_layers(depth: int, bottleneck: bool) -> tuple[int, int, int]:
    from .resnet import _cifar_layers as layers

    return layers(depth, bottleneck)


_IMAGENET = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
             101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}


def cifar_pnnh(depth: int, *, bottleneck: bool = False, **kwargs) -> PNNHNet:
    """CIFAR-layout PNNH net of ``depth`` weighted layers (6n+2 basic / 9n+2 bottleneck)."""
    return PNNHNet(_cifar_layers(depth, bottleneck), bottleneck, layout="cifar", **kwargs)


def imagenet_pnnh(depth: int, **kwargs) -> PNNHNet:
    """ImageNet-layout PNNH-18/34/50/101/152."""
    bottleneck, layers = _IMAGENET[depth]
    return PNNHNet(layers, bottleneck, layout="imagenet", **kwargs)


def _looks_linear(builder):
    def build(**kwargs):
        for k in ("coder", "coder_ratio"):
            if k in kwargs:
                raise ConfigError(f"llplain models fix {k}; use pnnh* with coder_ratio=1.0 to vary it")
        kwargs.setdefault("path_param", "init")  # the literature's looks-linear net: an init, not a parametrisation
        return builder(coder="mirror", coder_ratio=1.0, **kwargs)

    return build


def _register_family() -> None:
    def add(name, family, depth, layout, builder, doc):
        register_builder(globals(), name, builder, doc, family=family, depth=depth, layout=layout, fixed=("bottleneck",))

    for d in (8, 20, 32, 44, 56, 110, 1202):
        add(f"pnnh{d}", "pnnh", d, "cifar", lambda d=d, **k: cifar_pnnh(d, **k),
            f"PNNH-{d}: ResNet-{d}'s layout as mirrored learner+coder layers, no shortcut.")
        add(f"llplain{d}", "looks_linear", d, "cifar", _looks_linear(lambda d=d, **k: cifar_pnnh(d, **k)),
            f"Looks-linear plain-{d}: CReLU with mirrored identity init on every channel.")
    for d in (164, 1001):
        add(f"pnnh{d}", "pnnh", d, "cifar", lambda d=d, **k: cifar_pnnh(d, bottleneck=True, **k),
            f"PNNH-{d}: bottleneck ResNet-{d}'s layout as learner+coder layers, no shortcut.")
        add(f"llplain{d}", "looks_linear", d, "cifar",
            _looks_linear(lambda d=d, **k: cifar_pnnh(d, bottleneck=True, **k)),
            f"Looks-linear plain-{d} (bottleneck layout).")
    for d in _IMAGENET:
        add(f"pnnh{d}", "pnnh", d, "imagenet", lambda d=d, **k: imagenet_pnnh(d, **k),
            f"PNNH-{d}: ResNet-{d}'s ImageNet layout as learner+coder layers, no shortcut.")
        add(f"llplain{d}", "looks_linear", d, "imagenet", _looks_linear(lambda d=d, **k: imagenet_pnnh(d, **k)),
            f"Looks-linear plain-{d} (ImageNet layout).")


_register_family()


@register_resolver
def _any_cifar_depth(name: str) -> bool:
    """``pnnh14``, ``llplain26`` ...: every valid CIFAR depth resolves by name."""
    import re

    from .resnet import cifar_depth_is_bottleneck

    m = re.fullmatch(r"(pnnh|llplain)(\d+)", name)
    bottleneck = cifar_depth_is_bottleneck(int(m[2])) if m else None
    if bottleneck is None:
        return False
    d = int(m[2])
    builder = lambda **k: cifar_pnnh(d, bottleneck=bottleneck, **k)  # noqa: E731
    family = "pnnh" if m[1] == "pnnh" else "looks_linear"
    register_builder(globals(), name, builder if family == "pnnh" else _looks_linear(builder),
                     f"{m[1]} of depth {d}, CIFAR layout, {'bottleneck' if bottleneck else 'basic'} blocks.",
                     family=family, depth=d, layout="cifar", fixed=("bottleneck",))
    return True
