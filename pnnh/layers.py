"""PNNH building blocks for your own networks (the layers the ``pnnh*`` models are made of).

A PNNH layer is one plain layer split into ``C_l`` *learner* channels and ``C_c`` *coder* channels
whose output is mirrored before the ReLU, ``[relu(a_l) | relu(a_c) | relu(-a_c)]``; the next
layer's coder starts as ``+I`` on ``relu(e)`` and ``-I`` on ``relu(-e)``, so the code ``e``
crosses every non-linearity unchanged (docs/layers.md, docs/pnnh.md)::

    import torch.nn as nn
    from pnnh.layers import PNNHConv2d, pnnh_stage

    net = nn.Sequential(
        PNNHConv2d(3, 32, in_code=0),              # the image carries no code
        pnnh_stage(32, 32, depth=4),               # layers stack like nn.Conv2d: the code layout follows
        pnnh_stage(32, 64, depth=4, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )

- :class:`PNNHConv2d` -- ``relu(mirror(BN(conv(x))))``; ``in_code`` defaults to the layout a PNNH
  layer of that width writes, so layers chain without bookkeeping.
- :class:`PNNHLinear` -- the same on the last dimension, for Transformer MLPs (no norm inside).
- :class:`PNNHParallelBlock` -- a whole pre-norm Transformer block as one plain PNNH layer
  (attention heads and MLP units side by side, one mirrored coder): a drop-in for a residual
  block ``Block(dim, num_heads, mlp_ratio, qkv_bias)`` on ``(batch, tokens, dim)`` tokens, with
  0.91x its weights; :class:`MirrorCoder` is its coder.
- :class:`PNNHSequential`, :func:`pnnh_stage` -- a chain of PNNH layers whose layouts are checked.
- :class:`CoderSpec` -- coder options shared by layers (ratio, init, DiracNet path, ...).
- :class:`DiracWeight`, :func:`dirac_parametrize`, :func:`dirac_weight` -- the DiracNet
  parametrisation ``W = alpha P + beta V/|V|`` that PNNH layers use for their path and plain nets
  use with ``init="dirac_param"``; ``dirac_parametrize`` puts it on any conv or linear layer.
- :func:`mirror` -- ``cat(a, -a[:, n:], dim=1)`` with a dense gradient.
- :func:`select_kernels` -- give the PNNH layers in any module the kernels for its mode, device and
  memory format (PNNH nets, layers and :class:`PNNHSequential` do this themselves on
  ``.train()``/``.eval()``/``.to()``).
"""

from .models.kernels import select_kernels
from .models.layers import DiracWeight, dirac_parametrize, dirac_weight, mirror
from .models.pnnh_cnn import CoderSpec, PNNHConv2d, PNNHSequential, pnnh_stage
from .models.pnnh_linear import PNNHLinear
from .models.vit import MirrorCoder, PNNHParallelBlock

__all__ = ["PNNHConv2d", "PNNHLinear", "PNNHSequential", "pnnh_stage", "CoderSpec", "DiracWeight", "dirac_parametrize",
           "dirac_weight", "mirror", "select_kernels", "PNNHParallelBlock", "MirrorCoder"]
