"""The structural guarantee: every plain and PNNH net has no residual connection; every ResNet has."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.analysis.structure import find_residual_connections, is_plain
from pnnh.models import list_models, model_info
from resnet_replicas import TVBasicBlock, conv1x1


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


def test_mirror_and_shared_coders_are_plain():
    for coder in ("mirror", "shared"):
        assert is_plain(pnnh.create_model("pnnh20", coder=coder), torch.randn(2, 1, 28, 28)), coder
        assert is_plain(pnnh.create_model("pnnh164", coder=coder, width=0.25)), coder


def test_tied_coder_is_reported_as_a_projection_shaped_sum():
    # W_l x + E^T relu(BN(E x)): one conv summed with a two-conv branch of the same input
    found = find_residual_connections(pnnh.create_model("pnnh20", coder="tied"))
    assert len(found) == 18 and all((f.shortcut_layers, f.branch_layers) == (1, 2) for f in found)


@pytest.mark.parametrize("name", RESIDUAL)
def test_every_resnet_fails_at_every_block(name):
    m = pnnh.create_model(name)
    found = find_residual_connections(m)
    assert len(found) == len(m.blocks()), name  # identity, option-A and projection shortcuts alike


def _catalogue() -> list[str]:
    fams = ("wrn", "resnext", "highway", "se_resnet", "multires", "scaled_resnet", "demystify", "shared_resnet",
            "droppath_resnet")
    return [min(list_models(family=f), key=lambda n: model_info(n).depth) for f in fams]


@pytest.mark.parametrize("name", _catalogue())
def test_every_catalogue_model_fails_at_every_block(name):
    m = pnnh.create_model(name)
    found = find_residual_connections(m)
    per_block = 2 if model_info(name).family == "highway" else 1  # T H + (1 - T) x: the product carries x too
    assert len(found) == per_block * len(m.blocks()), name


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
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.proj = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.alpha = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.register_buffer("ones", torch.ones(1, 4, 1, 1))  # fixed tensors: no parameter
        self.register_buffer("eye", torch.eye(4).view(4, 4, 1, 1))
        self.fc = nn.Linear(12, 4)
        self.enc = nn.Linear(4, 4)

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
        if k == "buffer_scale":  # x * a fixed buffer is x
            return self.conv2(x) + x * self.ones
        if k == "buffer_conv":  # a 1x1 conv with a fixed identity kernel is x
            return self.conv2(x) + F.conv2d(x, self.eye)
        if k == "eye_in_forward":
            return self.conv2(x) + F.conv2d(x, torch.eye(4).view(4, 4, 1, 1))
        if k == "lerp":
            return torch.lerp(x, self.conv2(x), 0.5)
        if k == "addcmul":
            return torch.addcmul(x, torch.sigmoid(self.gate(x)), self.conv2(x))
        if k == "where":
            return torch.where(x > 1, x, self.conv2(x))
        if k == "mul_of_sum":  # x (1 + f(x)) = x + x f(x)
            return x * (1 + self.conv2(x))
        if k == "stack_sum":
            return torch.stack([x, self.conv2(x)]).sum(0)
        if k == "cat_then_add":
            y = torch.cat([x, self.conv2(x)], 1)
            return y[:, :4] + y[:, 4:]
        if k == "stack_sum_projection":  # a summed stack is an addition: projection beside the branch
            return torch.stack([self.proj(x), self.bn2(self.conv2(F.relu(self.bn(self.gate(x)))))]).sum(0)
        if k == "cat_then_add_projection":
            y = torch.cat([self.proj(x), self.bn2(self.conv2(F.relu(self.bn(self.gate(x)))))], 1)
            return y[:, :4] + y[:, 4:]
        if k == "learned_gain":  # SkipInit / ReZero style: a learned scalar is no weighted layer
            return self.alpha * x + self.conv2(x)
        if k == "projection_bn":  # torchvision's downsample: conv1x1 + BN beside conv-BN-ReLU-conv-BN
            return F.relu(self.bn2(self.conv2(F.relu(self.bn(self.gate(x))))) + self.proj(x))
        if k == "crelu":
            return F.relu(torch.cat([x, -x[:, 2:]], 1))
        if k == "inception":  # two parallel branches of equal depth: nothing skipped
            return self.conv2(x) + self.gate(x)
        if k == "gating":  # squeeze-excitation-like: x scaled by a function of itself
            return x * torch.sigmoid(self.gate(x))
        if k == "pnnh_vit_like":  # [learner(x) ; relu(E x) ; relu(-E x)] read by one linear layer
            t = x.flatten(2).transpose(1, 2)
            e = self.enc(t)
            return self.fc(torch.cat([self.enc(torch.tanh(self.enc(t))), F.relu(e), F.relu(-e)], -1))
        if k == "weight_level_identity":  # DiracNet-style: identity folded into the weight, not a shortcut
            w = self.w + torch.cat([self.w[:, :2], self.w[:, 2:]], 1)
            return F.conv2d(x, w, padding=1)
        raise ValueError(k)


SHORTCUTS = ["identity", "scaled_sub", "dense", "highway", "functional", "buffer_scale", "buffer_conv",
             "eye_in_forward", "lerp", "addcmul", "where", "mul_of_sum", "stack_sum", "cat_then_add", "projection_bn",
             "stack_sum_projection", "cat_then_add_projection", "learned_gain"]
NOT_SHORTCUTS = ["crelu", "inception", "gating", "pnnh_vit_like", "weight_level_identity"]


@pytest.mark.parametrize("kind", SHORTCUTS)
def test_detector_finds_each_shape_of_shortcut(kind):
    found = find_residual_connections(_Net(kind), torch.randn(2, 4, 6, 6))
    assert found, kind
    assert all(f.shortcut_layers < f.branch_layers for f in found)


@pytest.mark.parametrize("kind", NOT_SHORTCUTS)
def test_detector_passes_merges_that_skip_nothing(kind):
    assert find_residual_connections(_Net(kind), torch.randn(2, 4, 6, 6)) == []


def test_projection_shortcut_names_the_shorter_path():
    (f,) = find_residual_connections(_Net("projection_bn"))
    assert (f.shortcut_layers, f.branch_layers) == (1, 2) and f.shortcut_operand.startswith("proj")


def _projection_block(inplanes, planes, stride=1):
    """torchvision's BasicBlock with its projection shortcut: ``relu(bn2(conv2(...)) + downsample(x))``."""
    downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return TVBasicBlock(inplanes, planes, stride, downsample)


def test_a_resnet_of_projection_blocks_only_is_not_plain():
    net = nn.Sequential(_projection_block(3, 8), _projection_block(8, 16, 2), _projection_block(16, 16))
    found = find_residual_connections(net, torch.randn(2, 3, 16, 16))
    assert len(found) == 3
    assert {f.shape for f in found} == {(2, 8, 16, 16), (2, 16, 8, 8)}


@pytest.mark.parametrize("name,kw", [("plain_vit_mini_d6", {}), ("pnnh_vit_mini_d6", {}), ("plain_vit_tiny_d12", {}),
                                     ("pnnh_vit_tiny_d12", {}), ("pnnh_vit_tiny_d12", {"coder": "sublayer"})])
def test_plain_and_pnnh_vits_have_no_residual_connection(name, kw):
    assert find_residual_connections(pnnh.create_model(name, **kw)) == []


def test_residual_vit_fails_with_two_adds_per_block():
    m = pnnh.create_model("vit_mini_d6")
    assert len(find_residual_connections(m)) == 2 * 6  # attention and MLP sub-layers of each block


def test_a_concatenation_added_whole_to_a_function_of_itself_is_one_shortcut():
    """``y = cat(pool_proj(x), conv(x))`` then ``y + F(y)``: the add is the shortcut; no part of ``y``
    is added to another part, so the concatenation of parts of different depths is not one."""

    class ReductionThenResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.f = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = torch.cat([self.a(F.max_pool2d(x, 1)), self.c(F.relu(self.b(x)))], 1)
            return y + self.f(y)

    (f,) = find_residual_connections(ReductionThenResidual())
    assert f.op == "add" and f.shortcut_layers == 0
    assert len(find_residual_connections(pnnh.create_model("inception_resnet_s"))) == 8  # 2 + 4 + 2 blocks
