"""Vision Transformers: residual, plain, PNNH (learner + coder) and shortcut-free rivals, timm style.

One configurable class, :class:`VisionTransformer`, builds every member of the family. Its
``block`` option picks one of small block modules built from the same sub-layers
(:class:`Attention`, :class:`Mlp`, pre-norm :class:`~torch.nn.LayerNorm`):

- ``"residual"`` (:class:`Block`): the standard pre-norm block of ViT/DeiT,
  ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.
- ``"plain"`` (:class:`PlainBlock`): the same layers with both residual adds removed,
  ``x = attn(norm1(x)); x = mlp(norm2(x))``.
- ``"pnnh"`` with ``coder="block"`` (:class:`PNNHParallelBlock`, the default): the whole block is
  ONE *plain* PNNH layer. Attention heads and MLP units side by side are the *learner* (they read
  the normalised token); a weight-sharing mirrored *coder* ``[relu(E x), relu(-E x)]`` reads the
  raw token and takes ``2 coder_dim`` of the MLP's hidden units; one output projection reads all
  of them. There is no ``x + f(x)``: the input reaches the output only through ``E``, a ReLU and
  the projection. ``E`` and the projection's coder columns start *looks-linear* (``E = I``,
  columns ``[I, -I]``), so at initialisation the coder carries its input across the
  non-linearity unchanged; they are stored divided by ``coder_gain`` so Adam does not scramble
  that identity. 0.91x the residual block's weights, the residual ViT's training speed.
- ``"pnnh"`` with ``coder="sublayer"`` (:class:`PNNHBlock`): attention and MLP are each one plain
  PNNH layer with its own coder; 1.49x the residual block's weights.
- ``"dirac"`` (:class:`DiracBlock`): the plain block with every linear ``W = a I + b V/|V|``
  (DiracNets), a rival.
- ``"skipless"`` (:class:`SkiplessBlock`): a skipless parallel block with shaped or value-SkipInit
  attention (He et al. 2023; He & Hofmann 2024), a rival.

See ``docs/vit.md`` for the equations and what is the papers' vs our choice,
``docs/results/vit.md`` for measurements.

Patch embedding is a stride-``patch_size`` convolution; pooling is a class token (``"token"``)
or the mean of the patch tokens (``"avg"``). Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`. Forward passes have no data-dependent
Python control flow, so every model is ``torch.fx``-traceable (the input-size check is an
``fx.wrap``-ed leaf function).
"""

from __future__ import annotations

import functools

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._registry import register_builder
from .layers import DropPath, PooledClassifierHead, dirac_weight, init_dirac_param_

__all__ = ["VisionTransformer", "PatchEmbed", "Attention", "Mlp", "MirrorCoder", "DropPath", "Block",
           "PlainBlock", "PNNHBlock", "PNNHParallelBlock", "DiracLinear", "DiracBlock", "ShapedAttention",
           "SkiplessBlock", "BLOCKS", "PNNH_CODERS", "VIT_PATH_PARAMS", "FAMILIES", "SIZES", "DEPTHS", "vit",
           "split_joint_in_proj", "saved_coder", "saved_path_param"]


VIT_PATH_PARAMS = ("init", "param")  # the ``path_param`` option of PNNH ViTs (:class:`MirrorCoder`)


def check_input_size(x: torch.Tensor, img_size: int, patch_size: int) -> None:
    """Raise :class:`ConfigError` unless ``x`` is ``img_size`` x ``img_size``.

    The position embedding is learned for one token grid, so the input size is fixed at
    construction (``img_size=``).
    """
    h, w = x.shape[-2], x.shape[-1]
    if h % patch_size or w % patch_size:
        raise ConfigError(f"input of {h}x{w} px is not divisible by the ViT patch size {patch_size}; "
                          f"use images whose sides are multiples of {patch_size} or another patch_size")
    if h != img_size or w != img_size:
        raise ConfigError(f"this ViT was built for {img_size}x{img_size} px inputs (its position embedding "
                          f"has a {img_size // patch_size}x{img_size // patch_size} grid), got {h}x{w}; "
                          f"build it with img_size={h}" + ("" if h == w else " (square inputs only)"))


# Leaves for torch.fx: each is recorded as one call, not traced into (they branch on shapes / flags).
torch.fx.wrap("check_input_size")
torch.fx.wrap("dirac_weight")


class PatchEmbed(nn.Module):
    """Image to tokens: a ``patch_size`` x ``patch_size`` stride-``patch_size`` conv, flattened.

    ``(B, C, H, W) -> (B, (H/p)(W/p), dim)``.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if patch_size < 1 or img_size < 1:
            raise ConfigError(f"img_size and patch_size must be positive, got {img_size} and {patch_size}")
        if img_size % patch_size:
            divisors = [p for p in range(1, img_size + 1) if img_size % p == 0]
            raise ConfigError(f"ViT patch size {patch_size} does not divide the image size {img_size}; "
                              f"patch sizes that do: {', '.join(map(str, divisors))}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size, self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, ``proj(concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h)``.

    :meth:`mix` returns the heads' output before the projection (PNNH blocks project it together
    with their coder's code).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return x.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.mix(x)))


class Mlp(nn.Module):
    """``drop(fc2(drop(gelu(fc1(x)))))``; :meth:`hidden` is the part before ``fc2``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop)
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(drop)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop1(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.hidden(x)))


class MirrorCoder(nn.Module):
    """Weight-sharing mirrored coder: code ``[relu(E x), relu(-E x)]``, decoded by the next linear layer.

    Both halves share the encoder ``E`` (``coder_dim x dim``). The coder owns the decoder columns
    ``D = [D+, D-]`` (``dim x 2 coder_dim``) of the linear layer that reads the code next to the
    learner's features: :meth:`project` computes ``W h + D [relu(E x) ; relu(-E x)] + b`` as one
    matrix product over the concatenation ``[h ; code]``. Because ``relu(e) - relu(-e) = e``,
    ``D = [E^T, -E^T]`` reads back ``E^T E x``: :meth:`init_looks_linear_` sets ``E`` to the first
    ``coder_dim`` rows of the identity, so at initialisation the code carries the first
    ``coder_dim`` token channels across the non-linearity unchanged. ``E``, ``D+`` and ``D-`` are
    independent parameters afterwards; training may make the coder truly non-linear.

    ``gain`` scales the stored parameters (``E = gain * enc``, ``D = gain * dec``), an
    equalised-learning-rate reparametrisation: with Adam every stored entry moves by about the
    learning rate per step, so the coder's effective step is ``gain`` times the learner's. The
    function at init does not depend on ``gain``.

    ``path_param`` says where the looks-linear path lives. ``"param"`` [default]: in the
    parametrisation, ``E = E0 + gain * enc`` and ``D = D0 + gain * dec`` with the looks-linear
    ``E0, D0`` fixed buffers and ``enc, dec`` trained from zero, so weight decay pulls the coder
    back to the identity path (as the residual stream's identity cannot decay either). ``"init"``:
    only in the initial values of ``enc`` and ``dec``; the same function and gradients at init,
    but weight decay shrinks them towards zero like any weight, and with them the input each
    block carries (measured in docs/results/vit.md: at depth 24 it costs accuracy).
    """

    def __init__(self, dim: int, coder_dim: int, gain: float = 0.1, path_param: str = "param"):
        super().__init__()
        if gain <= 0:
            raise ConfigError(f"coder_gain must be > 0, got {gain}")
        if path_param not in VIT_PATH_PARAMS:
            raise ConfigError(f"unknown path_param {path_param!r}; use {', '.join(VIT_PATH_PARAMS)}")
        self.dim, self.coder_dim, self.gain, self.path_param = dim, coder_dim, gain, path_param
        self.enc = nn.Parameter(torch.empty(coder_dim, dim))
        self.dec = nn.Parameter(torch.empty(dim, 2 * coder_dim))
        if path_param == "param":
            self.register_buffer("enc_path", torch.empty(coder_dim, dim))
            self.register_buffer("dec_path", torch.empty(dim, 2 * coder_dim))
        self.init_looks_linear_()

    def encoder_weight(self) -> torch.Tensor:
        """``E`` (``coder_dim x dim``)."""
        if self.path_param == "param":
            return torch.add(self.enc_path, self.enc, alpha=self.gain)
        return self.enc * self.gain

    def decoder_weight(self) -> torch.Tensor:
        """``D = [D+, D-]`` (``dim x 2 coder_dim``)."""
        if self.path_param == "param":
            return torch.add(self.dec_path, self.dec, alpha=self.gain)
        return self.dec * self.gain

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``E x``, the code before the mirrored ReLU."""
        return F.linear(x, self.encoder_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The code ``[relu(E x), relu(-E x)]``, shape ``(..., 2 * coder_dim)``."""
        e = self.encode(x)
        return torch.cat([F.relu(e), F.relu(-e)], dim=-1)

    def consumer_weight(self, consumer: nn.Linear) -> torch.Tensor:
        """``[W | D+ | D-]``: the consumer's weight with the coder's decoder columns appended."""
        return torch.cat([consumer.weight, self.decoder_weight()], dim=1)

    def consumer_weight_rebased(self, consumer: nn.Linear) -> torch.Tensor:
        """``[W | D+ + D- | -D-]``: the weight that reads ``[h ; relu(e) ; e]`` as ``[W | D] [h ; code]``.

        ``relu(-e) = relu(e) - e``, so ``D+ relu(e) + D- relu(-e) = (D+ + D-) relu(e) - D- e``:
        the same function of the same parameters (gradients reach ``D+`` and ``D-`` through this
        expression), with one ReLU instead of a mirrored pair.
        """
        dec = self.decoder_weight()
        pos, neg = dec[:, :self.coder_dim], dec[:, self.coder_dim:]
        return torch.cat([consumer.weight, pos + neg, -neg], dim=1)

    def project(self, h: torch.Tensor | list[torch.Tensor], x: torch.Tensor, consumer: nn.Linear) -> torch.Tensor:
        """``consumer.weight h + D code(x) + consumer.bias``: one linear layer over ``[h ; code(x)]``.

        ``h`` is the learner's features, or a list of them (concatenated in order, one copy).
        """
        hs = list(h) if isinstance(h, (list, tuple)) else [h]
        return F.linear(torch.cat(hs + [self(x)], dim=-1), self.consumer_weight(consumer), consumer.bias)

    @torch.no_grad()
    def init_looks_linear_(self) -> None:
        """``E`` = first ``coder_dim`` identity rows; ``D = [E^T, -E^T]`` (stored divided by ``gain``,
        or held in ``enc_path``/``dec_path`` with ``enc``, ``dec`` zero under ``path_param="param"``)."""
        eye = torch.eye(self.coder_dim, self.dim, dtype=self.enc.dtype, device=self.enc.device)
        dec = torch.cat([eye.t(), -eye.t()], dim=1)
        if self.path_param == "param":
            self.enc_path.copy_(eye)
            self.dec_path.copy_(dec)
            self.enc.zero_()
            self.dec.zero_()
        else:
            self.enc.copy_(eye / self.gain)
            self.dec.copy_(dec / self.gain)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, coder_dim={self.coder_dim}, gain={self.gain}, path_param={self.path_param!r}"


def _coder_dim(dim: int, coder_dim: int | None) -> int:
    """The coder width of a PNNH block: ``dim`` by default, else in ``[1, dim]``."""
    coder_dim = dim if coder_dim is None else coder_dim
    if not 1 <= coder_dim <= dim:
        raise ConfigError(f"coder_dim must be in [1, {dim}], got {coder_dim}")
    return coder_dim


class Block(nn.Module):
    """Residual pre-norm block: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class PlainBlock(nn.Module):
    """The residual block's layers with both adds removed: ``x = attn(norm1(x)); x = mlp(norm2(x))``.

    Stochastic depth needs a branch to drop; a plain block has none, so ``drop_path > 0`` is an error.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if drop_path > 0:
            raise ConfigError("drop_path_rate needs a residual or PNNH ViT: a plain block has no branch to drop")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(self.attn(self.norm1(x))))


class PNNHBlock(nn.Module):
    """Two plain PNNH layers (attention, then MLP), each ``W [learner(norm(x)) ; relu(E x) ; relu(-E x)] + b``.

    Attention layer:  ``y = [P | D1] [drop_path(A(norm1(x))) ; relu(E1 x) ; relu(-E1 x)] + b``
    MLP layer:        ``z = [W2 | D2] [drop_path(gelu(W1 norm2(y) + b1)) ; relu(E2 y) ; relu(-E2 y)] + b2``

    ``A`` is the heads' output before projection, ``P`` the attention projection. The learner reads
    the normalised token; the coder reads the raw token, so LayerNorm never sits on the internal
    path (like the residual stream of a pre-norm ViT). Dropout and stochastic depth act on the
    learner features only. With the looks-linear init (:meth:`MirrorCoder.init_looks_linear_`) the
    block computes the same function as a residual block at initialisation.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 coder_dim: int | None = None, coder_gain: float = 0.1, path_param: str = "param"):
        super().__init__()
        coder_dim = _coder_dim(dim, coder_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop=0.0)
        self.coder1 = MirrorCoder(dim, coder_dim, coder_gain, path_param)
        self.drop1 = nn.Dropout(proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.coder2 = MirrorCoder(dim, coder_dim, coder_gain, path_param)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def init_coders_(self) -> None:
        self.coder1.init_looks_linear_()
        self.coder2.init_looks_linear_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learner = self.drop_path1(self.drop1(self.attn.mix(self.norm1(x))))
        x = self.coder1.project(learner, x, self.attn.proj)
        learner = self.drop_path2(self.mlp.hidden(self.norm2(x)))
        x = self.coder2.project(learner, x, self.mlp.fc2)
        return x


class _BlockFeatures(torch.autograd.Function):
    """``[a ; gelu(u) ; relu(e) ; e]`` written once into one buffer.

    Read by ``[P | W2 | D+ + D- | -D-]`` (:meth:`MirrorCoder.consumer_weight_rebased`) it gives
    exactly ``[P | W2 | D+ | D-] [a ; gelu(u) ; relu(e) ; relu(-e)]``. The eager form (GELU, two
    ReLUs, a negation, two concatenations and their backwards) makes four extra tensors per block
    and step; this makes one. ``a`` may be the heads' output as ``(..., heads, head_dim)`` (any
    strides): it is copied into its slice once, with no flattened copy before. The backward
    hands ``a`` its slice of the gradient, ``u`` GELU's backward and ``e`` ``g_lin + g_relu [e > 0]``.
    GELU's backward reads a contiguous copy of its gradient slice: on CPU the elementwise kernel
    over a strided slice costs more than the copy.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        d, h, c = a.shape[-2] * a.shape[-1], u.shape[-1], e.shape[-1]
        y = u.new_empty(u.shape[:-1] + (d + h + 2 * c,))
        y[..., :d].unflatten(-1, a.shape[-2:]).copy_(a)
        y[..., d:d + h] = F.gelu(u)
        torch.clamp_min(e, 0, out=y[..., d + h:d + h + c])
        y[..., d + h + c:] = e
        ctx.save_for_backward(u, e)
        ctx.heads = a.shape[-2:]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        u, e = ctx.saved_tensors
        h, c = u.shape[-1], e.shape[-1]
        d = g.shape[-1] - h - 2 * c
        g_u = torch.ops.aten.gelu_backward(g[..., d:d + h].contiguous(), u)
        g_e = torch.ops.aten.threshold_backward(g[..., d + h:d + h + c], e, 0).add_(g[..., d + h + c:])  # relu'
        return g[..., :d].unflatten(-1, ctx.heads), g_u, g_e


def block_features(a: torch.Tensor, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``cat([a.flatten(-2), gelu(u), relu(e), e], -1)`` in one buffer (one autograd node); see :class:`_BlockFeatures`.

    ``a`` is ``(..., heads, head_dim)``; ``u`` and ``e`` are ``(..., hidden)`` and ``(..., coder_dim)``.
    """
    return _BlockFeatures.apply(a, u, e)


def split_joint_in_proj(state_dict: dict) -> dict:
    """``state_dict`` with every ``<block>.in_proj`` (``[W_qkv; W_1]`` in one matrix) split by rows.

    :class:`PNNHParallelBlock` holds ``q, k, v`` and the MLP's first layer as two linears, ``qkv``
    (``3 dim`` rows) and ``fc1``; a state dict that stores them as one ``in_proj`` weight and bias
    loads into it through this. Other keys are returned unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        prefix, sep, leaf = key.rpartition("in_proj.")
        if not sep or leaf not in ("weight", "bias") or (prefix and not prefix.endswith(".")):
            out[key] = value
            continue
        dim = state_dict[prefix + "in_proj.weight"].shape[1]
        out[prefix + "qkv." + leaf], out[prefix + "fc1." + leaf] = value[:3 * dim], value[3 * dim:]
    return out


def saved_coder(keys) -> str | None:
    """The ``coder`` of the PNNH ViT whose state-dict keys are ``keys``: ``"sublayer"`` (blocks hold
    ``coder1``/``coder2``), ``"block"`` (one ``coder`` per block) or ``None`` (no PNNH block)."""
    leaves = {k.split(".")[2] for k in keys if k.startswith("layers.") and k.count(".") >= 3}
    return "sublayer" if "coder1" in leaves else "block" if "coder" in leaves else None


def saved_path_param(keys) -> str | None:
    """The ``path_param`` of the PNNH ViT whose state-dict keys are ``keys``: ``"param"`` (its
    coders hold fixed ``enc_path`` buffers), ``"init"`` (coders without them) or ``None`` (no coder)."""
    coders = [k for k in keys if k.endswith((".enc", ".enc_path")) and ".coder" in k]
    return None if not coders else "param" if any(k.endswith(".enc_path") for k in coders) else "init"


class PNNHParallelBlock(nn.Module):
    """One plain PNNH layer per block: attention heads and MLP units side by side as the learner.

    ``z = [P | W2 | D] [drop_path(A(LN x) ; gelu(W1 LN x + b1)) ; relu(E x) ; relu(-E x)] + b``

    ``A`` is the heads' output before projection; ``q, k, v`` (``qkv``) and ``W1 LN x`` (``fc1``)
    read the same normalised token, and ``P``, ``W2`` and the coder's decoder ``D`` are one output
    projection (``proj`` plus :class:`MirrorCoder` columns). The block's hidden layer has
    ``round(mlp_ratio * dim)`` units, ``2 * coder_dim`` of which are the mirrored code and the
    rest GELU learner units, so at ``coder_dim = dim`` and ``mlp_ratio = 4`` a block holds
    ``11 dim^2`` weights against the residual block's ``12 dim^2``. The coder reads the raw token
    (LayerNorm is not on the internal path). With the looks-linear coder init the block computes
    the parallel residual block ``x + P A(LN x) + W2 gelu(W1 LN x)`` (GPT-J / ViT-22B) at
    initialisation; there is no addition in its graph.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 coder_dim: int | None = None, coder_gain: float = 0.1, path_param: str = "param"):
        super().__init__()
        coder_dim = _coder_dim(dim, coder_dim)
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        hidden = round(mlp_ratio * dim) - 2 * coder_dim
        if hidden < 1:
            raise ConfigError(f"coder='block' puts the 2 x {coder_dim} code units inside the {round(mlp_ratio * dim)} "
                              f"hidden units of mlp_ratio={mlp_ratio}, leaving no learner units; raise mlp_ratio "
                              f"or lower coder_ratio")
        self.dim, self.hidden, self.num_heads, self.head_dim = dim, hidden, num_heads, dim // num_heads
        self.attn_drop = attn_drop
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.fc1 = nn.Linear(dim, hidden)  # W1
        self.act = nn.GELU()
        self.proj = nn.Linear(dim + hidden, dim)  # [P | W2]
        self.coder = MirrorCoder(dim, coder_dim, coder_gain, path_param)
        self.drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.fused = proj_drop == 0 and drop_path == 0  # no dropout on the learner: one-buffer features

    def init_coders_(self) -> None:
        self.coder.init_looks_linear_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.update(split_joint_in_proj({k: state_dict.pop(k) for k in list(state_dict)
                                               if k.startswith(prefix + "in_proj.")}))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``x``: ``(batch, tokens, dim)``; ``attn_mask``/``is_causal`` as for ``F.scaled_dot_product_attention``."""
        # shapes come from constants, not from x.shape: the learner must not read x past the norm
        t = self.norm(x)
        q, k, v = self.qkv(t).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        u = self.fc1(t)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        a = a.transpose(1, 2)  # (batch, tokens, heads, head_dim)
        if self.fused and not torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            features = block_features(a, u, self.coder.encode(x))  # the same function as below, one buffer
            return F.linear(features, self.coder.consumer_weight_rebased(self.proj), self.proj.bias)
        learner = self.drop_path(self.drop(torch.cat([a.flatten(2), self.act(u)], dim=-1)))
        return self.coder.project(learner, x, self.proj)


class DiracLinear(nn.Module):
    """A linear layer with the identity in its parametrisation: ``W = diag(a) I + diag(b) V/|V|``.

    DiracNets (Zagoruyko & Komodakis 2017) for a linear map: ``I`` is ``torch.eye(out, in)`` (the
    identity on a square map; the first ``min(out, in)`` units on a rectangular one), a buffer;
    ``V`` is trained, each row normalised; ``a = 1`` and ``b = 0.1`` per output unit at init, ``V``
    He directions at row norm ``b`` (:func:`~pnnh.models.layers.init_dirac_param_`). Weight decay
    and Adam's steps on ``V`` cannot erase the identity. One matmul at run time, no addition of
    activations.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, beta: float = 0.1):
        super().__init__()
        self.in_features, self.out_features, self.beta0 = in_features, out_features, beta
        self.register_buffer("path", torch.eye(out_features, in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.alpha = nn.Parameter(torch.empty(out_features))
        self.beta = nn.Parameter(torch.empty(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.fill_(1.0)
        self.beta.fill_(self.beta0)
        init_dirac_param_(self.weight, self.beta0)
        if self.bias is not None:
            self.bias.zero_()

    def effective_weight(self) -> torch.Tensor:
        return dirac_weight(self.path, self.alpha, self.weight, self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class DiracBlock(PlainBlock):
    """A plain block (no adds) whose four linears are :class:`DiracLinear`: a DiracNet-style plain ViT.

    ``q``, ``k``, ``v`` and the attention projection get ``W = a I + b V/|V|``; the MLP's
    ``D -> hidden -> D`` linears get the identity on their first ``D`` hidden units, so a token
    starts on a path ``LN -> I -> (near-self) attention -> I -> LN -> I -> GELU -> I``. The path is
    in the parametrisation, not in a connection.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path)
        hidden = self.mlp.fc1.out_features
        self.attn.qkv = DiracLinear(dim, 3 * dim, bias=qkv_bias)
        with torch.no_grad():  # [I; I; I]: q, k and v each start as the identity
            self.attn.qkv.path.copy_(torch.eye(dim).repeat(3, 1))
        self.attn.proj = DiracLinear(dim, dim)
        self.mlp.fc1 = DiracLinear(dim, hidden)
        self.mlp.fc2 = DiracLinear(hidden, dim)


class ShapedAttention(nn.Module):
    """Self-attention with a shaped attention matrix ``M_h = a_h I + b_h softmax(q k^T / sqrt(d)) - c_h U``.

    ``U`` is the uniform matrix ``1/N``; ``a, b, c`` are trained, one per head. Two inits:

    - ``"shaped"`` (Noci et al. 2023; He & Hofmann 2024): ``a = b = c = 1`` and ``W_q = 0``, so
      the softmax is uniform and ``M = I`` at init;
    - ``"value_skipinit"`` (He et al. 2023): ``a = 1``, ``b = 0``, no centring term (``c = 0``,
      not trained): ``M = I`` at init.

    The value and output projections start as the identity (``W_v = W_P = I``), so the sub-layer
    starts as the identity on its (normalised) input. ``M v`` is computed as
    ``b sdpa(q, k, v) + a v - c mean(v)`` (the fused softmax attention, no ``N x N`` matrix built).
    """

    SHAPES = ("shaped", "value_skipinit")

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 shape: str = "shaped"):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if shape not in self.SHAPES:
            raise ConfigError(f"unknown attn_shape {shape!r}; use {', '.join(self.SHAPES)}")
        self.num_heads, self.head_dim, self.shape = num_heads, dim // num_heads, shape
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        centred = shape == "shaped"
        self.skip_gain = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.attn_gain = nn.Parameter(torch.full((num_heads, 1, 1), 1.0 if centred else 0.0))
        if centred:
            self.centre_gain = nn.Parameter(torch.ones(num_heads, 1, 1))
        else:
            self.register_buffer("centre_gain", torch.zeros(num_heads, 1, 1))

    @torch.no_grad()
    def init_identity_(self) -> None:
        """``W_v = W_P = I`` (zero biases); ``W_q = 0`` for the shaped init."""
        dim = self.proj.in_features
        self.qkv.weight[2 * dim:].copy_(torch.eye(dim))
        self.proj.weight.copy_(torch.eye(dim))
        if self.qkv.bias is not None:
            self.qkv.bias.zero_()
        self.proj.bias.zero_()
        if self.shape == "shaped":
            self.qkv.weight[:dim].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        mix = self.attn_gain * attn + self.skip_gain * v - self.centre_gain * v.mean(dim=-2, keepdim=True)
        return self.proj(mix.transpose(1, 2).reshape(B, N, C))


class SkiplessBlock(nn.Module):
    """He & Hofmann's skipless parallel block (2024) with a shaped or value-SkipInit attention matrix.

    ``z = SA(LN x) + g * mlp(LN x)``: one LayerNorm, attention (:class:`ShapedAttention`) and MLP
    side by side, no skip. ``g`` is a trained scalar, 0.1 at init (their default); the token's path
    is the ``a I`` term of the attention matrix with identity-initialised value and projection, so
    at init the block computes ``LN x + 0.1 mlp(LN x)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 attn_shape: str = "shaped"):
        super().__init__()
        if drop_path > 0:
            raise ConfigError("drop_path_rate needs a residual or PNNH ViT: a skipless block has no branch to drop")
        self.norm = nn.LayerNorm(dim)
        self.attn = ShapedAttention(dim, num_heads, qkv_bias, attn_drop, attn_shape)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.mlp_gain = nn.Parameter(torch.tensor(0.1))

    def init_identity_(self) -> None:
        self.attn.init_identity_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.attn(x) + self.mlp_gain * self.mlp(x)


BLOCKS = {"residual": Block, "plain": PlainBlock, "pnnh": PNNHBlock, "dirac": DiracBlock,
          "skipless": SkiplessBlock}
PNNH_CODERS = {"block": PNNHParallelBlock, "sublayer": PNNHBlock}  # the ``coder`` option of PNNH ViTs


class VisionTransformer(PooledClassifierHead, nn.Module):
    """Residual, plain, PNNH, DiracNet-style or skipless Vision Transformer.

    Args:
        img_size: input side in pixels (square inputs; the position embedding is fixed to it).
        patch_size: patch side; must divide ``img_size`` (4 or 7 for 28 px images).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT sizes.
        block: ``"residual"``, ``"plain"`` (adds removed), ``"pnnh"`` (learner + mirrored coder),
            ``"dirac"`` (plain, ``W = a I + b V/|V|``) or ``"skipless"`` (shaped attention).
        global_pool: ``"token"`` (class token, the ViT/DeiT default) or ``"avg"`` (mean of patch
            tokens, no class token).
        coder: PNNH only (an error elsewhere): ``"block"`` (one PNNH layer per block,
            :class:`PNNHParallelBlock`) [default] or ``"sublayer"`` (a coder in attention and in
            the MLP, :class:`PNNHBlock`).
        coder_ratio: PNNH only: coder width as a fraction of ``embed_dim``
            [1.0: carries every token channel; smaller values carry the first
            ``round(ratio * dim)`` channels and cost less].
        coder_gain: PNNH only: the coder's parameters are stored divided by this gain, so under
            Adam the coder moves ``coder_gain`` times as fast as the learner [0.1]; see
            :class:`MirrorCoder`.
        path_param: PNNH only: ``"param"`` (the coder's identity path a fixed term of its
            weights, which weight decay pulls the coder back to) [default] or ``"init"`` (the path
            only in its initial weights, which weight decay shrinks); see :class:`MirrorCoder`.
        attn_shape: skipless only: ``"shaped"`` [default] or ``"value_skipinit"``; see
            :class:`ShapedAttention`.
        drop_rate: dropout before the classifier. pos_drop_rate: after adding the position embedding.
        proj_drop_rate: dropout in the sub-layers (after the projection / MLP; on learner features
            in PNNH blocks). attn_drop_rate: on attention weights. drop_path_rate: stochastic depth,
            linearly increasing to this value over the blocks (residual and PNNH only).
    """

    classifier_name = "head"

    def __init__(self, *, img_size: int = 28, patch_size: int = 4, in_chans: int = 1, num_classes: int = 10,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, block: str = "residual", global_pool: str = "token",
                 coder: str | None = None, coder_ratio: float | None = None, coder_gain: float | None = None,
                 path_param: str | None = None, attn_shape: str | None = None, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"unknown ViT block {block!r}; use {', '.join(BLOCKS)}")
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if depth < 1 or embed_dim < 1 or mlp_ratio <= 0:
            raise ConfigError(f"depth, embed_dim and mlp_ratio must be positive, got {depth}, {embed_dim}, {mlp_ratio}")
        for name, p in (("drop_rate", drop_rate), ("pos_drop_rate", pos_drop_rate), ("proj_drop_rate", proj_drop_rate),
                        ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0 <= p < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {p}")
        if block != "pnnh" and any(o is not None for o in (coder, coder_ratio, coder_gain, path_param)):
            raise ConfigError(f"coder, coder_ratio, coder_gain and path_param are options of PNNH ViTs "
                              f"(pnnh_vit_*); a {block} ViT has no coder")
        if block != "skipless" and attn_shape is not None:
            raise ConfigError(f"attn_shape is an option of skipless ViTs (skipless_vit_*); a {block} ViT has "
                              f"softmax attention")
        coder = "block" if coder is None else coder
        coder_ratio = 1.0 if coder_ratio is None else coder_ratio
        coder_gain = 0.1 if coder_gain is None else coder_gain
        path_param = "param" if path_param is None else path_param
        if coder not in PNNH_CODERS:
            raise ConfigError(f"unknown coder {coder!r}; use {', '.join(PNNH_CODERS)}")
        if not 0 < coder_ratio <= 1:
            raise ConfigError(f"coder_ratio must be in (0, 1], got {coder_ratio}")
        self.num_classes, self.in_chans, self.global_pool, self.block_kind = num_classes, in_chans, global_pool, block
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if global_pool == "token" else 0
        self.coder = coder if block == "pnnh" else None
        block_cls = PNNH_CODERS[coder] if block == "pnnh" else BLOCKS[block]
        if block == "pnnh":
            extra = dict(coder_dim=max(1, round(coder_ratio * embed_dim)), coder_gain=coder_gain, path_param=path_param)
        elif block == "skipless":
            extra = dict(attn_shape="shaped" if attn_shape is None else attn_shape)
        else:
            extra = {}

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        self.layers = nn.Sequential(*[
            block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], **extra)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)

        self._init_weights()
        self.default_cfg = dict(input_size=(in_chans, img_size, img_size), num_classes=num_classes, layout="vit",
                                patch_size=patch_size)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) linears and position embedding, zero biases, unit norms.

        PNNH blocks then set their coders looks-linear (the coder carries its input at init); skipless
        blocks set their value and projection to the identity; :class:`DiracLinear` layers keep their
        own init (identity path, ``V`` at row norm ``b``). The patch-embedding conv keeps PyTorch's
        default init, as in timm.
        """
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.layers:
            if isinstance(blk, (PNNHBlock, PNNHParallelBlock)):
                blk.init_coders_()
            elif isinstance(blk, SkiplessBlock):
                blk.init_identity_()

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (timm's hook)."""
        return {"pos_embed", "cls_token"}

    # -- uniform interface ---------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """All transformer blocks in forward order (for diagnostics and lesion studies)."""
        return list(self.layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` to normalised tokens ``(B, num_prefix_tokens + N, embed_dim)``."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            # An empty slot in front, then [cls + pos_0, pos_1, ...]: the same sum as concatenating
            # the class token, but the only tensor joined with the tokens is a parameter expression
            # (a class-token concat would read as "tokens carried past a parameter" to fx checks).
            x = F.pad(x, (0, 0, 1, 0))
            pos = self.pos_embed + F.pad(self.cls_token, (0, 0, 0, self.patch_embed.num_patches))
        else:
            pos = self.pos_embed
        x = self.pos_drop(x + pos)
        return self.norm(self.layers(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens to one vector per image: the class token, or the mean of the patch tokens."""
        return x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)

    @staticmethod
    def init_classifier_(fc: nn.Linear) -> None:
        nn.init.trunc_normal_(fc.weight, std=0.02)
        nn.init.zeros_(fc.bias)


# -------------------------------------------------------------------------------------------------
# Registered entry points: {vit, plain_vit, pnnh_vit}_{mini, tiny}_d{6, 12, 24}
# -------------------------------------------------------------------------------------------------

# tiny = DeiT-tiny's width (192, 3 heads); mini = half of it, small enough for CPU studies.
SIZES = {"mini": dict(embed_dim=96, num_heads=3), "tiny": dict(embed_dim=192, num_heads=3)}
DEPTHS = (6, 12, 24)
FAMILIES = {"vit": "residual", "plain_vit": "plain", "pnnh_vit": "pnnh", "dirac_vit": "dirac",
            "skipless_vit": "skipless"}  # family -> block kind


def vit(size: str = "tiny", depth: int = 12, block: str = "residual", **kwargs) -> VisionTransformer:
    """Build a ViT of a named width (``mini`` / ``tiny``) and any depth; kwargs override the size."""
    if size not in SIZES:
        raise ConfigError(f"unknown ViT size {size!r}; use {', '.join(SIZES)}")
    return VisionTransformer(**{**SIZES[size], "depth": depth, "block": block, **kwargs})


_DOCS = {"residual": "ViT-{S}, depth {d}: pre-norm residual blocks (ViT/DeiT).",
         "plain": "Plain ViT-{S}, depth {d}: the residual ViT's layers with both residual adds removed.",
         "pnnh": "PNNH ViT-{S}, depth {d}: each block one plain PNNH layer (heads + MLP units learn, a mirrored coder carries), no residual add.",
         "dirac": "DiracNet-style plain ViT-{S}, depth {d}: W = a I + b V/|V| in every block linear, no residual add.",
         "skipless": "Skipless ViT-{S}, depth {d}: parallel block, shaped attention a I + b softmax - c U, no skip."}


def _register_family() -> None:
    for family, kind in FAMILIES.items():
        for size, dims in SIZES.items():
            for d in DEPTHS:
                register_builder(globals(), f"{family}_{size}_d{d}", functools.partial(vit, size, d, kind),
                                 _DOCS[kind].format(S=f"{size} (dim {dims['embed_dim']})", d=d),
                                 family=family, depth=d, layout="vit", fixed=("size", "block"))


_register_family()
