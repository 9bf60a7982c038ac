"""Training kernels of the PNNH layer (CPU and CUDA): the same function as :meth:`PNNHConv2d.forward`, faster.

The reference layer computes ``relu(mirror(BN(conv(x, W))))`` with ``W = [W_l; W_c]``
(``C_l + C_c`` filters). In training, on CUDA and on CPU in channels_last, it runs as a plain
layer of the full width instead (:class:`TiedPNNHConv2d`)::

    x = conv(x, [W_l; W_c; -W_c])                      # the tied rows: one conv makes e and -e
    x = BN(x) with affine [gamma; gamma_c], [beta; -beta_c]  # the mirror of BN(a), see mirrored_batch_norm
    x = relu(x)

oneDNN computes output channels in blocks of 16, so a conv with ``C_l + C_c`` = 12 or 14 outputs
costs nearly what 16 cost, and PyTorch's channels_last CPU BatchNorm is vectorised at the stage
widths (16/32/64) but not at ``C_l + C_c`` (13.3 ms against 2.6 ms per forward+backward at 12 vs
16 channels, 2 threads, batch 128 at 28x28); the tied form avoids both. On a GPU a small net's
step is bound by kernel launches: the reference layer launches the DiracNet weight, the conv, BN,
the mirror's copies and the ReLU (and their backward) per layer, the tied one a conv, a BN and a
ReLU, as a plain layer does. In a net, the layers' tied weights are computed per shape group in
one stacked call before each forward (:class:`StepWeights`). docs/benchmarks.md has the
measurements; ``PNNH_KERNELS=reference`` turns the kernels off (:func:`kernel_choice`).

The kernel is switched in once: :func:`select_kernels` runs when a PNNH net or layer changes mode
(``.train()``/``.eval()``) or device/dtype/memory format (``.to()``) and swaps each layer's class
between :class:`~pnnh.models.pnnh_cnn.PNNHConv2d` and :class:`TiedPNNHConv2d` (same parameters,
buffers and state dict), as :func:`pnnh.deploy` swaps layers for inference.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import dirac_weight, memory_format
from .pnnh_cnn import PNNHConv2d

__all__ = ["KERNEL_CHOICES", "kernel_choice", "tied_rows", "channels_last_view", "mirrored_batch_norm", "batched_tied_weights", "StepWeights",
           "TiedPNNHConv2d", "select_kernels"]


# torch.compiler.is_compiling is torch >= 2.3; torch._dynamo.is_compiling the same test before it
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


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
        fmt = memory_format(t)  # a channels_last conv weight stays channels_last (else oneDNN reorders it)
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


def tied_rows(t: torch.Tensor, n: int, dim: int = 0, sign: float = -1.0) -> torch.Tensor:
    """``cat(t, sign * t[n:], dim)`` along ``dim`` (rows ``n..C`` repeated with ``sign``), as one op."""
    return _TiedRowsFunction.apply(t, n, dim, sign)


def channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels_last strides when it is contiguous both as NCHW and as NHWC, else ``x``.

    The same memory, element for element (1 channel, or 1x1 pixels). oneDNN picks a convolution's
    output format from the strides of its input and weight; a 1-channel batch keeps NCHW strides
    after ``.contiguous(memory_format=torch.channels_last)``, so without this the stem would write
    NCHW and the next layer would fall off the channels_last path (about 3 % of pnnh56's step).
    """
    if not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    n, c, h, w = x.shape
    return x.as_strided(x.shape, (c * h * w, 1, w * c, c))


@torch.no_grad()
def _link_full_width_stats(bn: nn.BatchNorm2d, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width running statistics ``[mu; -mu_c]``, ``[var; var_c]`` whose heads *are* ``bn``'s.

    ``bn.running_mean``/``running_var`` are re-pointed (``Tensor.set_``: same objects, same
    state-dict shapes) at the start of a full-width storage, so the batch norm of the tied rows
    updates them in place. The mirrored tail is scratch: training normalises with batch statistics
    and :func:`mirrored_batch_norm` in eval rebuilds it, so it may go stale (after
    ``load_state_dict`` or a DDP broadcast) without effect. Concatenating and copying back instead
    cost 12 small ops per layer and step: 4 % of pnnh56's training step on 2 CPU threads.
    """
    rm, rv = bn.running_mean, bn.running_var
    c = bn.num_features
    mean, var = torch.cat([rm, -rm[n:]]), torch.cat([rv, rv[n:]])
    rm.set_(mean.untyped_storage(), 0, (c,), (1,))
    rv.set_(var.untyped_storage(), 0, (c,), (1,))
    return mean, var


def mirrored_batch_norm(e: torch.Tensor, bn: nn.BatchNorm2d, n: int, weight: torch.Tensor, bias: torch.Tensor,
                        stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``cat(BN(a), -BN(a)[:, n:])`` computed as one batch norm of the tied rows ``e = cat(a, -a[:, n:])``.

    The negated channels have batch mean ``-mu`` and the same variance, so normalising ``e`` with
    the tied affine ``weight = [gamma; gamma_c]``, ``bias = [beta; -beta_c]`` is exactly the mirror
    of ``bn(a)``; ``stats`` are the full-width running statistics linked to ``bn``'s
    (:func:`_link_full_width_stats`), which training updates in place. ``bn`` in eval mode (a
    frozen BatchNorm) normalises with its own statistics, mirrored here.
    """
    if not bn.training:
        rm, rv = bn.running_mean, bn.running_var
        stats = torch.cat([rm, -rm[n:]]), torch.cat([rv, rv[n:]])
        return F.batch_norm(e, stats[0], stats[1], weight, bias, False, 0.0, bn.eps)
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return F.batch_norm(e, stats[0], stats[1], weight, bias, True, momentum, bn.eps)


def batched_tied_weights(layers: list[PNNHConv2d]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(W_tied, gamma_tied, beta_tied)`` of every DiracNet-parametrised layer, per group of equal shapes.

    ``W = alpha P + beta V/|V|`` for a whole group in one stacked :func:`dirac_weight` (3 groups in
    a CIFAR net), then the tied rows ``[W_l; W_c; -W_c]`` and BN affine ``[gamma; gamma_c]``,
    ``[beta; -beta_c]`` by :func:`tied_rows`: one autograd node per group instead of a dozen per
    layer. Per-layer weight calls cost pnnh56 ~4 % of its CPU training step (441 vs 419 ms, 2
    threads). In channels_last the stack is taken over ``(C, k, k, C_in)`` views, so each weight
    comes back channels_last, as the conv wants it.
    """
    out: list = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        v = layer.weight
        cl = memory_format(v) is torch.channels_last
        groups.setdefault((tuple(v.shape), layer.n_learn, v.dtype, v.device, cl), []).append(i)
    for (_, n, _, _, cl), idx in groups.items():
        nhwc = (lambda t: t.permute(0, 2, 3, 1)) if cl else (lambda t: t)
        ls = [layers[i] for i in idx]
        w = dirac_weight(torch.stack([nhwc(m.dirac.path) for m in ls]), torch.stack([m.dirac.alpha for m in ls]),
                         torch.stack([nhwc(m.weight) for m in ls]), torch.stack([m.dirac.beta for m in ls]))
        w = tied_rows(w, n, dim=1, sign=-1.0)
        gamma = tied_rows(torch.stack([m.bn.weight for m in ls]), n, dim=1, sign=1.0).unbind(0)
        beta = tied_rows(torch.stack([m.bn.bias for m in ls]), n, dim=1, sign=-1.0).unbind(0)
        for j, (i, wi) in enumerate(zip(idx, w.unbind(0))):
            out[i] = (wi.permute(0, 3, 1, 2) if cl else wi, gamma[j], beta[j])
    return out


class StepWeights:
    """The tied weights of a module's DiracNet layers for one forward, computed before it in one batch.

    Attached to the module that holds the layers as a forward pre-hook (compute) and a forward
    hook that always runs (clear), so the weights live exactly for one call of the module; a layer
    called outside it computes its own.
    """

    def __init__(self, module: nn.Module, layers: list[PNNHConv2d]):
        self.layers = layers
        self.pending: dict[int, tuple] = {}
        self.handles = [module.register_forward_pre_hook(self.compute),
                        module.register_forward_hook(self.clear, always_call=True)]

    def compute(self, module: nn.Module, args) -> None:
        self.pending = {id(m): w for m, w in zip(self.layers, batched_tied_weights(self.layers))}

    def clear(self, module: nn.Module, args, output) -> None:
        self.pending = {}

    def pop(self, layer: PNNHConv2d) -> tuple | None:
        return self.pending.pop(id(layer), None)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


class TiedPNNHConv2d(PNNHConv2d):
    """:class:`PNNHConv2d` in its CPU training form: conv with tied rows -> tied-affine BN -> ReLU.

    Not built directly: :func:`select_kernels` gives a training layer this class and back.
    """

    step_weights: StepWeights | None = None  # set by select_kernels when a net batches its weights
    full_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # bn's running stats, full width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, gamma, beta = self.tied_weights()
        x = F.conv2d(channels_last_view(x), w, None, self.stride, self.padding)
        x = mirrored_batch_norm(x, self.bn, self.n_learn, gamma, beta, self.running_stats())
        x = self.act(x)
        return x

    def tied_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[W_l; W_c; -W_c]``, ``[gamma; gamma_c]``, ``[beta; -beta_c]`` (batched by the net when it can)."""
        step = self.step_weights.pop(self) if self.step_weights is not None else None
        if step is not None:
            return step
        n, bn = self.n_learn, self.bn
        return tied_rows(self.conv_weight(), n), tied_rows(bn.weight, n, sign=1.0), tied_rows(bn.bias, n)

    def running_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-width running statistics, linked again when ``.to()``, ``deepcopy`` or
        ``load_state_dict(assign=True)`` gave ``bn`` new tensors. Under ``torch.compile`` the link
        made when the kernel was selected is taken as it is (the check is a graph break per layer)."""
        rm, rv, full = self.bn.running_mean, self.bn.running_var, self.full_stats
        if full is not None and _is_compiling():
            return full
        if full is None or full[0].data_ptr() != rm.data_ptr() or full[1].data_ptr() != rv.data_ptr():
            self.full_stats = full = _link_full_width_stats(self.bn, self.n_learn)
        return full


# leaves in torch.fx graphs: a trace of a net in its CPU training form records the tied ops as calls
torch.fx.wrap("tied_rows")
torch.fx.wrap("channels_last_view")
torch.fx.wrap("mirrored_batch_norm")


KERNEL_CHOICES = ("auto", "reference")


def kernel_choice() -> str:
    """``$PNNH_KERNELS``: ``auto`` (the default: the training kernels where they apply) or
    ``reference`` (every PNNH layer runs :meth:`PNNHConv2d.forward`, to check or time the kernels)."""
    choice = os.environ.get("PNNH_KERNELS", "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ConfigError(f"PNNH_KERNELS must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    return choice


def _uses_tied_kernel(layer: PNNHConv2d, channels_last: bool) -> bool:
    bn, device = layer.bn, layer.weight.device.type
    return ((device == "cuda" or (device == "cpu" and channels_last)) and layer.training and layer.n_code > 0
            and type(bn) is nn.BatchNorm2d and bn.track_running_stats)


def select_kernels(module: nn.Module) -> int:
    """Give every PNNH layer of ``module`` its kernel for the module's present mode, device and format.

    A layer in training mode with coder channels and a plain ``nn.BatchNorm2d`` with running
    statistics runs :class:`TiedPNNHConv2d` on CUDA (either memory format), and on CPU when the
    module's weights are channels_last (a layer whose weight is contiguous both ways, 1 input
    channel or 1x1, follows the rest); every other layer, and every layer when ``$PNNH_KERNELS``
    is ``reference`` (:func:`kernel_choice`), runs the reference :class:`PNNHConv2d`. The DiracNet layers among
    the tied ones get their weights batched per forward of ``module`` (:class:`StepWeights`).
    Returns the number of tied layers. Subclasses of :class:`PNNHConv2d` keep their own forward.
    """
    layers = [m for m in module.modules() if type(m) in (PNNHConv2d, TiedPNNHConv2d)]
    reference = kernel_choice() == "reference"
    channels_last = any(memory_format(m.weight) is torch.channels_last for m in layers)
    old = module.__dict__.get("_kernel_step_weights")
    if old is not None:
        old.detach()
        module._kernel_step_weights = None
    tied = []
    for m in layers:
        if not reference and _uses_tied_kernel(m, channels_last):
            m.__class__ = TiedPNNHConv2d
            m.step_weights = None
            m.running_stats()  # linked now, so a compiled forward need not check it
            tied.append(m)
        elif type(m) is TiedPNNHConv2d:
            m.__class__ = PNNHConv2d
            for name in ("step_weights", "full_stats"):
                m.__dict__.pop(name, None)
    batched = [m for m in tied if m.dirac is not None]
    if len(batched) > 1:
        module._kernel_step_weights = step = StepWeights(module, batched)
        for m in batched:
            m.step_weights = step
    return len(tied)
