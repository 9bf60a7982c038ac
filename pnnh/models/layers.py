"""Small building blocks shared by the model families: convs, shortcuts and initialisers."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..errors import ConfigError

__all__ = ["cnn_layout", "cifar_layers", "cifar_depth_is_bottleneck", "IMAGENET_LAYERS", "conv3x3", "conv1x1", "PadShortcut", "ProjectionShortcut", "DropPath", "fold_batchnorm", "PooledClassifierHead", "init_weights", "INITS",
           "DiracWeight", "dirac_weight", "dirac_parametrize", "mirror", "memory_format"]


def cnn_layout(layout: str, layers, width: float, img_size: int | None, stem: str,
               min_width: int = 1) -> tuple[list[int], int, str]:
    """Validate a CIFAR/ImageNet CNN layout; return (stage widths, image size, resolved stem).

    CIFAR: 3 stages of 16/32/64 channels, 28 px by default; ImageNet: 4 stages of 64/128/256/512,
    224 px; ``stem="auto"`` is the CIFAR stem, or for the ImageNet layout ``small`` up to 64 px.
    """
    if layout not in ("cifar", "imagenet"):
        raise ConfigError(f"unknown layout {layout!r}; use 'cifar' or 'imagenet'")
    if width <= 0:
        raise ConfigError(f"width must be positive, got {width}")
    base = (16, 32, 64) if layout == "cifar" else (64, 128, 256, 512)
    if len(layers) != len(base):
        raise ConfigError(f"{layout} layout takes {len(base)} stages, got {len(layers)}")
    widths = [max(min_width, int(round(w * width))) for w in base]
    img_size = img_size or (28 if layout == "cifar" else 224)
    if stem == "auto":
        stem = "cifar" if layout == "cifar" else ("small" if img_size <= 64 else "imagenet")
    return widths, img_size, stem


def cifar_layers(depth: int, bottleneck: bool) -> tuple[int, int, int]:
    """Blocks per stage of a CIFAR-layout net of ``depth`` weighted layers (6n+2 basic, 9n+2 bottleneck)."""
    per, extra = (9, 2) if bottleneck else (6, 2)
    if (depth - extra) % per or depth < per + extra:
        kind = "9n+2 (bottleneck)" if bottleneck else "6n+2 (basic)"
        raise ConfigError(f"CIFAR-layout depth must be {kind}, got {depth}")
    n = (depth - extra) // per
    return (n, n, n)


def cifar_depth_is_bottleneck(depth: int) -> bool | None:
    """For a depth not registered by name: basic blocks when it is 6n+2, else bottleneck blocks when
    it is 9n+2, None when it is neither (He et al. register 164 and 1001 as bottleneck)."""
    if depth >= 8 and (depth - 2) % 6 == 0:
        return False
    if depth >= 11 and (depth - 2) % 9 == 0:
        return True
    return None


# blocks per stage of the ImageNet-layout ResNets (He et al. 2016, table 1), by depth
IMAGENET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                   101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a norm layer follows)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out NHWC (and not also NCHW-contiguous), else contiguous."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class _MirrorFunction(torch.autograd.Function):
    """``cat(a, -a[:, n:], dim=1)`` written once into a buffer in ``a``'s memory format.

    The eager form (``neg`` then ``cat``) makes an extra tensor, and its backward hands the
    convolution a sum of channel slices; here the gradient w.r.t. ``a`` is one dense tensor in
    ``a``'s layout (NCHW or channels_last), ``g[:, :C]`` minus ``g[:, C:]`` on the coder channels.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, n: int) -> torch.Tensor:
        N, C, H, W = a.shape
        fmt = memory_format(a)
        y = torch.empty((N, 2 * C - n, H, W), dtype=a.dtype, device=a.device, memory_format=fmt)
        y[:, :C] = a
        torch.neg(a[:, n:], out=y[:, C:])
        ctx.n, ctx.c, ctx.fmt = n, C, fmt
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        n, C = ctx.n, ctx.c
        grad = g[:, :C].contiguous(memory_format=ctx.fmt)
        grad[:, n:].sub_(g[:, C:])
        return grad, None


def mirror(a: torch.Tensor, n_learn: int) -> torch.Tensor:
    """``cat(a, -a[:, n_learn:], dim=1)``: the learner channels, then the code ``e`` and ``-e``.

    With no coder channels (``n_learn == a.shape[1]``) it is ``a`` itself.
    """
    if n_learn == a.shape[1]:
        return a
    return _MirrorFunction.apply(a, n_learn)


class PadShortcut(nn.Module):
    """He et al.'s CIFAR "option A" shortcut: subsample by ``stride`` and zero-pad channels.

    Parameter-free, which is why ResNet-20 has 0.27M parameters and its plain twin the same.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch
        if self.extra < 0:
            raise ConfigError("PadShortcut cannot reduce channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class ProjectionShortcut(nn.Sequential):
    """"Option B": 1x1 conv + norm, used where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm_layer=nn.BatchNorm2d):
        super().__init__(conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, zero the input of a random fraction ``p`` of the
    samples and scale the others by ``1/(1-p)``; the identity in eval.

    The mask has one entry per sample (``(B, 1, ...)``), so images ``(B, C, H, W)`` and tokens
    ``(B, N, C)`` are dropped whole. Huang et al. 2016 drop without rescaling and scale by the
    survival rate at test time; the "inverted" form used here (as timm) has the same expectation and
    leaves eval untouched.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:  # module state, not data: fx-safe
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3g}"


@torch.no_grad()
def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None,
                   bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight', bias')`` of a conv or linear layer followed by ``bn`` in eval mode, one layer.

    ``s = gamma / sqrt(var + eps)`` per output channel, ``W' = s W`` and ``b' = beta + s (b - mean)``,
    computed in float64 and rounded once to ``weight``'s dtype. ``gamma``/``beta`` default to 1/0
    when ``bn`` has no affine parameters.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError(f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.double() * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


class PooledClassifierHead:
    """The head of a classifier: pool -> dropout -> linear, and the uniform model interface on it.

    Mixed into ``nn.Module`` families that define ``forward_features`` and the attributes
    ``head_drop``, ``num_features`` and ``num_classes``, and the linear layer named
    ``classifier_name`` (``fc`` for CNNs). :meth:`pool` is global pooling of a feature map through
    ``global_pool``; :meth:`init_classifier_` draws the linear layer's weights (normal, std 0.01, zero
    bias). A family overrides the two where its features or init differ (the ViT's tokens).
    """

    classifier_name = "fc"

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.global_pool(x), 1)

    @staticmethod
    def init_classifier_(fc: nn.Linear) -> None:
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        fc = nn.Linear(self.num_features, num_classes)
        self.init_classifier_(fc)
        setattr(self, self.classifier_name, fc)


# ---------------------------------------------------------------------------------------------
# Initialisation. Chosen per model with ``init=``; listed in the README (Models).
# ---------------------------------------------------------------------------------------------

INITS = ("he", "dirac", "dirac_param", "delta_orthogonal")


def _he_(w: torch.Tensor, fan_in: int | None = None, scale: float = 1.0) -> None:
    """Fan-in He normal, ``W ~ N(0, scale^2 * 2/n)`` with ``n = fan_in`` (default: the fan-in of
    ``w`` itself, ``w[0].numel()``; a slice of a layer's weight passes the layer's).

    It keeps the forward second moment through ReLU layers; this is the init under which the PNNH
    paper states its theory.
    """
    fan_in = fan_in or w[0].numel()
    with torch.no_grad():
        w.normal_(0.0, scale * math.sqrt(2.0 / fan_in))


def _dirac_(w: torch.Tensor) -> None:
    """Identity on the first min(in, out) channels (centre tap), He init for extra outputs.

    A plain net initialised this way starts as a chain of per-channel norm+ReLU maps: every
    channel of the input has a path to the output, the "internal path" the PNNH paper argues
    is the essential part of residual learning.
    """
    out_ch, in_ch = w.shape[:2]
    nn.init.dirac_(w)  # sets w[i, i, centre] = 1 for i < min(out, in); zeros elsewhere
    if out_ch > in_ch:
        _he_(w[in_ch:])


def _delta_orthogonal_(w: torch.Tensor) -> None:
    """Delta-orthogonal init (Xiao et al. 2018): an orthogonal matrix at the centre tap."""
    out_ch, in_ch, kh, kw = w.shape
    with torch.no_grad():
        w.zero_()
        q = torch.empty(out_ch, in_ch)
        nn.init.orthogonal_(q, gain=math.sqrt(2.0))
        w[:, :, kh // 2, kw // 2] = q


def _dirac_weight_forward(path, alpha, v, beta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, |V|, beta/|V|)``: rows are the leading ``alpha.dim()`` dims of ``V``, norms over the rest."""
    shape = alpha.shape + (1,) * (v.dim() - alpha.dim())
    norm = torch.linalg.vector_norm(v, dim=tuple(range(alpha.dim(), v.dim())), keepdim=True).clamp_min(1e-12)
    scale = beta.view(shape) / norm
    return torch.addcmul(path * alpha.view(shape), v, scale), norm, scale


class _DiracWeightFunction(torch.autograd.Function):
    """``W = alpha P + (beta / |V|) V`` per filter, with a hand-written backward.

    Autograd of the same expression runs ~20 small ops per layer and step (norm, clamp, div, mul,
    addcmul and their backwards); this runs 9. With ``G = dL/dW``, ``s = beta/|V|``:
    ``dalpha = <G, P>``, ``dbeta = <G, V>/|V|``, ``dV = s (G - (<G, V>/|V|^2) V)``.
    """

    @staticmethod
    def forward(ctx, path, alpha, v, beta):
        w, norm, scale = _dirac_weight_forward(path, alpha, v, beta)
        ctx.save_for_backward(path, v, norm, scale)
        ctx.rows = alpha.dim()
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        path, v, norm, scale = ctx.saved_tensors
        dims = tuple(range(ctx.rows, v.dim()))
        rows = v.shape[:ctx.rows]
        gv = (g * v).sum(dims, keepdim=True)
        d_alpha = (g * path).sum(dims) if ctx.needs_input_grad[1] else None
        d_beta = (gv / norm).view(rows) if ctx.needs_input_grad[3] else None
        d_v = torch.addcmul(g, v, gv / norm.square(), value=-1).mul_(scale) if ctx.needs_input_grad[2] else None
        return None, d_alpha, d_v, d_beta


def dirac_weight(path: torch.Tensor, alpha: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``diag(alpha) P + diag(beta) V/|V|``, one scale pair per output filter (DiracNets).

    ``alpha`` and ``beta`` index the leading dims of ``V`` (``(C,)`` for one conv weight, ``(L, C)``
    for ``L`` stacked ones); the norm is over the rest. Written without reshaping ``V`` (a norm over
    its trailing dims, one ``addcmul``): the result keeps ``V``'s memory format, so a channels_last
    net hands oneDNN channels_last weights; a flattened ``F.normalize`` made NCHW weights that were
    reordered at every conv, which cost pnnh56 7 % of its training step (measured, 2 threads).
    With gradients it runs :class:`_DiracWeightFunction`.
    """
    if torch.is_grad_enabled() and (v.requires_grad or alpha.requires_grad or beta.requires_grad):
        return _DiracWeightFunction.apply(path, alpha, v, beta)
    return _dirac_weight_forward(path, alpha, v, beta)[0]  # plain ops: traceable for export


torch.fx.wrap("dirac_weight")  # a leaf in torch.fx graphs (the structure checks trace PNNH nets)


class DiracWeight(nn.Module):
    """A weight parametrisation (``torch.nn.utils.parametrize``) that keeps an identity path in a conv.

    ``W = diag(alpha) P + diag(beta) V/|V|`` (Zagoruyko & Komodakis 2017, "DiracNets: training very
    deep neural networks without skip-connections"): ``P`` is a fixed kernel (a buffer; the dirac
    identity), ``V`` the trained weight, ``alpha = 1`` and ``beta = 0.1`` per output filter at init.
    Weight decay and large steps on ``V`` cannot erase the path, unlike a dirac *init*. It is still
    one conv at run time, with no addition of activations, and folds like any conv.
    """

    def __init__(self, path: torch.Tensor, beta: float = 0.1):
        super().__init__()
        self.register_buffer("path", path.detach().clone())
        self.alpha = nn.Parameter(torch.ones(path.shape[0]))
        self.beta = nn.Parameter(torch.full((path.shape[0],), float(beta)))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return dirac_weight(self.path, self.alpha, v, self.beta)


@torch.no_grad()
def init_dirac_param_(v: torch.Tensor, norm: float = 0.1) -> None:
    """He directions at filter norm ``norm`` (= beta at init): a step on ``V`` then moves ``W`` as a
    step on ``W`` itself would (``dW = beta/|V| dV``, ``dL/dV = beta/|V| dL/dW``); at He scale
    (``|V|`` ~ 1.4) the features learn about 200x slower (pnnh56: 82.92 % against 88.31 % at one epoch)."""
    _he_(v)
    v.mul_(norm / v.flatten(1).norm(dim=1).clamp_min(1e-12).view((-1,) + (1,) * (v.dim() - 1)))


@torch.no_grad()
def dirac_parametrize(module: nn.Module, path: torch.Tensor | None = None, beta: float = 0.1) -> nn.Module:
    """Register :class:`DiracWeight` on ``module.weight`` (a conv or linear layer); return ``module``.

    ``module.weight`` becomes ``alpha P + beta V/|V|`` per output filter, ``V`` (He directions at
    filter norm ``beta``) stored in ``module.parametrizations.weight.original``. ``path``: the fixed
    kernel ``P`` [the identity on the first ``min(in, out)`` channels at the centre tap; rows
    beyond the inputs carry no path].
    """
    if path is None:
        path = torch.empty_like(module.weight)
        if path.dim() > 2:
            _dirac_(path)
        else:
            nn.init.eye_(path)
        path[path.shape[1]:] = 0  # extra outputs: no identity entry, only V
    parametrize.register_parametrization(module, "weight", DiracWeight(path, beta), unsafe=True)
    init_dirac_param_(module.parametrizations.weight.original, beta)
    return module


def init_weights(model: nn.Module, init: str = "he", skip: tuple[nn.Module, ...] = ()) -> None:
    """Initialise every conv and linear layer of ``model``.

    ``init`` applies to 3x3 (and larger) convolutions except those in ``skip`` (the stem); 1x1
    convs, the stem and the classifier always get He / default init. Norm layers start at
    weight 1, bias 0. ``"dirac_param"`` registers a :class:`DiracWeight` parametrisation on those
    convs (their ``weight`` becomes ``alpha * dirac + beta * V/|V|``, ``V`` in
    ``parametrizations.weight.original``).
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    skip_ids = {id(p) for m in skip for p in m.parameters()}
    for m in list(model.modules()):
        if isinstance(m, nn.Conv2d):
            big = m.kernel_size[0] > 1 and id(m.weight) not in skip_ids
            with torch.no_grad():
                if big and init == "dirac_param" and m.groups == 1:
                    dirac_parametrize(m)
                elif big and init == "dirac" and m.groups == 1:
                    _dirac_(m.weight)
                elif big and init == "delta_orthogonal" and m.groups == 1:
                    _delta_orthogonal_(m.weight)
                else:
                    _he_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            PooledClassifierHead.init_classifier_(m)
