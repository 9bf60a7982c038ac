"""Helpers shared by the PNNH CNN tests: the code each PNNH layer outputs, randomised BN statistics."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_codes(model: nn.Module, x) -> list:
    """The code ``e = relu(e) - relu(-e)`` that each PNNH layer outputs, in forward order."""
    out = []
    hooks = [l.register_forward_hook(lambda mod, i, o: out.append(
        o[:, mod.n_learn:mod.n_learn + mod.n_code] - o[:, mod.n_learn + mod.n_code:])) for l in model.pnnh_layers()]
    model(x)
    for h in hooks:
        h.remove()
    return out


@torch.no_grad()
def randomise_bn(model: nn.Module) -> None:
    """Give every BatchNorm2d non-trivial running statistics and affine weights (fixed seed), so that
    folding BN into a conv is tested on more than the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@torch.no_grad()
def run_folded_layers(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward_features`` recomputed as ``relu(conv(h, W, b))`` per PNNH layer, with each layer's
    BN-folded full-width weight (``folded_weight_bias``); checks each weight's shape on the way."""
    h = x
    for layer in model.pnnh_layers():
        w, b = layer.folded_weight_bias()
        assert w.shape == (layer.out_ch, layer.in_ch, layer.kernel_size, layer.kernel_size)
        h = F.relu(F.conv2d(h, w, b, layer.stride, layer.padding))
    return h
