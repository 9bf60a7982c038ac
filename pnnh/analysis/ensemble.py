"""The dynamic ensemble (Littwin & Wolf 2016): which path lengths a residual net weights, and how
BatchNorm's scale parameters move that during training.

Unrolled, a net of ``n`` residual blocks ``y = s(x) + F(x)`` is a sum over ``2^n`` paths, each
taking the branch ``F`` at some blocks and the shortcut ``s`` at the others
(:func:`~pnnh.analysis.lesion.path_length_distribution`). Give block ``b``'s branch the weight
``w_b`` against its shortcut's 1 and weight a path by the product of its branches' weights: the
share of the total weight on paths of length ``k`` is

    P(k) = e_k(w_1, ..., w_n) / prod_b (1 + w_b)

(``e_k`` the elementary symmetric polynomial), the distribution of the number of successes of
independent trials with success probabilities ``w_b / (1 + w_b)``. With every ``w_b = 1`` it is
Veit et al.'s Binomial(n, 1/2). Littwin & Wolf argue that in a batch-normalised ResNet a branch's
weight is its BN scale ``gamma``, which grows during training and so moves the ensemble towards
deeper paths (their "dynamic ensemble").

Two weightings, from a model and a batch of images:

- ``"gamma"``: ``w_b`` = mean ``|gamma|`` of the last BatchNorm of block ``b``'s branch (the branch
  output is proportional to it, up to the BN bias), the identity counted 1: the BN-scale model.
- ``"norm"``: ``w_b`` = RMS of the branch output / RMS of the shortcut output on the images: the
  branch's measured size relative to what the shortcut carries.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .lesion import shortcut_path
from .probes import get_blocks

__all__ = ["weighted_path_lengths", "branch_gamma", "branch_scales", "effective_path_lengths", "dynamic_ensemble"]


def weighted_path_lengths(weights: Sequence[float]) -> dict[str, Any]:
    """Share of the total path weight on each path length, branch ``b`` weighted ``weights[b]``
    against its shortcut's 1 (see the module docstring).

    Returns ``{"n_blocks", "length", "fraction", "mean", "std"}``; with all weights 1 this is
    :func:`~pnnh.analysis.lesion.path_length_distribution` (exactly, in floating point, up to 53 blocks).
    """
    w = [float(v) for v in weights]
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise ConfigError(f"branch weights must be finite and >= 0, got {w}")
    frac = [1.0]
    for v in w:  # multiply the polynomial prod (1 - p + p z) one block at a time
        p = v / (1.0 + v)
        frac = [(frac[k] if k < len(frac) else 0.0) * (1.0 - p) + (frac[k - 1] * p if k else 0.0)
                for k in range(len(frac) + 1)]
    mean = sum(v / (1.0 + v) for v in w)
    var = sum(v / (1.0 + v) ** 2 for v in w)
    return {"n_blocks": len(w), "length": list(range(len(w) + 1)), "fraction": frac, "mean": mean, "std": math.sqrt(var)}


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [b for b in get_blocks(model) if shortcut_path(b) is not None]
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no residual blocks (no block has a .shortcut module)")
    return blocks


def _branch_end(block: nn.Module) -> nn.Module | None:
    """The module whose output is the block's summed residual branch, where the block has one.

    Catalogue blocks mark it (``branch_out``); a post-activation ResNet block's branch ends in its
    ``residual_branch_norm()``. ``None``: the branch is taken as ``block(x) - shortcut(x)``, right
    for blocks that end in the sum (pre-activation blocks).
    """
    if isinstance(getattr(block, "branch_out", None), nn.Module):
        return block.branch_out
    return getattr(block, "residual_branch_norm", lambda: None)()


def branch_gamma(block: nn.Module) -> float:
    """Mean ``|gamma|`` of the block's last BatchNorm outside its shortcut: the branch's last norm,
    which sets the branch's scale (every earlier norm is undone by it); NaN when there is none."""
    sc = getattr(block, "shortcut", None)
    in_sc = {id(m) for m in sc.modules()} if isinstance(sc, nn.Module) else set()
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in in_sc
             and m.weight is not None]
    return float(norms[-1].weight.detach().abs().mean()) if norms else float("nan")


@torch.no_grad()
def branch_scales(model: nn.Module, images: torch.Tensor) -> list[dict[str, float]]:
    """Per residual block: ``gamma`` (:func:`branch_gamma`), the RMS of its branch output and of its
    shortcut output on ``images``, and their ratio ``norm``. The model runs as it is (train or eval)."""
    blocks = _residual_blocks(model)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, b in enumerate(blocks):
        end = _branch_end(b)
        if end is not None:
            hooks.append(end.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, {}).update(r=out)))
        hooks.append(b.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, {}).update(x=a[0], y=out)))
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, b in enumerate(blocks):
        got = seen[i]
        s = shortcut_path(b)(got["x"])
        r = got["r"] if "r" in got else got["y"] - s
        rms_r, rms_s = float(r.float().pow(2).mean().sqrt()), float(s.float().pow(2).mean().sqrt())
        rows.append({"block": i, "gamma": branch_gamma(b), "branch_rms": rms_r, "shortcut_rms": rms_s,
                     "norm": rms_r / rms_s if rms_s > 0 else float("inf")})
    return rows


def effective_path_lengths(model: nn.Module, images: torch.Tensor, *, norm_stats: str = "batch") -> dict[str, Any]:
    """The path-length distribution of ``model`` under each weighting, measured on ``images``.

    ``norm_stats="batch"`` measures the branches with BatchNorm normalising by the images' own
    statistics (as in a training step; a copy of the model is used, nothing is updated);
    ``"running"`` uses the stored running statistics (eval mode).

    Returns ``{"blocks": branch_scales rows, "gamma": dist, "norm": dist, "uniform": dist}``, each dist
    from :func:`weighted_path_lengths` (``uniform``: every weight 1, the binomial). ``gamma`` is ``None``
    when a branch has no BatchNorm.
    """
    if norm_stats not in ("batch", "running"):
        raise ConfigError(f"norm_stats must be batch or running, got {norm_stats!r}")
    m = copy.deepcopy(model).eval()
    if norm_stats == "batch":
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
    rows = branch_scales(m, images)
    gammas = [r["gamma"] for r in rows]
    return {"blocks": rows, "norm_stats": norm_stats,
            "gamma": None if any(math.isnan(g) for g in gammas) else weighted_path_lengths(gammas),
            "norm": weighted_path_lengths([r["norm"] for r in rows]),
            "uniform": weighted_path_lengths([1.0] * len(rows))}


def dynamic_ensemble(models: Iterable[tuple[int, nn.Module]], images: torch.Tensor, **kwargs) -> list[dict[str, Any]]:
    """:func:`effective_path_lengths` of each ``(step, model)`` of a run, with its ``step``."""
    return [{"step": step, **effective_path_lengths(model, images, **kwargs)} for step, model in models]
