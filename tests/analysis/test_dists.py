"""DISTS from local files only: plumbing with random weights, and clear errors when files are missing."""

import pytest
import torch
from safetensors.torch import save_file

import pnnh
from pnnh.analysis import diagnose
from pnnh.analysis.dists import DISTS, DISTS_CHANNELS, load_dists, to_gray_image
from pnnh.errors import ConfigError


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dists")
    ref = DISTS()
    sd = {}
    convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    layout = []  # torchvision vgg16().features indices of the convs
    i = 0
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            i += 1
        else:
            layout.append(i)
            i += 2
    g = torch.Generator().manual_seed(0)
    for conv, i in zip(convs, layout):
        fan_in = conv.weight[0].numel()
        sd[f"features.{i}.weight"] = torch.randn(conv.weight.shape, generator=g) * (2 / fan_in) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(conv.bias.shape)
    save_file(sd, str(d / "vgg16.safetensors"))
    torch.save({"alpha": torch.rand(1, sum(DISTS_CHANNELS), 1, 1, generator=g),
                "beta": torch.rand(1, sum(DISTS_CHANNELS), 1, 1, generator=g)}, str(d / "weights.pt"))
    return d / "vgg16.safetensors", d / "weights.pt", sd


def test_load_and_distance_properties(weight_files):
    vgg, w, sd = weight_files
    model = load_dists(vgg, w)
    assert torch.equal(model.stages[1][1].weight, sd["features.5.weight"])  # first conv after the 1st pool
    x = torch.rand(3, 3, 32, 32)
    d_same = model(x, x)
    d_other = model(x, torch.rand(3, 3, 32, 32))
    assert d_same.shape == (3,) and d_same.abs().max() < 1e-5
    assert (d_other > 0.01).all()
    g = to_gray_image(torch.randn(2, 5, 7, 7), 16)
    assert g.shape == (2, 3, 16, 16) and float(g.min()) == 0.0 and float(g.max()) == 1.0


def test_dists_metric_in_run_diagnostics(weight_files):
    vgg, w, _ = weight_files
    x = torch.randn(24, 1, 28, 28)
    r = diagnose(pnnh.create_model("resnet20", width=0.25), x, None, dists=load_dists(vgg, w),
             dists_images=8, dists_size=32, dists_max_probes=2, gradients=False, theory=False,
             n_shuffles=3)
    m = r["dissipation"]["metrics"]["dists_similarity"]
    assert len(m["value"]) == 2 and len(m["probes"]) == 2 and m["probes"][-1]["depth"] == 19


def test_missing_or_wrong_files_are_clear_errors(tmp_path, weight_files):
    with pytest.raises(ConfigError, match="never downloads"):
        load_dists(None, None)
    with pytest.raises(ConfigError, match="not found"):
        load_dists(tmp_path / "nope.pth", tmp_path / "nope.pt")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="not a VGG16"):
        load_dists(bad, weight_files[1])
