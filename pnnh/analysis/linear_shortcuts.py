r"""Deep linear nets with n-layer shortcuts: the Hessian of the loss at the zero initial point.

Li et al. ("Demystifying ResNet", 2016) study a deep *linear* net of ``L`` square layers grouped
into units of ``n`` layers, each unit with a shortcut around it::

    h_{k+1} = h_k + W_{k,n} ... W_{k,2} W_{k,1} h_k        (shortcut depth n)
    f(x)    = h_{L/n}                                        (n = 0: f(x) = W_L ... W_1 x, no shortcut)

and the squared loss ``ℓ(W) = 1/(2N) Σ_i ‖f(x_i) − y_i‖²`` at the point where **every weight is
zero**. There the paper states:

- ``n = 2``: the condition number of the Hessian does not depend on the depth. (At zero only the
  two layers of the same unit interact to second order, so the Hessian is block diagonal with one
  identical block per unit.)
- ``n = 1``: the condition number grows without bound with the depth (every pair of layers
  interacts through ``Π (I + W_l)``).
- ``n ≥ 3``, and the plain net (``n = 0``) with 3 or more layers: the Hessian is zero; the start is
  a high-order stationary point, flat to second order, which gradient descent is slow to leave.

:func:`hessian_at_zero` computes the exact Hessian (``torch.func.hessian``, float64) on a small
regression task, and :func:`shortcut_depth_table` its spectrum as the depth grows. The condition
number reported is ``max |λ| / min |λ|`` over all eigenvalues (the Hessian is indefinite at zero),
``inf`` when some eigenvalue is zero relative to the largest and ``nan`` when the Hessian is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import hessian

from ..errors import ConfigError

__all__ = ["RegressionTask", "linear_shortcut_forward", "hessian_at_zero", "condition_number",
           "shortcut_depth_table"]


@dataclass(frozen=True)
class RegressionTask:
    """``y = A x + noise`` with ``x ~ N(0, I_d)``: ``n_samples`` pairs, ``A`` a random d×d matrix."""

    dim: int = 3
    n_samples: int = 64
    noise: float = 0.1
    seed: int = 0

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n_samples, self.dim, generator=g, dtype=torch.float64)
        a = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64) / math.sqrt(self.dim)
        y = x @ a.T + self.noise * torch.randn(self.n_samples, self.dim, generator=g, dtype=torch.float64)
        return x, y


def _check(depth: int, shortcut: int) -> None:
    if shortcut < 0 or depth < 1:
        raise ConfigError(f"need depth >= 1 and shortcut >= 0, got depth={depth}, shortcut={shortcut}")
    if shortcut and depth % shortcut:
        raise ConfigError(f"depth {depth} is not a multiple of the shortcut depth {shortcut}")


def linear_shortcut_forward(weights: torch.Tensor, x: torch.Tensor, shortcut: int) -> torch.Tensor:
    """``f(x)`` for rows ``x``; ``weights`` is ``(L, d, d)``, layer ``l`` computes ``h @ W_l.T``."""
    if shortcut == 0:
        for w in weights:
            x = x @ w.T
        return x
    for unit in weights.split(shortcut):
        branch = x
        for w in unit:
            branch = branch @ w.T
        x = x + branch
    return x


def hessian_at_zero(depth: int, shortcut: int, task: RegressionTask = RegressionTask()) -> torch.Tensor:
    """The ``(L d², L d²)`` Hessian of the mean squared loss at all-zero weights (float64)."""
    _check(depth, shortcut)
    x, y = task.data()
    d = task.dim

    def loss(flat: torch.Tensor) -> torch.Tensor:
        out = linear_shortcut_forward(flat.view(depth, d, d), x, shortcut)
        return 0.5 * (out - y).pow(2).sum(dim=1).mean()

    return hessian(loss)(torch.zeros(depth * d * d, dtype=torch.float64))


def condition_number(h: torch.Tensor, rtol: float = 1e-10) -> float:
    """``max |λ| / min |λ|`` of a symmetric matrix: ``inf`` if singular (relative to ``rtol``), ``nan`` if zero."""
    eig = torch.linalg.eigvalsh(h).abs()
    top = eig.max().item()
    if top == 0.0:
        return math.nan
    low = eig.min().item()
    return math.inf if low <= rtol * top else top / low


def shortcut_depth_table(depths: list[int], shortcuts: list[int],
                         task: RegressionTask = RegressionTask()) -> list[dict]:
    """One row per (shortcut, depth): condition number, largest and smallest ``|λ|`` of the Hessian at zero."""
    rows = []
    for n in shortcuts:
        for L in depths:
            if n and L % n:
                continue
            h = hessian_at_zero(L, n, task)
            eig = torch.linalg.eigvalsh(h).abs()
            rows.append({"shortcut": n, "depth": L, "params": h.shape[0],
                         "condition_number": condition_number(h),
                         "max_abs_eig": eig.max().item(), "min_abs_eig": eig.min().item()})
    return rows
