r"""Surviving neurons: what He-normal plain and residual layers do to their pre-activations.

Setting and assumptions (everything below is exact under them; no Gaussian approximation)
------------------------------------------------------------------------------------------
A layer maps an input vector ``x ∈ R^n`` to the pre-activation

- plain: ``y = W x``,
- residual: ``y = W x + x``,

with ``W ∈ R^{n×n}`` He-normal, ``W_ij ~ N(0, 2/n)`` i.i.d. (fan-in ``n``), and **W independent of
x**. The input may be anything (correlated coordinates, real images, ReLU outputs). Write, pooled
over samples and coordinates, ``μ = E[x_j]``, ``σ² = Var(x_j)`` and ``m₂ = E[x_j²] = μ² + σ²``.
Expectations are over W and x; a "neuron" is one coordinate ``y_i``, and it *survives* the ReLU
(passes input information on) when ``y_i > 0``.

Moments
~~~~~~~
Plain: ``E[y_i] = Σ_j E[W_ij] E[x_j] = 0`` and ``Var(y_i) = Σ_j E[W_ij²] E[x_j²] = 2 m₂``.
Residual: ``E[y_i] = E[x_i] = μ`` and ``Var(y_i) = 2 m₂ + σ² = 3σ² + 2μ²`` (the cross term
``E[(Wx)_i (x_i - μ)] = Σ_j E[W_ij] E[x_j (x_i - μ)] = 0``).

The paper's summary states "plain: mean 0, variance 2σx²; residual: mean μx, variance 3σx²".
That is what the formulas give for a *zero-mean* input (``m₂ = σ²``). For ReLU outputs
(``μ > 0``), the exact variances are ``2(σ² + μ²)`` and ``3σ² + 2μ²``; the tests show the
difference is measurable. Reading σx² as the second moment does not rescue the residual
case either (it would give ``3m₂ - μ²``).

Fraction of surviving neurons
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Conditional on x, ``(Wx)_i ~ N(0, 2‖x‖²/n)`` exactly. Hence
plain: ``P(y_i > 0 | x) = 1/2`` for every ``x ≠ 0``: half the neurons survive, whatever the input;
residual: ``P(y_i > 0 | x) = Φ(x_i √(n/2) / ‖x‖)``, averaged over samples and coordinates
(:func:`residual_positive_fraction`). For ``x = relu(z)``, ``z ~ N(0, s²)``, large n, this is
``1/2·1/2 + 1/2·E[Φ(|g|)] = 5/8``.

Cantelli's (one-sided Chebyshev) inequality gives a distribution-free lower bound: for a random
variable with mean ``μ_y > 0`` and variance ``v_y``,
``P(y > 0) = 1 - P(y - μ_y ≤ -μ_y) ≥ 1 - v_y/(v_y + μ_y²) = μ_y² / (μ_y² + v_y)``.
Plain layers: ``μ_y = 0``, the bound is trivial (0). Residual layers:
``μ² / (μ² + 2m₂ + σ²) = μ² / (3μ² + 3σ²)``, which is ``1/(3π) ≈ 0.106`` for rectified-Gaussian
inputs. The bound also holds for any *empirical* distribution, so measured fractions of positive
pre-activations must respect the bound computed from their own measured mean and (population)
variance: :func:`preactivation_stats` reports both.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["predict_moments", "cantelli_bound", "channel_moments", "residual_positive_fraction", "preactivation_stats",
           "simulate_he_layers", "PAPER_FORM"]

#: The moments as the paper's summary states them, in terms of the input's variance σ² (exact
#: only for zero-mean inputs; see the module docstring).
PAPER_FORM = {"plain": "mean 0, variance 2σx²", "residual": "mean μx, variance 3σx²"}


def predict_moments(mu_x: float, var_x: float, residual: bool) -> tuple[float, float]:
    """Exact ``(E[y], Var(y))`` of a He-normal layer's pre-activation given the input's mean and variance."""
    m2 = var_x + mu_x ** 2
    return (mu_x, 2 * m2 + var_x) if residual else (0.0, 2 * m2)


def cantelli_bound(mean, var):
    """Cantelli lower bound on ``P(y > 0)``: ``mean² / (mean² + var)`` where ``mean > 0``, else 0.

    Works on floats and (elementwise) on tensors.
    """
    if torch.is_tensor(mean):
        var = torch.as_tensor(var, dtype=mean.dtype)
        return torch.where(mean > 0, mean ** 2 / (mean ** 2 + var).clamp_min(1e-300), torch.zeros_like(mean))
    return mean ** 2 / (mean ** 2 + var) if mean > 0 and mean ** 2 + var > 0 else 0.0


def residual_positive_fraction(x: torch.Tensor) -> float:
    """Expected fraction of positive ``y = Wx + x`` over He-normal W, for the given inputs ``x`` (N×n).

    ``E_W[1{y_i > 0}] = Φ(x_i √(n/2) / ‖x‖)`` exactly; averaged over samples and coordinates.
    """
    x = x.double().reshape(x.shape[0], -1)
    n = x.shape[1]
    scale = math.sqrt(n / 2) / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return float(torch.special.ndtr(x * scale).mean())


def _per_channel(y: torch.Tensor) -> torch.Tensor:
    """A view of ``y`` as (groups, channels, values): channel = dim 1 of N×C[×H×W], the last dim of N×T×C."""
    if y.dim() == 3:
        return y.reshape(1, -1, y.shape[-1]).transpose(1, 2)
    if y.dim() >= 2:
        return y.reshape(y.shape[0], y.shape[1], -1)
    return y.reshape(-1, 1, 1)


def _sum_channels(a: torch.Tensor) -> torch.Tensor:
    """Sum a (groups, channels, values) tensor to per-channel float64 totals."""
    return a.sum(2).double().sum(0)


def channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance (float64 results from float32 partial sums)."""
    a = _per_channel(y.detach().float())
    cnt = a.shape[0] * a.shape[2]
    m = _sum_channels(a) / cnt
    v = (_sum_channels(a * a) / cnt - m ** 2).clamp_min(0)
    return m, v


def preactivation_stats(y: torch.Tensor) -> dict[str, float]:
    """Fraction of positive entries, mean and (population) variance of a pre-activation tensor.

    Pooled over everything, plus the Cantelli bound from those pooled moments
    (``cantelli``) and the mean of per-channel bounds (``cantelli_channel``, channel = dim 1 of
    N×C[×H×W] tensors, the last dim of N×T×C tokens): both are lower bounds on ``frac_pos`` for
    the measured values themselves (the per-channel one is tighter where channel means differ);
    ``channel_margin_min`` is the smallest per-channel ``frac_pos - bound`` (never negative).
    """
    y = y.detach()
    cm, cv = channel_moments(y)
    pos = _per_channel(y.float()).sign().clamp_(min=0)  # 1 where y > 0: faster than summing a bool tensor
    frac_c = _sum_channels(pos) / (pos.shape[0] * pos.shape[2])
    # channels hold equally many values: pooled mean = mean of means, pooled variance by the law
    # of total variance
    mean, var = float(cm.mean()), float(cv.mean() + cm.var(unbiased=False))
    bound_c = cantelli_bound(cm, cv)
    return {"frac_pos": float(frac_c.mean()), "mean": mean, "var": var, "cantelli": cantelli_bound(mean, var),
            "cantelli_channel": float(bound_c.mean()), "channel_margin_min": float((frac_c - bound_c).min())}


@torch.no_grad()
def simulate_he_layers(x0: torch.Tensor, depth: int, residual: bool, seed: int = 0,
                       dtype: torch.dtype = torch.float64) -> list[dict[str, Any]]:
    """Push ``x0`` (N×n, any data) through ``depth`` fresh He-normal layers and compare with the theory.

    Layer ``l``: ``y = W_l x`` (plain) or ``y = W_l x + x`` (residual), then ``x ← relu(y)``,
    ``W_l ~ N(0, 2/n)``. Per layer the dict holds the input moments (``mu_x, var_x``), the measured
    pre-activation statistics (``frac_pos, mean, var``), the exact predictions
    (``pred_mean, pred_var, pred_frac``), the paper-summary variance (``paper_var``: ``2σx²`` /
    ``3σx²``) and the Cantelli bounds from predicted and measured moments.
    """
    g = torch.Generator().manual_seed(seed)
    x = x0.reshape(x0.shape[0], -1).to(dtype)
    n = x.shape[1]
    rows = []
    for layer in range(1, depth + 1):
        w = (torch.randn(n, n, generator=g, dtype=dtype) * math.sqrt(2.0 / n)).to(x.device)
        y = x @ w.T + (x if residual else 0)
        mu_x, var_x = float(x.mean()), float(x.var(unbiased=False))
        pm, pv = predict_moments(mu_x, var_x, residual)
        meas = preactivation_stats(y)
        rows.append({
            "layer": layer, "mu_x": mu_x, "var_x": var_x,
            "frac_pos": meas["frac_pos"], "mean": meas["mean"], "var": meas["var"],
            "pred_mean": pm, "pred_var": pv, "paper_var": (3.0 if residual else 2.0) * var_x,
            "pred_frac": residual_positive_fraction(x) if residual else 0.5,
            "cantelli_pred": cantelli_bound(pm, pv), "cantelli_meas": meas["cantelli"],
        })
        x = torch.relu(y)
    return rows
