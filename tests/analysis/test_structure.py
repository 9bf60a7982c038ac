"""The structural guarantee: every plain and PNNH net has no residual connection; every ResNet has."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.analysis.structure import find_residual_connections, is_plain
from pnnh.models import list_models, model_info


def _representatives(family: str) -> list[str]:
    """The smallest registered depth of every (layout, block type) of a family."""
    best: dict[tuple, tuple[int, str]] = {}
    for name in list_models(family=family):
        info = model_info(name)
        d = info.depth
        bottleneck = d in (164, 1001) if info.layout == "cifar" else d >= 50  # the registry's bottleneck depths
        key = (info.layout, bottleneck)
        if key not in best or d < best[key][0]:
            best[key] = (d, name)
    return sorted(n for _, n in best.values())


PLAIN = _representatives("plain") + _representatives("pnnh") + _representatives("looks_linear")
RESIDUAL = _representatives("resnet") + _representatives("preact_resnet")


def test_representatives_cover_every_layout_and_block_type():
    def kinds(names):  # (family, layout, bottleneck?) of each representative
        return {(model_info(n).family, model_info(n).layout, model_info(n).depth in (50, 101, 152, 164, 1001))
                for n in names}

    # each family covers CIFAR basic + bottleneck and ImageNet basic + bottleneck
    for fam in ("plain", "pnnh", "looks_linear"):
        assert {(l, b) for f, l, b in kinds(PLAIN) if f == fam} == {("cifar", False), ("cifar", True),
                                                                      ("imagenet", False), ("imagenet", True)}, fam
    assert {(l, b) for f, l, b in kinds(RESIDUAL) if f == "resnet"} == {("cifar", False), ("cifar", True),
                                                                          ("imagenet", False), ("imagenet", True)}
    assert {(l, b) for f, l, b in kinds(RESIDUAL) if f == "preact_resnet"} == {("cifar", False), ("cifar", True)}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_and_pnnh_models_have_no_residual_connection(name):
    m = pnnh.create_model(name)
    assert find_residual_connections(m) == []


@pytest.mark.parametrize("coder", ["tied", "shared"])
def test_every_coder_variant_is_plain(coder):
    assert is_plain(pnnh.create_model("pnnh20", coder=coder), torch.randn(2, 1, 28, 28))
    assert is_plain(pnnh.create_model("pnnh164", coder=coder, width=0.25))


@pytest.mark.parametrize("name", RESIDUAL)
def test_every_resnet_fails(name):
    found = find_residual_connections(pnnh.create_model(name))
    assert found, name
    n_blocks = len(pnnh.create_model(name).blocks())
    # identity (and option-A) shortcuts are found; projection shortcuts have parameters on both sides
    assert len(found) >= n_blocks - 4


def test_every_cifar_resnet20_block_is_found_with_shapes():
    found = find_residual_connections(pnnh.create_model("resnet20"), torch.randn(2, 1, 28, 28))
    assert len(found) == 9  # option-A shortcuts (pad + subsample) are parameter-free too
    assert {f.shape for f in found} == {(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)}


class _Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        x = F.relu(self.conv(x))
        k = self.kind
        if k == "identity":
            return x + self.conv2(x)
        if k == "scaled_sub":
            return self.conv2(x) - 0.5 * F.max_pool2d(F.dropout(x, 0.1), 1)
        if k == "dense":
            return torch.cat([x.view(x.shape), self.conv2(x)], 1)
        if k == "highway":
            t = torch.sigmoid(self.gate(x))
            return t * self.conv2(x) + (1 - t) * x
        if k == "functional":
            return F.conv2d(x, self.w, padding=1).add(x)
        if k == "crelu":
            return F.relu(torch.cat([x, -x[:, 2:]], 1))
        if k == "projection":
            return self.conv2(x) + self.gate(x)
        if k == "weight_level_identity":  # DiracNet-style: identity folded into the weight, not a shortcut
            w = self.w + torch.cat([self.w[:, :2], self.w[:, 2:]], 1)
            return F.conv2d(x, w, padding=1)
        raise ValueError(k)


@pytest.mark.parametrize("kind,residual", [
    ("identity", True), ("scaled_sub", True), ("dense", True), ("highway", True), ("functional", True),
    ("crelu", False), ("projection", False), ("weight_level_identity", False)])
def test_detector_on_handmade_graphs(kind, residual):
    assert bool(find_residual_connections(_Net(kind))) is residual


@pytest.mark.parametrize("name", ["plain_vit_mini_d6", "pnnh_vit_mini_d6", "plain_vit_tiny_d12", "pnnh_vit_tiny_d12"])
def test_plain_and_pnnh_vits_have_no_residual_connection(name):
    assert find_residual_connections(pnnh.create_model(name)) == []


def test_residual_vit_fails_with_two_adds_per_block():
    m = pnnh.create_model("vit_mini_d6")
    assert len(find_residual_connections(m)) == 2 * 6  # attention and MLP sub-layers of each block
