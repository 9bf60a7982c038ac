import math

import pytest
import torch

from pnnh.analysis.linear_shortcuts import (RegressionTask, condition_number, hessian_at_zero,
                                            linear_shortcut_forward, shortcut_depth_table)
from pnnh.errors import ConfigError

TASK = RegressionTask(dim=2, n_samples=32, seed=1)


def test_forward_is_the_shortcut_product():
    w = torch.randn(4, 2, 2, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    two = (eye + w[1] @ w[0]) @ x.T
    two = ((eye + w[3] @ w[2]) @ two).T
    torch.testing.assert_close(linear_shortcut_forward(w, x, 2), two, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear_shortcut_forward(w, x, 0), x @ (w[3] @ w[2] @ w[1] @ w[0]).T)


def test_two_layer_shortcuts_are_depth_invariant_and_one_layer_shortcuts_are_not():
    rows = {(r["shortcut"], r["depth"]): r for r in shortcut_depth_table([2, 4, 8], [1, 2], TASK)}
    k2 = [rows[(2, d)]["condition_number"] for d in (2, 4, 8)]
    assert math.isfinite(k2[0]) and k2[0] > 1
    assert max(k2) - min(k2) < 1e-8 * k2[0]
    assert rows[(1, 8)]["condition_number"] > 5 * rows[(1, 2)]["condition_number"]
    assert rows[(1, 8)]["max_abs_eig"] > 3 * rows[(1, 2)]["max_abs_eig"]


def test_two_layer_shortcut_hessian_is_block_diagonal_per_unit():
    h = hessian_at_zero(4, 2, TASK)
    p = 2 * 2 * 2  # parameters of one unit (2 layers of 2x2)
    assert h[:p, p:].abs().max() == 0
    torch.testing.assert_close(h[:p, :p], h[p:, p:], rtol=0, atol=0)


@pytest.mark.parametrize("depth, shortcut", [(3, 3), (6, 3), (3, 0), (5, 0)])
def test_deep_or_plain_zero_point_is_flat_to_second_order(depth, shortcut):
    h = hessian_at_zero(depth, shortcut, TASK)
    assert h.abs().max() == 0
    assert math.isnan(condition_number(h))


def test_bad_depth_is_a_config_error():
    with pytest.raises(ConfigError, match="multiple"):
        hessian_at_zero(5, 2, TASK)
