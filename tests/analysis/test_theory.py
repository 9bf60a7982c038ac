"""He-normal plain / residual layers: exact moments, surviving fractions and the Cantelli bound.

Tolerances: width n = 2048, N = 128 inputs, one draw of W per layer (fixed seed).
- mean: within 4 standard errors of the W-fluctuation of the pooled mean, se = √2 ‖x̄‖ / n
  (x̄ the mean input); for plain layers the prediction is 0.
- variance: within 5% relative (the W-fluctuation of a pooled second moment is about √(2/n) ≈ 3%
  for one sample and smaller pooled over correlated samples).
- fraction of positive pre-activations: within 0.03 of the exact prediction (sd ≈ 0.5/√n ≈ 0.011
  for independent neurons).
"""

import math

import pytest
import torch

import pnnh
from pnnh.analysis.probes import ProbeTap, calibrate_batch_norm
from pnnh.analysis.theory import (cantelli_bound, predict_moments, preactivation_stats, residual_positive_fraction,
                                  simulate_he_layers)

N, WIDTH = 128, 2048


def _inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, WIDTH, generator=g)
    return {"relu": torch.relu(z), "shifted": z * 0.7 + 0.4, "zero_mean": z}[kind]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", ["relu", "shifted"])
def test_simulated_wide_layers_match_exact_predictions(residual, kind):
    rows = simulate_he_layers(_inputs(kind), depth=3, residual=residual, seed=0, dtype=torch.float32)
    for r in rows:
        # se of the pooled mean from W: √2‖x̄‖/n <= √(2 m₂ / n) with m₂ = E[x²] of the layer input
        se_mean = math.sqrt(2 * (r["var_x"] + r["mu_x"] ** 2) / WIDTH)
        assert abs(r["mean"] - r["pred_mean"]) <= 4 * se_mean, r
        assert r["var"] == pytest.approx(r["pred_var"], rel=0.05), r
        assert abs(r["frac_pos"] - r["pred_frac"]) <= 0.03, r
        # Cantelli holds for the measured (empirical) distribution, always; and for the prediction
        assert r["frac_pos"] >= r["cantelli_meas"]
        assert r["frac_pos"] >= r["cantelli_pred"] - 0.02
        if residual:
            assert r["cantelli_pred"] > 0.05 and r["frac_pos"] > 0.5 + 0.05 * (kind == "relu")
        else:
            assert r["pred_mean"] == 0 and r["pred_frac"] == 0.5 and r["cantelli_pred"] == 0


def test_paper_form_holds_only_for_zero_mean_inputs():
    """'plain var 2σx², residual var 3σx²' is exact for zero-mean x; with ReLU inputs it is not."""
    for residual, factor in ((False, 2.0), (True, 3.0)):
        zm = simulate_he_layers(_inputs("zero_mean"), 1, residual=residual, dtype=torch.float32)[0]
        assert zm["var"] == pytest.approx(factor * zm["var_x"], rel=0.05)
        rl = simulate_he_layers(_inputs("relu"), 1, residual=residual, dtype=torch.float32)[0]
        assert rl["var"] == pytest.approx(rl["pred_var"], rel=0.05)
        assert rl["var"] > 1.2 * factor * rl["var_x"]  # the paper form misses the 2μ² term by > 20%


def test_closed_forms_for_rectified_gaussian_inputs():
    mu, var = 1 / math.sqrt(2 * math.pi), 0.5 - 1 / (2 * math.pi)  # relu(z), z ~ N(0, 1)
    m, v = predict_moments(mu, var, residual=True)
    assert m == mu and v == pytest.approx(3 * var + 2 * mu ** 2)
    assert cantelli_bound(m, v) == pytest.approx(1 / (3 * math.pi))
    assert predict_moments(mu, var, residual=False) == (0.0, pytest.approx(2 * (var + mu ** 2)))
    assert cantelli_bound(0.0, 1.0) == 0.0 and cantelli_bound(-1.0, 1.0) == 0.0
    # exact residual surviving fraction 1/4 + 1/2·E[Φ(|g|)] = 5/8 at large width
    assert residual_positive_fraction(_inputs("relu")) == pytest.approx(5 / 8, abs=0.01)


def test_preactivation_stats_and_bound_on_a_known_tensor():
    y = torch.tensor([[-1.0, 2.0], [3.0, 0.0], [1.0, -2.0]])  # N=3, C=2
    s = preactivation_stats(y)
    assert s["frac_pos"] == pytest.approx(3 / 6)
    assert s["mean"] == pytest.approx(0.5) and s["var"] == pytest.approx(float(y.var(unbiased=False)))
    assert s["cantelli"] == pytest.approx(0.25 / (0.25 + s["var"]))
    assert s["channel_margin_min"] >= 0


def test_real_nets_respect_the_bound_and_residual_adds_survivors(fmnist_dir):
    from pnnh.analysis.diagnose import load_images

    x, _, _ = load_images("fashion-mnist", 96, str(fmnist_dir))
    fracs = {}
    for name in ("plain20", "resnet20"):
        m = pnnh.create_model(name, width=0.5)
        with torch.no_grad(), calibrate_batch_norm(m), ProbeTap(m, "layers", None,
                                                                preact=lambda t, p: preactivation_stats(t)) as tap:
            m(x)
        for p in tap.preacts:
            v = p.value
            assert v["frac_pos"] >= v["cantelli"] - 1e-9 and v["frac_pos"] >= v["cantelli_channel"] - 1e-9, (name, p.name)
            assert v["channel_margin_min"] >= -1e-9
        fracs[name] = [p.value for p in tap.preacts if p.name.endswith("act2")]  # the post-add ReLUs
    # BatchNorm with batch statistics centres every plain pre-activation: half survive, bound 0
    assert all(abs(v["frac_pos"] - 0.5) < 0.06 and v["cantelli_channel"] < 0.01 for v in fracs["plain20"])
    # residual: the shortcut adds a positive mean, so more survive and the bound is not trivial
    assert all(v["frac_pos"] > 0.55 and v["cantelli"] > 0.05 for v in fracs["resnet20"])
