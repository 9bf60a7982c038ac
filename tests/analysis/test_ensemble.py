"""The dynamic-ensemble measurement: exact path-length distributions and their shift with BN scales."""

import itertools
import math

import pytest
import torch

import pnnh
from pnnh.analysis import DiagnoseConfig, run_diagnostics
from pnnh.analysis.ensemble import branch_scales, dynamic_ensemble, effective_path_lengths, weighted_path_lengths
from pnnh.analysis.lesion import path_length_distribution
from pnnh.errors import ConfigError


def brute_force(weights):
    """Sum the weight of each of the 2^n paths into its length."""
    total = [0.0] * (len(weights) + 1)
    for take in itertools.product((0, 1), repeat=len(weights)):
        total[sum(take)] += math.prod(w if t else 1.0 for w, t in zip(weights, take))
    z = sum(total)
    return [t / z for t in total]


@pytest.mark.parametrize("n", [1, 9, 27, 54])
def test_equal_weights_give_the_binomial_exactly(n):
    got, ref = weighted_path_lengths([1.0] * n), path_length_distribution(n)
    assert got["fraction"] == ref["fraction"]  # exact: every term is a multiple of 2^-n
    assert got["mean"] == ref["mean"] and got["std"] == pytest.approx(ref["std"], rel=1e-12)


def test_unequal_weights_match_enumerating_the_paths():
    w = [0.2, 1.0, 3.0, 0.5, 2.5, 0.0]
    got = weighted_path_lengths(w)
    assert got["fraction"] == pytest.approx(brute_force(w), rel=1e-12)
    assert got["mean"] == pytest.approx(sum(k * f for k, f in enumerate(brute_force(w))), rel=1e-12)
    with pytest.raises(ConfigError):
        weighted_path_lengths([1.0, -0.5])


def test_resnet_at_init_is_binomial_and_scaling_one_gamma_shifts_it():
    torch.manual_seed(0)
    model = pnnh.create_model("resnet20")
    x = torch.randn(16, 1, 28, 28)
    before = effective_path_lengths(model, x)
    assert [r["gamma"] for r in before["blocks"]] == [1.0] * 9
    assert before["gamma"]["fraction"] == path_length_distribution(9)["fraction"]
    assert before["uniform"] == weighted_path_lengths([1.0] * 9)

    with torch.no_grad():
        model.blocks()[3].bn2.weight.mul_(3.0)  # branch 3 now weighs 3 against its identity's 1
    after = effective_path_lengths(model, x)
    assert after["gamma"]["fraction"] == pytest.approx(brute_force([1.0] * 3 + [3.0] + [1.0] * 5), rel=1e-12)
    assert after["gamma"]["mean"] == pytest.approx(4.5 + 0.75 - 0.5)  # that block's p: 1/2 -> 3/4
    # the measured branch scale of block 3 is exactly 3x (its BN bias is 0, its input unchanged)
    assert after["blocks"][3]["norm"] == pytest.approx(3 * before["blocks"][3]["norm"], rel=1e-5)
    assert [r["norm"] for r in after["blocks"][:3]] == [r["norm"] for r in before["blocks"][:3]]
    # later shortcuts carry the larger branch, so later branches weigh less relative to them
    assert all(a["norm"] < b["norm"] for a, b in zip(after["blocks"][4:], before["blocks"][4:]))
    # the model itself is untouched: BN running statistics are those of init
    assert torch.equal(model.blocks()[0].bn1.running_mean, torch.zeros(16))


def test_preact_branch_is_output_minus_shortcut():
    torch.manual_seed(0)
    model = pnnh.create_model("preact_resnet20").eval()
    x = torch.randn(8, 1, 28, 28)
    blk = model.blocks()[1]
    base = branch_scales(model, x)[1]
    with torch.no_grad():  # relu is positively homogeneous: scaling bn2 (weight and bias) scales the branch
        blk.bn2.weight.mul_(2.0), blk.bn2.bias.uniform_(-0.1, 0.1)
    r1 = branch_scales(model, x)[1]
    with torch.no_grad():
        blk.bn2.weight.mul_(2.0), blk.bn2.bias.mul_(2.0)
    r2 = branch_scales(model, x)[1]
    assert r2["branch_rms"] == pytest.approx(2 * r1["branch_rms"], rel=1e-5)
    assert r2["gamma"] == pytest.approx(2 * r1["gamma"]) and base["gamma"] == 1.0
    assert r1["shortcut_rms"] == r2["shortcut_rms"]


def test_dynamic_ensemble_and_errors():
    torch.manual_seed(0)
    model = pnnh.create_model("resnet8")
    x = torch.randn(4, 1, 28, 28)
    rows = dynamic_ensemble([(0, model), (10, model)], x, norm_stats="running")
    assert [r["step"] for r in rows] == [0, 10] and rows[0]["norm_stats"] == "running"
    with pytest.raises(ConfigError, match="no residual blocks"):
        effective_path_lengths(pnnh.create_model("plain8"), x)
    with pytest.raises(ConfigError, match="norm_stats"):
        effective_path_lengths(model, x, norm_stats="eval")


def test_diagnose_reports_the_weighted_path_lengths_of_residual_models_only():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    cfg = DiagnoseConfig(gradients=False, lesion=False)
    model = pnnh.create_model("resnet20", width=0.25)
    with torch.no_grad():  # one block's BN scale tripled: its branch weighs 3 against its shortcut
        model.blocks()[4].bn2.weight.mul_(3.0)
    res = run_diagnostics(model, x, config=cfg)["effective_path_lengths"]
    assert res["uniform"] == weighted_path_lengths([1.0] * 9)
    assert res["gamma"]["mean"] == pytest.approx(weighted_path_lengths([1.0] * 4 + [3.0] + [1.0] * 4)["mean"])
    assert len(res["blocks"]) == 9 and res["norm_stats"] == "batch"
    assert "effective_path_lengths" not in run_diagnostics(pnnh.create_model("plain20", width=0.25), x, config=cfg)
