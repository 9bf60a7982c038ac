"""CKA, debiased CKA, held-out ridge R² and their shuffled-pairing noise floors."""

import math

import pytest
import torch

from pnnh.analysis.similarity import (cka, cka_with_floor, dissipation_depth, features_for_gram, gram, noise_band,
                                      ridge_r2_with_floor, shuffles)


def _data(n=80, d=40, p=12, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, p, generator=g, dtype=torch.float64) + noise * torch.randn(n, p, generator=g, dtype=torch.float64)
    return x, y


def test_linear_cka_matches_feature_space_formula_and_invariances():
    x, y = _data()
    xc, yc = x - x.mean(0), y - y.mean(0)
    # Kornblith et al. eq. (feature form): ||Yᵀ X||² / (||Xᵀ X|| ||Yᵀ Y||)
    ref = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert float(cka(x @ x.T, y @ y.T)) == pytest.approx(float(ref), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64))
    x2 = 3.7 * x @ q + 5.0  # orthogonal transform, isotropic scaling and a shift: CKA unchanged
    assert float(cka(x2 @ x2.T, y @ y.T)) == pytest.approx(float(ref), rel=1e-9)
    assert float(cka(x @ x.T, x @ x.T)) == pytest.approx(1.0)


def test_debiased_cka_is_the_unbiased_hsic_estimator():
    x, y = _data()
    n = x.shape[0]

    def hsic_u(k, l):  # Song et al. (2012), eq. (5)
        k, l = k.clone(), l.clone()
        k.fill_diagonal_(0), l.fill_diagonal_(0)
        one = torch.ones(n, dtype=torch.float64)
        return (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    ref = hsic_u(k, l) / torch.sqrt(hsic_u(k, k) * hsic_u(l, l))
    assert float(cka(k, l, debiased=True)) == pytest.approx(float(ref), rel=1e-9)
    # batched, float32 Grams of centred features, identity pairing first: same value
    vals, floor = cka_with_floor(gram(x.float())[None], l, shuffles(n, 3), debiased=True)
    assert float(vals[0]) == pytest.approx(float(ref), abs=1e-5) and floor.shape == (1, 3)


def test_ridge_r2_equals_primal_ridge_with_the_same_penalty():
    x, y = _data()
    n, lam_rel = x.shape[0], 0.1
    h = n // 2

    def primal(tr, te):  # centred ridge with intercept, penalty relative to the mean Gram eigenvalue
        xtr, ytr = x[tr], y[tr]
        mx, my = xtr.mean(0), ytr.mean(0)
        lam = lam_rel * torch.linalg.eigvalsh((xtr - mx) @ (xtr - mx).T).clamp_min(0).mean()
        beta = torch.linalg.solve((xtr - mx).T @ (xtr - mx) + lam * torch.eye(x.shape[1], dtype=x.dtype),
                                  (xtr - mx).T @ (ytr - my))
        pred = (x[te] - mx) @ beta + my
        return 1 - ((y[te] - pred) ** 2).sum() / ((y[te] - my) ** 2).sum()

    ref = (primal(slice(h, n), slice(0, h)) + primal(slice(0, h), slice(h, n))) / 2
    vals, _ = ridge_r2_with_floor((x @ x.T)[None], y, shuffles(n, 2), lambdas=[lam_rel])
    assert float(vals[0]) == pytest.approx(float(ref), abs=1e-5)


def test_noise_floor_separates_related_from_unrelated_features():
    n = 256
    x, y = _data(n=n, d=30, p=20, noise=0.3)
    z = torch.randn(n, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # unrelated to y
    grams = torch.stack([x @ x.T, z @ z.T])
    perms = shuffles(n, 10)
    for values, floor in (cka_with_floor(grams, y @ y.T, perms, debiased=True), ridge_r2_with_floor(grams, y, perms)):
        mean, std, upper = noise_band(floor)
        assert values[0] > upper[0] + 0.3  # related: far above the band
        assert values[1] <= upper[1]  # unrelated: inside the band
        assert abs(float(mean[1])) < 0.05  # debiased CKA and held-out R² floors sit near 0
    r2, _ = ridge_r2_with_floor(grams[:1], y, perms)
    assert float(r2[0]) > 0.9


def test_dissipation_depth_is_first_probe_in_band():
    v = torch.tensor([0.9, 0.5, 0.01, 0.3, 0.0])
    assert dissipation_depth(v, torch.full((5,), 0.05)) == 2
    assert dissipation_depth(v, torch.full((5,), -1.0)) is None


def test_features_for_gram_pools_to_max_dim():
    t = torch.randn(4, 16, 28, 28)
    assert features_for_gram(t, None).shape == (4, 16 * 28 * 28)
    f = features_for_gram(t, 4096)
    assert f.shape[1] <= 4096 and f.shape[1] == 16 * 14 * 14
    assert features_for_gram(torch.randn(4, 50, 64), 1000).shape[1] <= 1000  # tokens
    assert features_for_gram(torch.randn(4, 10), 4).shape == (4, 10)  # 2-D: untouched
    assert math.isclose(float(gram(t.flatten(1)).sum()), 0.0, abs_tol=1e-2)  # centred
