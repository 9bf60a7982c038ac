"""Dilated 1-D convolutional networks, side by side or interconnected (mixed).

Cohen, Tamari, Shashua, *Boosting Dilated Convolutional Networks with Mixed Tensor Decompositions*
(ICLR 2018, arXiv:1703.06846). A WaveNet-style stack of causal size-2 convolutions with dilations
1, 2, 4, ... computes a hierarchical tensor decomposition whose *mode tree* pairs time steps
t, t-1, then pairs of pairs, and so on. Another order of the dilations gives another tree: with
dilations 2, 1, the first layer pairs t with t-2 and the second joins the pairs, so after two
layers both nets have seen the window t-3..t, grouped differently. A *mixed* decomposition runs
two such networks and, at *mixture nodes* (layers after which both have seen the same window),
sums their intermediate representations and feeds the sum to both; the outputs are summed too.
The paper proves that even one such interconnection can make the mixed net expressively efficient
(an almost quadratic size gap) with respect to either net alone.

Here (our instantiation of the paper's description):

- network N: dilations 1, 2, 4, ..., 2^(L-1); network N̄: the same dilations with each consecutive
  pair swapped (2, 1, 8, 4, ...), so both have seen the same window after every even layer;
- every layer is a causal size-2 conv (no bias) -> BN -> ReLU at ``width`` channels, after a
  1x1 conv-BN-ReLU input layer per network;
- ``mixed_dilated_*``: at every mixture layer (by default every layer where the windows agree
  before the last) each network's output becomes the sum of both; ``dilated_pair_*``: the same two
  networks without the interconnections. Both read out the sum of the two nets' last-layer
  representations at the last time step (output summation) through one linear classifier, and
  have the same parameters.

Images are read as sequences inside the model: ``rows`` (``H`` steps of ``C·W`` features: 28 rows
of 28 pixels for Fashion-MNIST) or ``pixels`` (``H·W`` steps of ``C`` features, 784 for
Fashion-MNIST), so the image datasets and every tool work unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._registry import register_builder
from .layers import PooledClassifierHead, init_weights

__all__ = ["DilatedNet", "DilatedLayer", "StreamInputs", "CausalConv1d", "dilated_pair", "wavenet_dilations",
           "swapped_pairs", "receptive_windows", "mixture_layers", "image_to_sequence"]

SEQUENCES = ("rows", "pixels")


def image_to_sequence(x: torch.Tensor, sequence: str) -> torch.Tensor:
    """``(N, C, H, W)`` images as ``(N, features, steps)`` sequences: ``rows`` gives ``H`` steps of
    ``C·W`` features, ``pixels`` ``H·W`` steps (row-major) of ``C`` features."""
    n, c, h, w = x.shape
    if sequence == "rows":
        return x.permute(0, 1, 3, 2).reshape(n, c * w, h)
    return x.reshape(n, c, h * w)


def swapped_pairs(dilations: list[int]) -> list[int]:
    """``(1, 2, 4, 8, 16)`` -> ``(2, 1, 8, 4, 16)``: each consecutive pair of layers in the other order."""
    out = list(dilations)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def receptive_windows(dilations: list[int]) -> list[frozenset[int]]:
    """The time offsets (``t - k``, as ``k``) each layer's output at ``t`` has seen, layer by layer."""
    seen, out = frozenset({0}), []
    for d in dilations:
        seen = seen | {k + d for k in seen}
        out.append(seen)
    return out


def mixture_layers(streams: list[list[int]]) -> list[int]:
    """Layers (1-based) after which every stream has seen the same window: the mixture nodes
    available to the streams' mode trees, the last layer (the output summation) excluded."""
    windows = [receptive_windows(d) for d in streams]
    n = len(streams[0])
    return [i + 1 for i in range(n - 1) if all(w[i] == windows[0][i] for w in windows)]


class CausalConv1d(nn.Sequential):
    """Size-``k`` convolution over time at dilation ``d``, left-padded so output ``t`` reads only
    steps ``<= t``; the output has as many steps as the input."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int, kernel: int = 2):
        super().__init__(nn.ConstantPad1d(((kernel - 1) * dilation, 0), 0.0),
                         nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation, bias=False))


def _conv_bn_relu(conv: nn.Module, ch: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm1d(ch), nn.ReLU(inplace=True))


class DilatedLayer(nn.Module):
    """One layer of ``S`` parallel dilated networks on their state ``(N, S·C, T)`` (stream ``s`` in
    channels ``s·C .. (s+1)·C``): stream ``s`` applies its own causal conv at dilation
    ``dilations[s]``, BN and ReLU. At a mixture layer (``mix=True``) every stream's output is the
    sum of all streams' outputs (the interconnection); otherwise each stream keeps its own."""

    def __init__(self, ch: int, dilations: list[int], mix: bool = False):
        super().__init__()
        self.streams = nn.ModuleList([_conv_bn_relu(CausalConv1d(ch, ch, d), ch) for d in dilations])
        self.dilations, self.ch = tuple(dilations), ch
        self.mix = mix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        parts = [stream(h[:, i * self.ch:(i + 1) * self.ch]) for i, stream in enumerate(self.streams)]
        if self.mix:
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            parts = [total] * len(parts)
        return torch.cat(parts, 1)

    def extra_repr(self) -> str:
        return f"dilations={self.dilations}, mix={self.mix}"


class StreamInputs(nn.Module):
    """Each stream's input layer, 1x1 conv-BN-ReLU from the sequence features, on the same input."""

    def __init__(self, in_features: int, ch: int, n_streams: int):
        super().__init__()
        self.streams = nn.ModuleList([_conv_bn_relu(nn.Conv1d(in_features, ch, 1, bias=False), ch)
                                      for _ in range(n_streams)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([stream(x) for stream in self.streams], 1)


class DilatedNet(PooledClassifierHead, nn.Module):
    """Parallel causal dilated conv nets over an image read as a sequence, optionally interconnected.

    Args:
        streams: each network's dilations, layer by layer (all of the same length).
        mix_at: layers (1-based) whose outputs are summed across streams and fed to every stream;
            each must be a mixture node (:func:`mixture_layers`), else :class:`ConfigError`.
        sequence: ``"rows"`` or ``"pixels"`` (:func:`image_to_sequence`).
        width: channels per stream and layer.
        img_size: image side; the sequence length follows from it.
    """

    def __init__(self, streams: list[list[int]], *, mix_at: tuple[int, ...] = (), sequence: str = "rows",
                 num_classes: int = 10, in_chans: int = 1, width: int = 64, img_size: int = 28,
                 drop_rate: float = 0.0, init: str = "he"):
        super().__init__()
        if sequence not in SEQUENCES:
            raise ConfigError(f"unknown sequence {sequence!r}; use {' or '.join(SEQUENCES)}")
        if width < 1:
            raise ConfigError(f"width must be a positive channel count, got {width}")
        if len({len(s) for s in streams}) != 1:
            raise ConfigError("every stream needs the same number of layers")
        allowed = mixture_layers(streams)
        bad = sorted(set(mix_at) - set(allowed))
        if bad:
            raise ConfigError(f"layers {bad} are not mixture nodes of these streams (the streams have seen different "
                              f"windows there); mixture nodes: {allowed}")
        self.num_classes, self.in_chans, self.sequence = num_classes, in_chans, sequence
        self.n_streams, self.num_features = len(streams), width
        self.streams_dilations = [tuple(s) for s in streams]
        in_features = in_chans * img_size if sequence == "rows" else in_chans
        self.stem = StreamInputs(in_features, width, len(streams))
        self.layers = nn.Sequential(*[DilatedLayer(width, [s[i] for s in streams], mix=i + 1 in mix_at)
                                      for i in range(len(streams[0]))])
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self, init)
        self.default_cfg = dict(input_size=(in_chans, img_size, img_size), num_classes=num_classes, layout="sequence")

    def blocks(self) -> list[nn.Module]:
        """The input layer and every dilated layer, in forward order."""
        return [self.stem, *self.layers]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, width, T)``: the sum of the streams' last-layer representations at every step."""
        h = self.layers(self.stem(image_to_sequence(x, self.sequence)))
        return h.unflatten(1, (self.n_streams, -1)).sum(1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The last step: the only one that has seen the whole sequence."""
        return x[:, :, -1]


def wavenet_dilations(steps: int) -> list[int]:
    """1, 2, 4, ... up to the first receptive field (``2^L``) that covers ``steps`` steps."""
    return [2 ** i for i in range(max(1, math.ceil(math.log2(steps))))]


def dilated_pair(sequence: str = "rows", mixed: bool = False, img_size: int = 28, **kwargs) -> DilatedNet:
    """Network N (dilations 1, 2, 4, ...) and N̄ (each pair swapped), interconnected at every
    mixture node when ``mixed``."""
    if sequence not in SEQUENCES:
        raise ConfigError(f"unknown sequence {sequence!r}; use {' or '.join(SEQUENCES)}")
    base = wavenet_dilations(img_size if sequence == "rows" else img_size * img_size)
    streams = [base, swapped_pairs(base)]
    mix_at = tuple(mixture_layers(streams)) if mixed else ()
    return DilatedNet(streams, mix_at=mix_at, sequence=sequence, img_size=img_size, **kwargs)


def _register() -> None:
    def build(sequence, mixed):
        return lambda **kwargs: dilated_pair(sequence, mixed, **kwargs)

    for sequence, steps in (("rows", 28), ("pixels", 784)):
        depth = len(wavenet_dilations(steps)) + 2  # input layer, dilated layers, classifier
        for mixed, name, family, what in (
                (False, f"dilated_pair_{sequence}", "dilated_pair", "side by side, outputs summed"),
                (True, f"mixed_dilated_{sequence}", "mixed_dilated", "interconnected at every mixture node")):
            register_builder(globals(), name, build(sequence, mixed),
                             f"Two causal dilated conv nets (dilations 1,2,4.. and pairs swapped) over Fashion-MNIST "
                             f"{sequence}, {what} (Cohen et al. 2018).",
                             family=family, depth=depth, layout="sequence", fixed=("sequence", "mixed", "mix_at"))


_register()
