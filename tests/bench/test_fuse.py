"""Deployment fusion: BatchNorm folded into convs, plain nets become a pure conv-ReLU chain."""

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.bench.fuse import ConvReLU2d, deploy, fold_conv_bn
from pnnh.errors import ConfigError


def _randomise_bn(model: nn.Module, calibrate: torch.Tensor | None = None) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, as after training.

    With ``calibrate``, the running statistics are those of that batch (one train-mode pass with a
    cumulative average), so activations stay O(1) through a deep net as in a trained one.
    """
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            if calibrate is not None:
                m.reset_running_stats()
                m.momentum = None
    if calibrate is not None:
        was = model.training
        with torch.no_grad():
            model.train()(calibrate)
        model.train(was)
    return model


def _assert_same_outputs(model, deployed, x):
    with torch.no_grad():
        ref, got = model.eval()(x), deployed(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# A BatchNorm'd plain164 at init is chaotic: its own fp32 and fp64 outputs differ by O(1), so no
# rewrite can match it to 1e-4 in fp32. It is compared in float64, where any folding error would show.
@pytest.mark.parametrize("name,dtype", [("plain20", torch.float32), ("plain56", torch.float32),
                                        ("plain18", torch.float32), ("plain164", torch.float64)])
def test_plain_nets_become_a_pure_conv_relu_chain(name, dtype):
    model = pnnh.create_model(name, width=0.5, img_size=32).to(dtype)
    model = _randomise_bn(model, torch.randn(16, 1, 32, 32, dtype=dtype)).train()
    x = torch.randn(3, 1, 32, 32, dtype=dtype)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    # portable form: exactly conv(+bias) -> ReLU pairs, then the head
    portable = pnnh.deploy(model, fuse_relu=False, channels_last=False)
    deployed = pnnh.deploy(model)
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # source untouched
    assert isinstance(portable, nn.Sequential)
    kinds = [type(m) for m in portable]
    allowed = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)
    assert all(k in allowed for k in kinds), kinds
    convs = [i for i, k in enumerate(kinds) if k is nn.Conv2d]
    assert len(convs) == n_convs and all(kinds[i + 1] is nn.ReLU for i in convs)
    assert all(portable[i].bias is not None for i in convs)
    _assert_same_outputs(model, portable, x)
    # default (fast) form: each conv-ReLU pair is one ConvReLU2d, weights channels-last
    assert isinstance(deployed, nn.Sequential)
    assert [type(m) for m in deployed if isinstance(m, nn.Conv2d)] == [ConvReLU2d] * n_convs
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d)) for m in deployed)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in deployed if isinstance(m, nn.Conv2d))
    assert not any(p.requires_grad for p in deployed.parameters())
    assert deployed.pnnh_name == name and deployed.default_cfg == model.default_cfg
    _assert_same_outputs(model, deployed, x)


def test_conv_relu_uses_the_fused_kernel_and_falls_back_with_the_same_result():
    from pnnh.bench import fuse

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).eval()
    fused = ConvReLU2d.from_conv(conv).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        ref = torch.relu(conv(x))
        fuse._FUSED_KERNEL = None
        torch.testing.assert_close(fused(x), ref)
        if torch.backends.mkldnn.is_available():  # x86/ARM builds with oneDNN: the fused kernel was used
            assert fuse._FUSED_KERNEL is True
        torch.testing.assert_close(fused(x.contiguous(memory_format=torch.channels_last)), ref)
    x.requires_grad_()
    out = fused(x)  # needs a gradient: the plain path, with autograd
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref)
    assert x.grad is not None


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_residual_nets_fold_every_batchnorm_and_keep_their_adds(name):
    model = _randomise_bn(pnnh.create_model(name, width=0.25, img_size=32), torch.randn(16, 1, 32, 32))
    deployed = pnnh.deploy(model)
    assert isinstance(deployed, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    _assert_same_outputs(model, deployed, torch.randn(3, 1, 32, 32))


def test_preact_nets_fold_what_follows_a_conv_only():
    model = _randomise_bn(pnnh.create_model("preact_resnet20", width=0.5))
    deployed = pnnh.deploy(model)
    # folded: bn2 (after conv1) of the 9 blocks and the BN of the 2 projection shortcuts; kept: each
    # block's bn1 and the final norm, which normalise a sum (no conv right before them)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == 10
    _assert_same_outputs(model, deployed, torch.randn(3, 1, 28, 28))


def test_fold_conv_bn_matches_the_two_layers_and_torch():
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=True).eval(), _randomise_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    # running variances down to 1e-4, as in a trained net's quiet channels: there eps = 1e-5 is
    # a 5% term, so a fold that forgets it is far outside float32 rounding
    bn.running_var.copy_(torch.logspace(-4, 0, 6))
    x = torch.randn(2, 3, 8, 8)
    fused = fold_conv_bn(conv, bn)
    with torch.no_grad():
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        w = conv.weight.double() * scale.view(-1, 1, 1, 1)
        b = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
        # folded in float64 and rounded once: within float32's half-ulp of the exact fold
        torch.testing.assert_close(fused.weight.double(), w, rtol=1e-7, atol=0)
        torch.testing.assert_close(fused.bias.double(), b, rtol=1e-7, atol=0)
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
        ref = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        torch.testing.assert_close(fused.weight, ref.weight, rtol=1e-6, atol=0)
        torch.testing.assert_close(fused.bias, ref.bias, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="running statistics"):
        fold_conv_bn(conv, nn.BatchNorm2d(6, track_running_stats=False))


# -- the plain-conv protocol: a module with as_plain_conv() is replaced by that conv -------------------

class MirroredLayer(nn.Module):
    """A toy PNNH-style layer: learner conv plus a coder conv emitted with its mirror image.

    ``forward`` is deliberately not fx-traceable (it branches on a tensor value): the protocol
    keeps such layers as leaves and never traces inside them.
    """

    def __init__(self, cin, learn, code, as_sequential=False):
        super().__init__()
        self.learner = nn.Conv2d(cin, learn, 3, padding=1, bias=False)
        self.coder = nn.Conv2d(cin, code, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(learn + 2 * code) if as_sequential else None

    def forward(self, x):
        if x.sum() > 1e30:  # data-dependent branch: symbolic tracing would fail here
            return x
        c = self.coder(x)
        out = torch.cat([self.learner(x), c, -c], 1)
        return self.norm(out) if self.norm is not None else out

    def as_plain_conv(self):
        w = torch.cat([self.learner.weight, self.coder.weight, -self.coder.weight])
        conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=False)
        conv.weight = nn.Parameter(w.detach().clone())
        return conv if self.norm is None else nn.Sequential(conv, self.norm)


class ToyPnnhNet(nn.Module):
    def __init__(self, as_sequential=False):
        super().__init__()
        self.layer1 = MirroredLayer(1, 4, 2, as_sequential)
        self.bn1, self.act1 = nn.BatchNorm2d(8), nn.ReLU()
        self.layer2 = MirroredLayer(8, 4, 4, as_sequential)
        self.bn2, self.act2 = nn.BatchNorm2d(12), nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.act1(self.bn1(self.layer1(x)))
        x = self.act2(self.bn2(self.layer2(x)))
        return self.fc(self.drop(torch.flatten(x.mean((2, 3), keepdim=True), 1)))


@pytest.mark.parametrize("as_sequential", [False, True])
def test_as_plain_conv_protocol_turns_pnnh_style_layers_into_a_plain_chain(as_sequential):
    model = _randomise_bn(ToyPnnhNet(as_sequential))
    deployed = deploy(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, MirroredLayer, nn.Dropout)) for m in deployed.modules())
    convs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 12]
    _assert_same_outputs(model, deployed, torch.randn(4, 1, 12, 12))


def test_a_weight_shared_conv_gets_one_fused_copy_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x))))))

    model = _randomise_bn(Shared())
    deployed = deploy(model)
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    _assert_same_outputs(model, deployed, torch.randn(2, 4, 6, 6))


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ConfigError, match="torch.fx could not trace"):
        deploy(Branchy())


def _parameter_only_calls(gm: torch.fx.GraphModule) -> list[str]:
    """Calls of the deployed graph whose every input is a stored tensor (work that could be done once)."""
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and n.all_input_nodes and all(a.op == "get_attr" for a in n.all_input_nodes)]


@pytest.mark.parametrize("name,kwargs", [("vit_mini_d6", {}), ("pnnh_vit_mini_d6", {}),
                                         ("pnnh_vit_mini_d6", {"coder": "sublayer"}), ("dirac_vit_mini_d6", {}),
                                         ("pnnh_vit_mini_d6", {"path_param": "param"})])
def test_deployed_vits_compute_their_parameter_only_terms_once(name, kwargs):
    model = pnnh.create_model(name, **kwargs)
    with torch.no_grad():  # away from the identity-like init, as after training
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    deployed = deploy(model)
    assert _parameter_only_calls(deployed) == []
    stored = sum(t.numel() for t in deployed.state_dict().values())
    assert stored <= sum(p.numel() for p in model.parameters())  # folded terms replace what they were made of
    _assert_same_outputs(model, deployed, torch.randn(3, 1, 28, 28))


def test_deployed_dirac_vit_is_a_plain_vit_and_the_block_coder_reads_one_concatenation():
    dirac, vit = deploy(pnnh.create_model("dirac_vit_mini_d6")), deploy(pnnh.create_model("vit_mini_d6"))
    shapes = [sorted(tuple(t.shape) for t in m.state_dict().values()) for m in (dirac, vit)]
    assert shapes[0] == shapes[1]  # each DiracNet linear is one stored weight
    block = deploy(pnnh.create_model("pnnh_vit_mini_d6", coder="block"))
    cats = [n for n in block.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 6 and all(len(n.args[0]) == 4 for n in cats)  # [heads ; gelu ; relu(e) ; relu(-e)]


def test_constant_folding_keeps_random_and_input_dependent_work():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ (self.w * 2).t() + torch.rand_like(x) + self.w.sum(0).relu() * x.mean()

    model = Noisy()
    deployed = deploy(model)
    x = torch.randn(2, 4)
    assert not torch.equal(deployed(x), deployed(x))  # the sample is drawn at every call
    assert "w" not in dict(deployed.named_parameters()) and _parameter_only_calls(deployed) == []
    torch.manual_seed(3)
    ref = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(deployed(x), ref)


@pytest.mark.parametrize("name,kwargs,shortcuts", [("pnnh_vit_mini_d6", {}, 0),
                                                    ("pnnh_vit_mini_d6", {"coder": "sublayer"}, 0), ("dirac_vit_mini_d6", {}, 0),
                                                    ("pnnh20", {}, 0), ("plain20", {"init": "dirac_param"}, 0),
                                                    ("vit_mini_d6", {}, 12), ("resnet20", {}, 9)])
def test_deployment_keeps_what_the_structure_check_finds(name, kwargs, shortcuts):
    """Folded weights stay weights: a deployed plain or PNNH net is still plain, a residual one keeps its shortcuts."""
    from pnnh.analysis.structure import find_residual_connections

    model = pnnh.create_model(name, **kwargs)
    assert len(find_residual_connections(model)) == shortcuts
    assert len(find_residual_connections(deploy(model))) == shortcuts
