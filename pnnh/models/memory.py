"""Convolutional residual memory networks (Moniz & Pal 2016, arXiv:1606.05262).

A CIFAR-layout ResNet whose blocks are read in order by an LSTM: after every residual block (or
every stage, ``read="stage"``) the block output is average-pooled over space to one vector per
sample, and the sequence of these vectors is the LSTM's input. The LSTM's last hidden state is
concatenated with the ResNet's pooled final features, and one linear classifier reads both:

    v_t  = pad(mean_hw(block_t(...)))          t = 1..T, padded with zeros to the final width
    h_T  = LSTM(v_1, ..., v_T)
    y    = fc([mean_hw(features), h_T])

The convolutional part is exactly the ResNet of the same depth (same blocks, same init order),
so the memory is the only difference from ``resnet{d}``. Pooled vectors of the narrower early
stages are zero-padded to the final width, parameter-free like the option-A shortcut (our choice;
the paper's nets feed the LSTM from a wide ResNet).

``forward_features`` returns the final feature map with ``h_T`` appended as channels that are
constant over space, so the uniform head (global pool, dropout, linear) computes ``fc([pool(f),
h_T])`` and ``forward_head``, ``reset_classifier`` and ``get_classifier`` work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import register_builder, register_cifar_depths
from .layers import cifar_layers
from .resnet import ResNet

__all__ = ["FeatureMemory", "ResidualMemoryNet", "rmn_resnet"]

READS = ("block", "stage")


class FeatureMemory(nn.Module):
    """An LSTM over a sequence of pooled feature vectors; returns its last hidden state.

    Vectors narrower than ``in_dim`` are zero-padded on the channel axis.
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_dim, self.hidden = in_dim, hidden
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True)

    def forward(self, reads: list[torch.Tensor]) -> torch.Tensor:
        seq = torch.stack([F.pad(v, (0, self.in_dim - v.shape[1])) for v in reads], 1)
        _, (h, _) = self.lstm(seq)
        return h[-1]


class ResidualMemoryNet(ResNet):
    """A :class:`~pnnh.models.resnet.ResNet` whose block outputs an LSTM memory reads.

    Args:
        layers, block, **kwargs: as for :class:`ResNet` (CIFAR layout).
        memory_size: LSTM hidden units (default: the final stage's width).
        read: ``"block"`` (one LSTM step per residual block, as in the paper) or ``"stage"``
            (one step per stage, after its last block).
    """

    def __init__(self, layers, block="basic", *, memory_size: int | None = None, read: str = "block", **kwargs):
        if read not in READS:
            raise ConfigError(f"read must be one of {', '.join(READS)}, got {read!r}")
        if memory_size is not None and memory_size < 1:
            raise ConfigError(f"memory_size must be >= 1, got {memory_size}")
        super().__init__(layers, block, **kwargs)
        self.read = read
        self.memory = FeatureMemory(self.num_features, memory_size or self.num_features)
        self.global_pool_reads = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.num_features + self.memory.hidden
        self.reset_classifier(self.num_classes)

    def read_points(self) -> list[nn.Module]:
        """The modules whose outputs the memory reads, in order (blocks, or each stage's last block)."""
        return self.blocks() if self.read == "block" else [stage[-1] for stage in self.stages]

    def memory_reads(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run stem and stages on ``x``; return the last block's output and the pooled reads."""
        x = self.stem(x)
        points = {id(m) for m in self.read_points()}
        reads = []
        for blk in self.blocks():
            x = blk(x)
            if id(blk) in points:
                reads.append(torch.flatten(self.global_pool_reads(x), 1))
        return x, reads

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, reads = self.memory_reads(x)
        x = self.final_norm(x)
        h = self.memory(reads)
        h = h[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return torch.cat([x, h.to(x.dtype)], 1)


def rmn_resnet(depth: int, *, bottleneck: bool = False, **kwargs) -> ResidualMemoryNet:
    """A CIFAR-layout residual memory network on ResNet-``depth`` (basic blocks and option-A
    shortcuts, or bottleneck blocks and projection shortcuts for a 9n+2 depth)."""
    kwargs.setdefault("shortcut", "B" if bottleneck else "A")
    if kwargs["shortcut"] is None:
        raise ConfigError("shortcut=None removes the residual connection; the memory network is a residual net")
    block = "bottleneck" if bottleneck else "basic"
    return ResidualMemoryNet(cifar_layers(depth, bottleneck), block, layout="cifar", **kwargs)


def _add(name: str, _family: str, depth: int, bottleneck: bool) -> None:
    register_builder(globals(), name, lambda **k: rmn_resnet(depth, bottleneck=bottleneck, **k),
                     f"Residual memory network on ResNet-{depth}: an LSTM reads every block's pooled output "
                     "(Moniz & Pal 2016); options memory_size=, read=.",
                     family="rmn", depth=depth, layout="cifar", fixed=("block", "bottleneck"))


for _d in (20, 56, 110):
    _add(f"rmn_resnet{_d}", "rmn_resnet", _d, False)
register_cifar_depths(("rmn_resnet",), _add)  # rmn_resnet14, rmn_resnet29 (bottleneck) ... by name
