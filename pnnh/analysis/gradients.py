"""Shattered gradients (Balduzzi et al. 2017): do input-gradients stay correlated along a line of inputs?

Balduzzi et al. feed a 1-D line of inputs to a network and correlate the gradients at
neighbouring points: in deep plain ReLU nets the gradients decorrelate with depth like white noise
(exponentially), in residual nets much more slowly, and a looks-linear initialisation keeps them
perfectly correlated at init.

Here the line runs between two real images ``a`` and ``b``: ``x(t) = a + t (b - a)``,
``t ∈ [0, span]`` at ``points`` equal steps, for ``n_lines`` image pairs at once. At every probe
(see :mod:`pnnh.analysis.probes`) a fixed random readout ``s(x) = <r, h(x)> / √D``
(``r ~ N(0, I)``, seeded per probe) defines a scalar function of the input; the prefix of the net
up to that probe with that readout *is* a net of that depth, so "correlation vs probe depth" is
"correlation vs network depth". Gradients ``∂s/∂x`` come from one backward per selected probe
(the model must not couple samples: BatchNorm uses fixed statistics, see
:func:`pnnh.analysis.probes.calibrate_batch_norm`). The correlation of two gradients is their
Pearson correlation over input coordinates; ``corr[k]`` is the mean over lines and positions of the
correlation between gradients ``k`` steps apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .probes import Probe, ProbeTap

__all__ = ["input_lines", "gradient_correlation"]


def input_lines(images: torch.Tensor, n_lines: int = 4, points: int = 16, span: float = 0.25) -> torch.Tensor:
    """``n_lines`` lines of ``points`` inputs each, ``a + t (b - a)`` for image pairs (2i, 2i+1), t in [0, span].

    Returns ``(n_lines * points, C, H, W)``, line by line.
    """
    if images.shape[0] < 2 * n_lines:
        raise ValueError(f"need {2 * n_lines} images for {n_lines} lines, got {images.shape[0]}")
    a, b = images[0:2 * n_lines:2], images[1:2 * n_lines:2]
    t = torch.linspace(0, span, points, dtype=images.dtype).view(1, points, *([1] * (images.dim() - 1)))
    return (a[:, None] + t * (b - a)[:, None]).reshape(n_lines * points, *images.shape[1:])


def _lag_correlations(g: torch.Tensor, n_lines: int, points: int) -> torch.Tensor:
    """Mean Pearson correlation of gradients k = 0..points-1 steps apart, from (n_lines*points)×D gradients."""
    g = g.double().reshape(n_lines, points, -1)
    g = g - g.mean(-1, keepdim=True)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    c = g @ g.transpose(1, 2)  # lines×points×points
    return torch.stack([c.diagonal(k, dim1=1, dim2=2).mean() for k in range(points)])


def gradient_correlation(model: nn.Module, images: torch.Tensor, mode: str, *, n_lines: int = 4, points: int = 16,
                         span: float = 0.25, max_probes: int = 12, seed: int = 0) -> dict[str, Any]:
    """Correlation of input-gradients between neighbouring inputs along lines, per probe depth.

    ``model`` must already be in the state to measure (eval mode; BatchNorm calibrated) and
    ``mode`` a resolved probe mode. At most ``max_probes`` probes are differentiated, evenly
    spaced by index and always including the first and the last.

    Returns a dict with ``probes`` (index, name, depth), ``lag1`` (mean correlation of
    neighbouring gradients per probe) and ``corr`` (per probe, the correlation at lag 0..points-1).
    """
    x = input_lines(images.detach().float(), n_lines, points, span).requires_grad_(True)

    def readout(t: torch.Tensor, p: Probe) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100003 + p.index)
        r = torch.randn(t.shape[1:], generator=g, dtype=t.dtype).to(t.device)
        return (t * r).sum() / t[0].numel() ** 0.5  # summed over samples: per-sample grads w.r.t. x

    with torch.enable_grad(), ProbeTap(model, mode, readout) as tap:
        model(x)
    probes = tap.probes
    n = len(probes)
    m = max(1, min(n, max_probes))
    chosen = sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)})
    rows, lag1, corr = [], [], []
    for k, i in enumerate(reversed(chosen)):
        s = probes[i].value
        (g,) = torch.autograd.grad(s, x, retain_graph=k < len(chosen) - 1)
        c = _lag_correlations(g.reshape(g.shape[0], -1), n_lines, points)
        rows.append(probes[i].meta())
        lag1.append(float(c[1]) if points > 1 else float("nan"))
        corr.append([float(v) for v in c])
    rows.reverse(), lag1.reverse(), corr.reverse()
    return {"probes": rows, "lag1": lag1, "corr": corr,
            "settings": {"n_lines": n_lines, "points": points, "span": span, "max_probes": max_probes, "seed": seed}}
