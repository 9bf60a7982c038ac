"""PNNH CNNs: layout twins of the ResNets, the coder's internal path, and the plain-conv folding."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.analysis.probes import learner_activity
from pnnh.analysis.structure import is_plain
from pnnh.errors import ConfigError
from pnnh.models.layers import dirac_weight
from pnnh.models.pnnh_cnn import CoderSpec, PNNHLayer, TiedCoderLayer
from pnnh_codes import layer_codes, randomise_bn, run_folded_layers


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def n_weighted(m: nn.Module) -> int:
    """Conv layers (PNNH layers count once each) + linear layers, excluding projection shortcuts."""
    n = 0
    for name, mod in m.named_modules():
        if "shortcut" in name:
            continue
        if isinstance(mod, (PNNHLayer, TiedCoderLayer, nn.Conv2d, nn.Linear)):
            n += 1
    return n


@pytest.mark.parametrize("depth", [20, 56, 164])
def test_same_depth_fewer_parameters_than_resnet_twin(depth):
    p, r, ll = (pnnh.create_model(f"{f}{depth}") for f in ("pnnh", "resnet", "llplain"))
    assert n_weighted(p) == n_weighted(r) == depth
    assert len(p.blocks()) == len(r.blocks())
    assert n_params(ll) < n_params(p) < n_params(r)
    # default r=0.25: each conv has 7/8 of the twin's outputs; r=0.5: 3/4; r=1: half (the fc layer differs)
    assert abs(n_params(p) / n_params(r) - 0.875) < 0.03
    half = pnnh.create_model(f"pnnh{depth}", coder_ratio=0.5)
    assert abs(n_params(half) / n_params(r) - 0.75) < 0.03
    assert abs(n_params(ll) / n_params(r) - 0.5) < 0.03


def test_imagenet_layout_and_uniform_interface(check_cnn_interface):
    m = pnnh.create_model("pnnh18", num_classes=7, in_chans=3, width=0.25).eval()
    assert n_weighted(m) == 18 and m.default_cfg["input_size"] == (3, 224, 224)
    check_cnn_interface(m, torch.randn(2, 3, 64, 64), (2, 128, 2, 2))
    assert n_weighted(pnnh.create_model("pnnh50", width=0.25)) == 50


def test_identity_coder_carries_the_code_unchanged_through_the_relus():
    # the path in the init alone (with path_param="dirac" the coder starts at P + 0.1 V/|V|, not exactly P);
    # batch statistics: BN of a unit code is ~identity
    m = pnnh.create_model("pnnh20", coder_mix=0.0, path_param="init").train()
    codes = layer_codes(m, torch.randn(16, 1, 28, 28))
    stem, stage1_last, transition = codes[0], codes[6], codes[7]
    assert torch.allclose(stem, stage1_last, atol=1e-3)  # 6 layers later, the same tensor
    # the stride-2 layer copies the subsampled code into its first channels (BN re-standardises the
    # subsample: equal up to a per-channel affine map), and He-inits the rest
    sub = stage1_last[:, :, ::2, ::2]
    copied = transition[:, : sub.shape[1]]
    for c in range(sub.shape[1]):
        assert torch.corrcoef(torch.stack([copied[:, c].flatten(), sub[:, c].flatten()]))[0, 1] > 0.9999
    assert not torch.allclose(transition[:, sub.shape[1]:], torch.zeros(()), atol=1e-2)


def test_coder_init_options_change_the_path():
    x = torch.randn(16, 1, 28, 28)
    orth = layer_codes(pnnh.create_model("pnnh20", coder_mix=0.0, coder_init="orthogonal").train(), x)
    # an orthogonal map keeps the code's norm (BN of a unit-variance code is ~identity) but mixes channels
    assert torch.allclose(orth[1].norm(), orth[0].norm(), rtol=0.02) and not torch.allclose(orth[1], orth[0], atol=0.1)
    he = layer_codes(pnnh.create_model("pnnh20", coder_init="he").train(), x)
    assert F.cosine_similarity(he[0].flatten(), he[6].flatten(), 0).abs() < 0.3  # no internal path at init
    mix = layer_codes(pnnh.create_model("pnnh20", coder_mix=0.1).train(), x)
    assert 0.9 < F.cosine_similarity(mix[0].flatten(), mix[6].flatten(), 0) < 0.9999


def test_dirac_learner_init_copies_the_previous_learner_channels():
    m = pnnh.create_model("pnnh20", learner_init="dirac", coder_mix=0.0).train()
    outs = []
    hooks = [l.register_forward_hook(lambda mod, i, o: outs.append(o[:, :mod.n_learn])) for l in m.pnnh_layers()[:3]]
    m(torch.randn(8, 1, 28, 28))
    # layer 2's learner = relu(BN(layer 1's learner)): non-negative inputs, standardised by BN, cut by ReLU
    a, b = outs[1], outs[2]
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    with pytest.raises(ConfigError, match="learner_init"):
        pnnh.create_model("pnnh20", learner_init="zeros")


@pytest.mark.parametrize("kw", [{}, {"coder": "shared"}, {"coder_ratio": 1.0}, {"coder_ratio": 0.0}])
def test_as_plain_conv_folds_the_net_into_a_conv_relu_chain(kw):
    m = pnnh.create_model("pnnh20", **kw)
    randomise_bn(m)
    m.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():  # one conv per layer, the layer's full width, no concat
        assert torch.allclose(run_folded_layers(m, x), m.forward_features(x), atol=1e-4)


def test_deploy_turns_pnnh_into_a_pure_conv_relu_chain():
    m = pnnh.create_model("pnnh20")
    randomise_bn(m)
    m.eval()
    x = torch.randn(3, 1, 28, 28)
    fused = pnnh.deploy(m, fuse_relu=False, channels_last=False)
    assert isinstance(fused, nn.Sequential)
    kinds = {type(mod) for mod in fused.modules()} - {nn.Sequential}
    assert kinds <= {nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}, kinds
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), atol=1e-4, rtol=1e-4)


def test_deploy_keeps_the_model_dtype_and_device():
    """A PNNH layer folds into a conv where its weights are and in their dtype, so a model deployed on a
    GPU keeps its convs there (tests/cuda); the dtype shows the same on a machine without a GPU."""
    m = pnnh.create_model("pnnh8").double()
    randomise_bn(m)
    m.eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    fused = pnnh.deploy(m, fuse_relu=False, channels_last=False)
    assert {p.dtype for p in fused.parameters()} == {torch.float64}
    assert {p.device for p in fused.parameters()} == {p.device for p in m.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), m(x), atol=1e-8, rtol=1e-8)


def test_tied_coder_does_not_fold_and_is_a_transpose():
    m = pnnh.create_model("pnnh20", coder="tied")
    layer = m.pnnh_layers()[1]
    assert isinstance(layer, TiedCoderLayer)
    with pytest.raises(ConfigError, match="does not fold"):
        layer.as_plain_conv()
    assert not any("dec" in n for n, _ in m.named_parameters())  # the decoder is the encoder, transposed


def test_shared_coder_is_one_parameter_per_stage_and_saves(tmp_path):
    from pnnh.train import load_weights, save_weights

    m = pnnh.create_model("pnnh20", coder="shared")
    layers = [l for l in m.pnnh_layers() if l._shared is not None]
    assert len({id(l._shared.weight) for l in layers}) == 3  # one per stage
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == len(set(names)) and sum("shared_coders" in n for n in names) == 3
    assert len(m.state_dict()) == len(set(m.state_dict()))
    save_weights(tmp_path / "w.safetensors", m)
    m2 = pnnh.create_model("pnnh20", coder="shared")
    load_weights(tmp_path / "w.safetensors", m2)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(m.eval()(x), m2.eval()(x))
    # the sharing survives: a gradient step moves the shared weight seen by every layer
    m2.train()
    m2(x).sum().backward()
    assert m2.shared_coders[0].weight.grad is not None


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="coder"):
        pnnh.create_model("pnnh20", coder="magic")
    with pytest.raises(ConfigError, match="coder_ratio"):
        pnnh.create_model("pnnh20", coder_ratio=1.5)
    with pytest.raises(ConfigError, match="coder_ratio must be a number, got '0.5'"):
        pnnh.create_model("pnnh20", coder_ratio="0.5")  # a string from a hand-made config, not a TypeError
    with pytest.raises(ConfigError, match="learner_bias must be a number"):
        pnnh.create_model("pnnh20", learner_bias=None)
    with pytest.raises(ConfigError, match="coder_init"):
        pnnh.create_model("pnnh20", coder_init="zeros")
    with pytest.raises(ConfigError, match="fix"):
        pnnh.create_model("llplain20", coder_ratio=0.5)
    with pytest.raises(ConfigError, match="3 stages"):
        pnnh.create_model("pnnh20").__class__((1,), layout="cifar")
    from pnnh.models.pnnh_cnn import cifar_pnnh

    with pytest.raises(ConfigError, match="6n\\+2"):
        cifar_pnnh(21)


@pytest.mark.parametrize("coder", ["mirror", "pointwise"])
def test_path_beta_sets_how_far_every_filter_starts_from_its_path(coder):
    # W = alpha P + beta V/|V| with alpha = 1: each filter starts exactly path_beta away from its path P
    for beta in (0.1, 0.02):
        m = pnnh.create_model("pnnh20", coder=coder, path_beta=beta)
        layers = [mod for mod in m.modules() if getattr(mod, "dirac", None) is not None]
        assert len(layers) > 10
        for mod in layers:
            w = mod.dirac(mod.weight).detach()
            dist = (w - mod.dirac.path).flatten(1).norm(dim=1)
            torch.testing.assert_close(dist, torch.full_like(dist, beta))
            torch.testing.assert_close(mod.weight.detach().flatten(1).norm(dim=1), torch.full_like(dist, beta))
    with pytest.raises(ConfigError, match="path_beta must be a finite number > 0, got 0"):
        pnnh.create_model("pnnh20", path_beta=0)
    with pytest.raises(ConfigError, match="path_beta must be a finite number > 0, got 'x'"):
        pnnh.create_model("pnnh20", path_beta="x")


def test_path_beta_reaches_the_pnnh_linear_layer():
    from pnnh.models.pnnh_linear import PNNHLinear

    layer = PNNHLinear(16, 16, spec=CoderSpec(path_param="dirac", path_beta=0.05))
    torch.testing.assert_close(layer.dirac.beta.detach(), torch.full((layer.dirac.beta.numel(),), 0.05))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_mirror_equals_the_eager_cat_form_in_value_gradient_and_layout(fmt):
    from pnnh.models.pnnh_cnn import mirror

    torch.manual_seed(0)
    a = torch.randn(4, 12, 5, 5).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(4, 16, 5, 5)
    ref = torch.cat([a, -a[:, 8:]], 1)
    (ga_ref,) = torch.autograd.grad(ref, a, g)
    y = mirror(a, 8)
    (ga,) = torch.autograd.grad(y, a, g)
    assert torch.equal(y, ref) and torch.equal(ga, ga_ref)
    # the gradient handed back to the conv is dense in the input's layout
    assert y.is_contiguous(memory_format=fmt) and ga.is_contiguous(memory_format=fmt)


def test_learner_mix_adds_he_noise_of_that_scale_to_the_identity_learner():
    torch.manual_seed(0)
    pure = PNNHLayer(64, 64, n_code=8, in_code=8, spec=CoderSpec(path_param="init"))
    noisy = PNNHLayer(64, 64, n_code=8, in_code=8, spec=CoderSpec(learner_mix=0.5, path_param="init"))
    m = pure.n_learn
    assert torch.equal(pure.weight[:m, :m, 1, 1], torch.eye(m))
    assert torch.count_nonzero(pure.weight[:m]) == m  # pure identity: nothing else
    noise = noisy.weight[:m] - pure.weight[:m].detach()
    he_std = (2.0 / (64 * 9)) ** 0.5
    assert abs(noise.std().item() / (0.5 * he_std) - 1) < 0.05
    with pytest.raises(ConfigError, match="learner_mix"):
        pnnh.create_model("pnnh20", learner_mix=-1)


def test_learner_bias_keeps_the_identity_carried_features_alive_with_depth():
    """At ``learner_bias=0`` each dirac layer's ReLU keeps only the above-mean part of its input,
    so few learner units are still active 54 layers on; a positive BN shift keeps about half."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    torch.manual_seed(1)
    thin = learner_activity(pnnh.create_model("pnnh56").train(), x)[0][-1]
    torch.manual_seed(1)
    kept = learner_activity(pnnh.create_model("pnnh56", learner_bias=0.5).train(), x)[0][-1]
    assert thin < 0.15 and kept > 0.35, (thin, kept)
    with pytest.raises(ConfigError, match="no PNNH layers"):
        learner_activity(pnnh.create_model("plain20"), x)


def test_learner_bias_shifts_only_the_identity_rows_and_is_validated():
    layer = PNNHLayer(64, 64, n_code=8, in_code=8, spec=CoderSpec(learner_bias=0.5))
    m = layer.n_learn
    assert torch.all(layer.bn.bias[:m] == 0.5) and torch.all(layer.bn.bias[m:] == 0)
    he_layer = PNNHLayer(64, 64, n_code=8, in_code=8, spec=CoderSpec(learner_init="he", learner_bias=0.5))
    assert torch.all(he_layer.bn.bias == 0)  # no identity rows: nothing to keep alive
    stem = PNNHLayer(1, 16, n_code=2, in_code=0, spec=CoderSpec(learner_bias=0.5))
    assert torch.all(stem.bn.bias == 0)
    with pytest.raises(ConfigError, match="learner_bias"):
        pnnh.create_model("pnnh20", learner_bias=float("nan"))


def test_dirac_path_param_keeps_the_identity_as_a_buffer_and_computes_the_filters():
    """``path_param="dirac"``: ``W = diag(alpha) P + diag(beta) V/|V|`` with ``P`` the identity entries
    of the init (learner eye, coder +I/-I), fixed; ``V`` trained; one conv per layer as before."""
    layer = PNNHLayer(64, 64, n_code=8, in_code=8, spec=CoderSpec(path_param="dirac"))
    ref = PNNHLayer(64, 64, n_code=8, in_code=8, spec=CoderSpec(path_param="init"))  # the same identity entries
    path = (ref.weight.detach() != 0) & (ref.weight.detach().abs() == 1)
    assert torch.equal(layer.dirac.path != 0, path) and torch.equal(layer.dirac.path[path], ref.weight.detach()[path])
    assert "dirac.path" in layer.state_dict() and not layer.dirac.path.requires_grad
    w = layer.conv_weight()
    v = layer.weight.detach().flatten(1)
    expected = layer.dirac.path + 0.1 * (v / v.norm(dim=1, keepdim=True)).view_as(layer.weight)
    torch.testing.assert_close(w.detach(), expected)
    # the identity survives a large step on V: only beta * V/|V| (norm 0.1 per filter) moves
    with torch.no_grad():
        layer.weight.mul_(-50.0).add_(torch.randn_like(layer.weight))
    drift = (layer.conv_weight().detach() - layer.dirac.path).flatten(1).norm(dim=1)
    torch.testing.assert_close(drift, torch.full_like(drift, 0.1))


def test_dirac_path_param_trains_folds_and_is_validated():
    torch.manual_seed(0)
    m = pnnh.create_model("pnnh20", path_param="dirac")
    x = torch.randn(16, 1, 28, 28)
    m.train()
    out_ref = m(x)
    m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last).train()  # the CPU training kernels
    out_cl = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out_ref, atol=1e-4, rtol=1e-4)
    out_cl.square().mean().backward()
    layer = m_cl.stages[1][1].layers[0]
    assert layer.dirac.alpha.grad.abs().sum() > 0 and layer.dirac.beta.grad.abs().sum() > 0
    m.eval()
    torch.testing.assert_close(pnnh.deploy(m)(x), m(x), atol=1e-4, rtol=1e-4)
    assert is_plain(m, x)
    with pytest.raises(ConfigError, match="path_param"):
        pnnh.create_model("pnnh20", path_param="identity")
    with pytest.raises(ConfigError, match="own weights per layer, not 'tied'"):
        pnnh.create_model("pnnh20", path_param="dirac", coder="tied")


def test_the_default_keeps_the_path_in_the_parametrisation_where_the_coder_supports_it():
    """``path_param="auto"``: the mirrored coder (the default) gets ``"dirac"``; shared and tied
    coders, and the looks-linear nets of the literature, keep the path in the init."""
    def param(m):
        return {layer.dirac is not None for layer in m.pnnh_layers() if isinstance(layer, PNNHLayer)}

    assert param(pnnh.create_model("pnnh20")) == {True}
    assert param(pnnh.create_model("pnnh20", coder="shared")) == {False}
    assert param(pnnh.create_model("pnnh20", coder="tied")) == {False}  # its stem too
    assert param(pnnh.create_model("llplain20")) == {False}
    assert param(pnnh.create_model("llplain20", path_param="dirac")) == {True}
    assert CoderSpec().path_param == "dirac" and CoderSpec(coder="tied").path_param == "init"


@pytest.mark.parametrize("rows", [1, 2])
def test_dirac_weight_backward_matches_autograd(rows):
    """The hand-written backward of ``alpha P + beta V/|V|`` (one weight, or ``L`` stacked ones)."""
    from pnnh.models.layers import _DiracWeightFunction

    torch.manual_seed(0)
    lead = (4,) if rows == 1 else (2, 4)
    path = torch.randn(*lead, 3, 3, 3, dtype=torch.double)
    alpha, beta = (torch.randn(*lead, dtype=torch.double, requires_grad=True) for _ in range(2))
    v = torch.randn(*lead, 3, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: _DiracWeightFunction.apply(path, a, w, b), (alpha, v, beta))
    with torch.no_grad():  # the graph-free branch computes the same values
        torch.testing.assert_close(dirac_weight(path, alpha, v, beta), _DiracWeightFunction.apply(path, alpha, v, beta))
