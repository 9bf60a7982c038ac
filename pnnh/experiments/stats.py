"""Statistics over seeds, shared by every report: mean, sample standard deviation, and the
standard error of a difference of two means (Welch).

Seeds of two models are independent draws (different weights, so not paired even at the same
seed): the error of ``mean(a) - mean(b)`` is Welch's ``sqrt(s_a^2/n_a + s_b^2/n_b)``. A one-seed
side has no spread of its own (its ``s`` is 0), so the error then understates the uncertainty.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["mean", "sample_std", "mean_std", "welch_se", "difference"]


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return math.fsum(xs) / len(xs) if xs else math.nan


def sample_std(xs: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` in the denominator); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)``; ``(nan, nan)`` for no values."""
    if not xs:
        return math.nan, math.nan
    return mean(xs), sample_std(xs)


def welch_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of ``mean(a) - mean(b)`` for independent samples: ``sqrt(s_a²/n_a + s_b²/n_b)``."""
    return math.sqrt(sample_std(a) ** 2 / len(a) + sample_std(b) ** 2 / len(b))


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """``(mean(a) - mean(b), Welch standard error)``, or ``None`` when either side is empty."""
    if not a or not b:
        return None
    return mean(a) - mean(b), welch_se(a, b)
