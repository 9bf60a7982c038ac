"""The residual catalogue: each option does what its paper says, not only the right shapes."""

import math

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.errors import ConfigError
from pnnh.models.catalogue import (BasicResidual, BottleneckResidual, DropPath, HighwayGate, PreActBasicResidual,
                                   ResidualBlock, SqueezeExcite, catalogue_resnet)
from pnnh.models.resnet import cifar_resnet

CATALOGUE_FAMILIES = ("scaled_resnet", "multires", "se_resnet", "highway", "demystify", "shared_resnet",
                      "droppath_resnet", "wrn", "resnext")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Load ``src``'s state into ``dst`` by position (the two name their layers differently)."""
    a, b = src.state_dict(), dst.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    dst.load_state_dict(dict(zip(b.keys(), a.values())))


def randomise_norms(m: nn.Module) -> None:
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5), mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1), mod.running_var.uniform_(0.5, 1.5)


# -- with every option off, the catalogue block is the ResNet family's block ------------------------

@pytest.mark.parametrize("ref,ours", [
    (lambda: cifar_resnet(20), lambda: catalogue_resnet((3, 3, 3))),
    (lambda: cifar_resnet(20, preact=True), lambda: catalogue_resnet((3, 3, 3), preact=True)),
    (lambda: cifar_resnet(29, bottleneck=True), lambda: catalogue_resnet((3, 3, 3), block="bottleneck")),
])
def test_default_block_computes_the_resnet_block(ref, ours):
    a, b = ref(), ours()
    randomise_norms(a)
    copy_weights(a, b)
    x = torch.randn(4, 1, 28, 28)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert n_params(a) == n_params(b)


# -- literature parameter counts (3 input channels, 10 classes) ------------------------------------
# WRN: Zagoruyko & Komodakis 2016 Tables 1/4 (8.9M, 11.0M, 17.2M, 36.5M; their "2.7M" for WRN-16-4 truncates
# the reference code's 2,748,890); our projection shortcuts carry a BN (+896 params on WRN-16-4, +2240 on
# WRN-28-10). ResNeXt-29: Xie et al. 2017 Table 7 (34.4M, 68.1M).

@pytest.mark.parametrize("name,expected", [
    ("wrn16_4", 2.749e6), ("wrn40_4", 8.9e6), ("wrn16_8", 11.0e6), ("wrn22_8", 17.2e6), ("wrn28_10", 36.5e6),
    ("resnext29_8x64d", 34.4e6), ("resnext29_16x64d", 68.1e6),
])
def test_literature_parameter_counts(name, expected):
    with torch.device("meta"):
        m = pnnh.create_model(name, in_chans=3)
    assert abs(n_params(m) - expected) / expected < 0.01, n_params(m)


# -- residual scaling ------------------------------------------------------------------------------

def set_output(module: nn.Module, value: torch.Tensor):
    return module.register_forward_hook(lambda mod, inp, out: value.expand_as(out).clone())


def test_scaled_branch_is_scaled():
    m = pnnh.create_model("scaled_resnet20").eval()
    blk = m.blocks()[4]
    assert blk.scale == pytest.approx(0.2)
    x = torch.rand(2, blk.branches[0][0].in_channels, 8, 8)  # non-negative, like a post-ReLU input
    branch_out = torch.full((1,), 3.0)
    h = set_output(blk.branches[0], branch_out)
    merged = []
    tap = blk.branch_out.register_forward_hook(lambda mod, inp, out: merged.append(out))
    y = blk(x)
    h.remove(), tap.remove()
    torch.testing.assert_close(y, torch.relu(x + 0.2 * 3.0))
    torch.testing.assert_close(merged[0], torch.full_like(x, 0.6))  # the residual as merged, after scaling
    # scale is a model option of every catalogue model
    assert all(b.scale == 0.1 for b in pnnh.create_model("se_resnet20", scale=0.1).blocks())


# -- multi-residual --------------------------------------------------------------------------------

def test_multi_residual_sums_k_branches():
    m = pnnh.create_model("multires20_k2", branches=3).eval()
    blk = m.blocks()[1]
    assert len(blk.branches) == 3
    assert len({id(b) for b in blk.branches}) == 3 and blk.branches[0][0].weight is not blk.branches[1][0].weight
    x = torch.rand(2, 16, 8, 8)
    hooks = [set_output(b, torch.tensor(v)) for b, v in zip(blk.branches, (0.5, -2.0, 4.0))]
    y = blk(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(y, torch.relu(x + 2.5))
    base = pnnh.create_model("resnet56")
    assert n_params(pnnh.create_model("multires56_k2")) == 2 * n_params(base) - n_params(base.stem) - n_params(base.fc)


# -- highway ---------------------------------------------------------------------------------------

def test_highway_gate_starts_near_carry():
    m = pnnh.create_model("highway20").eval()
    blk = m.blocks()[2]
    x = torch.relu(torch.randn(4, 16, 10, 10)) * 3  # a post-ReLU block input
    t = blk.gate(x)
    torch.testing.assert_close(t, torch.full_like(t, 1 / (1 + math.exp(3.0))))  # T = sigmoid(-3) ~ 0.047
    y = blk(x)
    assert ((y - x).norm() / x.norm()).item() < 0.1  # the block starts close to the identity
    # the gate's zero/−3 init survives the model-wide initialiser, and the gate learns
    assert isinstance(blk.gate, HighwayGate) and blk.gate.weight.abs().sum() == 0
    m.train()
    m(torch.randn(4, 1, 28, 28)).sum().backward()
    assert blk.gate.weight.grad.abs().sum() > 0 and blk.gate.bias.grad.abs().sum() > 0


def test_highway_mixes_transform_and_carry_with_the_gate():
    blk = BasicResidual(8, 8, gate=True).eval()
    x = torch.rand(2, 8, 6, 6)
    with torch.no_grad():
        blk.gate.bias.fill_(0.0)  # T = 0.5
    h = set_output(blk.branches[0], torch.tensor(2.0))
    y = blk(x)
    h.remove()
    torch.testing.assert_close(y, torch.relu(0.5 * 2.0 + 0.5 * x))
    down = pnnh.create_model("highway20").blocks()[3]  # 16 -> 32 channels, stride 2: padded carry
    assert down.gate(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)


# -- squeeze-and-excitation ------------------------------------------------------------------------

def test_se_rescales_channels_by_weights_in_unit_interval():
    se = SqueezeExcite(32)
    gates = []
    se.gate.register_forward_hook(lambda mod, inp, out: gates.append(out))
    x = torch.randn(3, 32, 5, 5)
    y = se(x)
    (g,) = gates
    assert g.shape == (3, 32, 1, 1) and (g >= 0).all() and (g <= 1).all()
    torch.testing.assert_close(y, x * g)
    m = pnnh.create_model("se_resnet20")
    assert all(isinstance(b.se, SqueezeExcite) for b in m.blocks())
    # no ReLU module inside SE: signal-path probes hook ReLU modules, and SE's acts on pooled vectors
    assert not any(isinstance(mod, nn.ReLU) for b in m.blocks() for mod in b.se.modules())
    # se is an option of every catalogue model, including ResNeXt and WRN blocks
    assert isinstance(pnnh.create_model("resnext29_8x4d", se=True).blocks()[0].se, SqueezeExcite)
    assert isinstance(pnnh.create_model("wrn16_4", se=True, width=1).blocks()[0].se, SqueezeExcite)


# -- small-weight init (Demystifying ResNet) -------------------------------------------------------

def test_demystify_starts_branches_small():
    m = pnnh.create_model("demystify20")
    assert all(torch.all(b.branches[0][-1].weight == 0.1) for b in m.blocks())
    z = pnnh.create_model("scaled_resnet20", zero_init_residual=True, scale=1.0)
    assert all(b.branches[0][-1].weight.abs().sum() == 0 for b in z.blocks())
    # pre-activation branches end in a conv: that conv is scaled
    torch.manual_seed(0)
    full = pnnh.create_model("wrn16_4", width=1)
    torch.manual_seed(0)
    small = pnnh.create_model("wrn16_4", width=1, branch_init=0.1)
    torch.testing.assert_close(small.blocks()[1].branches[0][-1].weight, 0.1 * full.blocks()[1].branches[0][-1].weight)


# -- weight-shared stages (the RNN view) -----------------------------------------------------------

def test_shared_blocks_share_storage():
    m = pnnh.create_model("shared_resnet56")
    for stage in m.stages:
        ref = stage[1]
        for blk in stage[2:]:
            for conv, conv_ref in ((blk.branches[0][0], ref.branches[0][0]), (blk.branches[0][3], ref.branches[0][3])):
                assert conv.weight is conv_ref.weight and conv.weight.data_ptr() == conv_ref.weight.data_ptr()
            assert blk.branches[0][1].weight is not ref.branches[0][1].weight  # per-step BatchNorm
        assert stage[0].branches[0][0].weight is not ref.branches[0][0].weight  # the shape-changing block
    r = pnnh.create_model("resnet56")
    assert n_params(m) < n_params(r) / 4
    # an optimizer step keeps them tied (one tensor, one update)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    assert torch.equal(m.stages[0][2].branches[0][0].weight, m.stages[0][8].branches[0][0].weight)


def test_shared_weights_survive_a_checkpoint_roundtrip(tmp_path):
    from pnnh.train.checkpoint import load_weights, save_weights

    m = pnnh.create_model("shared_resnet20")
    save_weights(tmp_path / "w.safetensors", m)
    fresh = pnnh.create_model("shared_resnet20")
    load_weights(tmp_path / "w.safetensors", fresh)
    assert fresh.stages[1][2].branches[0][0].weight is fresh.stages[1][1].branches[0][0].weight
    torch.testing.assert_close(fresh.stages[1][2].branches[0][0].weight, m.stages[1][1].branches[0][0].weight)


# -- stochastic depth ------------------------------------------------------------------------------

def test_drop_path_rates_decay_linearly_and_eval_is_identity():
    m = pnnh.create_model("droppath_resnet20", drop_path=0.3)
    rates = [b.drop_path.p for b in m.blocks()]
    assert rates == pytest.approx([0.3 * i / 9 for i in range(1, 10)])
    ref = pnnh.create_model("resnet20")
    copy_weights(ref, m)
    x = torch.randn(3, 1, 28, 28)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


def test_drop_path_drops_whole_samples_at_the_rate():
    torch.manual_seed(1)
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3, 2, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    dropped = (per_sample == 0).all(1)
    kept = (per_sample == 1 / 0.75).all(1)
    assert bool((dropped | kept).all())  # every sample is either dropped whole or kept whole, rescaled
    assert abs(dropped.float().mean().item() - 0.25) < 0.03  # 4000 draws: sd ~0.007
    # in a block: a dropped sample gets relu(shortcut(x)) exactly
    blk = BasicResidual(4, 4, drop_path=0.5).train()
    xb = torch.rand(64, 4, 5, 5)
    yb = blk(xb)
    same = [torch.equal(yb[i], torch.relu(xb[i])) for i in range(64)]
    assert 15 < sum(same) < 49  # Binomial(64, 0.5)


# -- ResNeXt ---------------------------------------------------------------------------------------

def test_resnext_uses_grouped_convs_with_the_named_widths():
    with torch.device("meta"):
        m = pnnh.create_model("resnext29_8x64d", in_chans=3)
    mids = []
    for blk in m.blocks():
        g = blk.branches[0][3]
        assert isinstance(g, nn.Conv2d) and g.kernel_size == (3, 3) and g.groups == 8
        mids.append(g.in_channels)
    assert mids == [512] * 3 + [1024] * 3 + [2048] * 3  # D = C·d, doubling per stage
    small = pnnh.create_model("resnext56_8x4d")
    assert {b.branches[0][3].groups for b in small.blocks()} == {8}
    assert small.blocks()[0].branches[0][3].in_channels == 32


# -- errors ----------------------------------------------------------------------------------------

def test_bad_catalogue_options_are_config_errors():
    with pytest.raises(ConfigError, match="shortcut"):
        pnnh.create_model("highway20", shortcut=None)
    with pytest.raises(ConfigError, match="drop_path"):
        pnnh.create_model("droppath_resnet20", drop_path=1.0)
    with pytest.raises(ConfigError, match="bottleneck"):
        pnnh.create_model("se_resnet20", cardinality=4)
    with pytest.raises(ConfigError, match="branches"):
        pnnh.create_model("multires20_k2", branches=0)
    with pytest.raises(ConfigError, match="6n\\+4"):
        from pnnh.models.catalogue import _wrn_layers
        _wrn_layers(17)
    assert issubclass(PreActBasicResidual, ResidualBlock) and BottleneckResidual.expansion == 4


# -- the interface diagnostics, lesions and the study rely on --------------------------------------

TINY = {"wrn": dict(width=0.5), "resnext": dict(width=0.5, group_width=2)}


@pytest.mark.parametrize("family", CATALOGUE_FAMILIES)
def test_every_family_follows_the_model_interface(family):
    names = pnnh.list_models(family=family)
    assert names and all(pnnh.model_info(n).layout == "cifar" and pnnh.model_info(n).depth for n in names)
    m = pnnh.create_model(names[0], **TINY.get(family, {})).eval()
    x = torch.randn(2, 1, 28, 28)
    blocks = m.blocks()
    assert blocks and all(isinstance(b.shortcut, nn.Module) for b in blocks)
    calls = []
    hooks = [b.register_forward_hook(lambda mod, i, o: calls.append(mod)) for b in blocks]
    feats = m.forward_features(x)
    for h in hooks:
        h.remove()
    assert calls == blocks  # each block runs once, in blocks() order (shared blocks included)
    assert torch.equal(m.forward_head(feats), m(x))
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    # a lesion (Veit et al.): a same-shape block replaced by its shortcut still runs
    same = next(i for i, b in enumerate(blocks) if isinstance(b.shortcut, nn.Identity))
    stage, j = divmod(same, len(m.stages[0]))
    m.stages[stage][j] = nn.Identity()
    assert m(x).shape == (2, 10)


# -- every variant trains through the engine -------------------------------------------------------

ENGINE_VARIANTS = {  # the smallest member of each family, shrunk further where it is wide
    "scaled_resnet20": {}, "multires20_k2": {}, "se_resnet20": {}, "highway20": {}, "demystify20": {},
    "shared_resnet20": {}, "droppath_resnet20": {}, "wrn16_4": dict(width=0.5),
    "resnext29_8x4d": dict(width=0.5),
}


def tiny_cfg(tmp_path, name, **kw):
    from pnnh.train import TrainConfig

    return TrainConfig(model=name, model_kwargs=ENGINE_VARIANTS[name], data="fashion-mnist", train_subset=64,
                       test_subset=32, batch_size=16, steps=3, progress=False, out=str(tmp_path / name), **kw)


@pytest.mark.parametrize("name", list(ENGINE_VARIANTS))
def test_every_variant_trains_through_the_engine(name, tmp_path, fmnist_dir):
    from pnnh.train import train

    s = train(tiny_cfg(tmp_path, name))
    assert s["status"] == "complete" and s["steps"] == 3 and 0 <= s["test_acc"] <= 1
    assert all(math.isfinite(loss) for _, loss in s["curve"])
    assert s["params"] == n_params(pnnh.create_model(name, **ENGINE_VARIANTS[name]))
    assert (tmp_path / name / "model.safetensors").exists()


def test_shared_weights_resume_exactly(tmp_path, fmnist_dir):
    """Tied parameters go through checkpoint + optimizer state and come back tied."""
    from safetensors.torch import load_file

    from pnnh.train import train

    full = train(tiny_cfg(tmp_path / "a", "shared_resnet20", checkpoint_every=1))

    def crash(step):
        if step == 2:
            raise KeyboardInterrupt

    cfg = tiny_cfg(tmp_path / "b", "shared_resnet20", checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=crash)
    resumed = train(cfg.replace(resume=True))
    assert resumed["test_loss"] == full["test_loss"]
    w = load_file(str(tmp_path / "b/shared_resnet20/model.safetensors"))
    assert torch.equal(w["model.stages.0.1.branches.0.0.weight"], w["model.stages.0.2.branches.0.0.weight"])


def test_presets_are_defaults_the_caller_can_override():
    assert not pnnh.create_model("wrn16_4", preact=False, width=1).preact
    assert len(pnnh.create_model("multires20_k2", branches=1).blocks()[0].branches) == 1
    assert {b.branches[0][3].groups for b in pnnh.create_model("resnext29_8x4d", cardinality=2).blocks()} == {2}
    assert pnnh.create_model("highway20", gate_bias=-1.0).blocks()[0].gate.bias[0].item() == -1.0
