"""DISTS (Ding, Ma, Wang & Simoncelli 2020), only from weight files the user already has.

DISTS compares two images through a pretrained VGG16: at the input and after each of five VGG
stages (max-pooling replaced by L2 pooling), it combines a *structure* term (SSIM-like
correlation of feature maps) and a *texture* term (equality of feature-map means), weighted by
learnt per-channel weights ``alpha``/``beta``. 0 means identical.

pnnh never downloads anything. :func:`load_dists` takes two local files:

- VGG16 weights: a state dict of torchvision's ``vgg16`` (``features.0.weight`` ...) or of its
  ``features`` alone (``0.weight`` ...), as safetensors, or as a ``.pth``/``.pt`` file read with
  ``torch.load(weights_only=True)`` (PyTorch's restricted loader; it cannot run code);
- DISTS weights: the official ``weights.pt`` (``alpha`` and ``beta``, 1×1475×1×1 each) or the
  same tensors in safetensors.

Feature maps are not images, so to compare a layer with the input we map the layer's activation
to a grayscale image: the mean over channels, resized to the comparison size; both it and the
input are min-max normalised per image to [0, 1] and repeated to 3 channels. This mapping is our
choice (the PNNH paper's exact protocol is not public).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["DISTS", "load_dists", "to_gray_image", "VGG16_CFG", "DISTS_CHANNELS"]

#: torchvision's VGG16 ``features``: conv widths and "M" for the four max-pools DISTS replaces
#: (the fifth, after the last conv, is unused).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)

_HELP = ("DISTS needs two local files: --dists-vgg (VGG16 ImageNet weights, e.g. torchvision's "
         "vgg16-397923af.pth or a safetensors copy) and --dists-weights (DISTS alpha/beta, the official "
         "weights.pt). pnnh never downloads them.")


class L2Pool(nn.Module):
    """DISTS' anti-aliased L2 pooling: ``sqrt(hann3x3 * x²)`` with stride 2 (replaces VGG max-pooling)."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.hann_window(5, periodic=False, dtype=torch.float64)[1:-1]  # [0.5, 1, 0.5]
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum()).float()[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x ** 2, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS distance between batches of RGB images in [0, 1] (N×3×H×W); returns N distances."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        stages: list[nn.Sequential] = []
        in_ch = 3
        for v in VGG16_CFG:
            if v == "M":
                stages.append(nn.Sequential(*layers))
                layers = [L2Pool(in_ch)]
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
        self.alpha = nn.Parameter(torch.full((1, sum(DISTS_CHANNELS), 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, sum(DISTS_CHANNELS), 1, 1), 0.1))
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [x], (x - self.mean) / self.std
        for s in self.stages:
            h = s(h)
            feats.append(h)
        return feats

    def distance(self, f0: list[torch.Tensor], f1: list[torch.Tensor]) -> torch.Tensor:
        """DISTS from precomputed :meth:`features` (lets one image set be compared with many)."""
        c1 = c2 = 1e-6
        w = self.alpha.sum() + self.beta.sum()
        alpha = torch.split(self.alpha / w, DISTS_CHANNELS, dim=1)
        beta = torch.split(self.beta / w, DISTS_CHANNELS, dim=1)
        d1 = d2 = 0
        for k in range(len(DISTS_CHANNELS)):
            xm, ym = f0[k].mean([2, 3], keepdim=True), f1[k].mean([2, 3], keepdim=True)
            s1 = (2 * xm * ym + c1) / (xm ** 2 + ym ** 2 + c1)
            d1 = d1 + (alpha[k] * s1).sum(1, keepdim=True)
            xv = ((f0[k] - xm) ** 2).mean([2, 3], keepdim=True)
            yv = ((f1[k] - ym) ** 2).mean([2, 3], keepdim=True)
            cov = (f0[k] * f1[k]).mean([2, 3], keepdim=True) - xm * ym
            s2 = (2 * cov + c2) / (xv + yv + c2)
            d2 = d2 + (beta[k] * s2).sum(1, keepdim=True)
        return (1 - (d1 + d2)).reshape(-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x), self.features(y))


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}. {_HELP}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file for the user
        raise ConfigError(f"cannot read {what} file {path} (safetensors, or a .pt/.pth state dict loadable "
                          f"with weights_only=True): {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} file {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def load_dists(vgg_path: str | os.PathLike | None, weights_path: str | os.PathLike | None) -> DISTS:
    """Build DISTS from local VGG16 and DISTS weight files; a clear :class:`ConfigError` when absent."""
    if not vgg_path or not weights_path:
        raise ConfigError(_HELP)
    model = DISTS()
    sd = _read_tensors(Path(vgg_path), "VGG16 weights")
    sd = {k[len("features."):] if k.startswith("features.") else k: v for k, v in sd.items()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv_idx = [i for i, v in enumerate(_torchvision_indices()) if v]
    for conv, i in zip(convs, conv_idx):
        try:
            w, b = sd[f"{i}.weight"], sd[f"{i}.bias"]
        except KeyError:
            raise ConfigError(f"{vgg_path} is not a VGG16 state dict (no features.{i}.weight / bias). {_HELP}") from None
        if w.shape != conv.weight.shape:
            raise ConfigError(f"{vgg_path}: layer {i} has shape {tuple(w.shape)}, VGG16 needs {tuple(conv.weight.shape)}")
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(b)
    ab = _read_tensors(Path(weights_path), "DISTS weights")
    for k in ("alpha", "beta"):
        if k not in ab or ab[k].numel() != sum(DISTS_CHANNELS):
            raise ConfigError(f"{weights_path} lacks a {k} tensor of {sum(DISTS_CHANNELS)} values. {_HELP}")
        getattr(model, k).data.copy_(ab[k].reshape(1, -1, 1, 1))
    return model.eval()


def _torchvision_indices() -> list[bool]:
    """For each index of torchvision's ``vgg16().features`` up to the last conv's ReLU: is it a conv?"""
    out: list[bool] = []
    for v in VGG16_CFG:
        out += [False] if v == "M" else [True, False]
    return out


def to_gray_image(t: torch.Tensor, size: int) -> torch.Tensor:
    """N×C×H×W activation (or image) -> N×3×size×size in [0, 1]: channel mean, resize, per-image min-max."""
    g = t.detach().float().mean(1, keepdim=True)
    g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
    lo = g.amin((1, 2, 3), keepdim=True)
    hi = g.amax((1, 2, 3), keepdim=True)
    g = (g - lo) / (hi - lo).clamp_min(1e-12)
    return g.expand(-1, 3, -1, -1).contiguous()
