"""Shattered gradients: plain nets decorrelate faster with depth than residual nets."""

import torch
import torch.nn as nn

import pnnh
from pnnh.analysis.gradients import gradient_correlation, input_lines
from pnnh.analysis.probes import calibrate_batch_norm


def _measure(name, x, **kw):
    torch.manual_seed(0)
    m = pnnh.create_model(name, width=0.5)
    with torch.no_grad(), calibrate_batch_norm(m):
        m(x)
    return gradient_correlation(m, x, "blocks", n_lines=2, points=8, **kw)


def test_plain_decorrelates_faster_than_residual(fmnist_dir):
    from pnnh.analysis.diagnose import load_images

    x, _, _ = load_images("fashion-mnist", 64, str(fmnist_dir))
    plain, res = _measure("plain20", x), _measure("resnet20", x)
    assert [p["depth"] for p in plain["probes"]] == [p["depth"] for p in res["probes"]]
    # both start nearly linear, then the plain net's gradients decorrelate much faster
    assert plain["lag1"][0] > 0.9 and res["lag1"][0] > 0.9
    assert plain["lag1"][-1] < plain["lag1"][0] - 0.4
    assert plain["lag1"][-1] < 0.6 * res["lag1"][-1]
    # and they stay ordered from the middle of the net on
    half = len(plain["lag1"]) // 2
    assert all(p < r for p, r in zip(plain["lag1"][half:], res["lag1"][half:]))


def test_linear_net_keeps_gradients_perfectly_correlated():
    """A net without non-linearities has one constant gradient: correlation 1 at every depth and lag."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(6)])
    r = gradient_correlation(model.eval(), torch.randn(8, 2, 12, 12), "blocks", n_lines=2, points=5, max_probes=4)
    assert len(r["probes"]) == 4 and r["probes"][-1]["depth"] == 6
    for c in r["corr"]:
        assert min(c) > 1 - 1e-5


def test_input_lines_interpolate_between_image_pairs():
    imgs = torch.randn(6, 1, 4, 4)
    lines = input_lines(imgs, n_lines=3, points=5, span=1.0)
    assert lines.shape == (15, 1, 4, 4)
    assert torch.allclose(lines[0], imgs[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(lines[4], imgs[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(lines[10], imgs[4], rtol=1e-5, atol=1e-6)
