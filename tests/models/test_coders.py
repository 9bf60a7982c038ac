"""Cheap structural coders (pnnh/models/coders.py): plain, identity at init, cheaper, foldable, resumable."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import pnnh
from pnnh.analysis.structure import find_residual_connections
from pnnh.errors import ConfigError
from pnnh.models.coders import CheapCoderConv2d, CodeConvCoder, DepthwiseCoder, FixedCoder, PointwiseCoder
from pnnh.models.pnnh_cnn import CoderSpec
from pnnh.train import TrainConfig, train
from pnnh_codes import layer_codes, randomise_bn, run_folded_layers

PLAIN_CODERS = ("pointwise", "depthwise", "code_conv")
CODER_MODULES = {"pointwise": PointwiseCoder, "depthwise": DepthwiseCoder, "code_conv": CodeConvCoder,
                 "fixed": FixedCoder}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_flops(m: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        m(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("coder", PLAIN_CODERS)
def test_cheap_coders_have_no_residual_connection(coder):
    for kw in ({}, {"coder_ratio": 0.5}, {"path_param": "init"}):
        m = pnnh.create_model("pnnh8", coder=coder, **kw)  # stem, then one block per stage (two transitions)
        assert all(isinstance(l, CheapCoderConv2d) for l in m.pnnh_layers()[1:])
        assert find_residual_connections(m) == [], (coder, kw)
    # bottleneck blocks: 1x1 layers narrow the code (64 -> 16 channels) and widen it again
    assert find_residual_connections(pnnh.create_model("pnnh29", coder=coder, width=0.5)) == []


def test_the_fixed_coder_is_reported_as_a_concatenation_shortcut():
    # the code passed on with no weighted layer beside the learner computed from the same input: DenseNet's shape
    m = pnnh.create_model("pnnh20", coder="fixed")
    found = find_residual_connections(m)
    assert len(found) == len(m.pnnh_layers()) - 1  # every layer but the (mirrored) stem
    assert all(f.op == "cat" and f.shortcut_layers == 0 and f.branch_layers == 1 for f in found)
    assert n_params(m.pnnh_layers()[1].coder) == 0


@pytest.mark.parametrize("coder", [*PLAIN_CODERS, "fixed"])
def test_the_code_passes_unchanged_through_a_stage_at_init(coder):
    # the path in the init alone (path_param="init"), no learner->coder mixing; batch statistics
    m = pnnh.create_model("pnnh20", coder=coder, coder_mix=0.0, path_param="init").train()
    assert isinstance(m.pnnh_layers()[1].coder, CODER_MODULES[coder])
    codes = layer_codes(m, torch.randn(16, 1, 28, 28))
    stem, stage1_last, transition = codes[0], codes[6], codes[7]
    assert torch.allclose(stem, stage1_last, atol=1e-3)  # 6 layers later, the same tensor
    sub = stage1_last[:, :, ::2, ::2]  # the stride-2 layer carries the subsampled code (BN re-standardises it)
    for c in range(sub.shape[1]):
        assert torch.corrcoef(torch.stack([transition[:, c].flatten(), sub[:, c].flatten()]))[0, 1] > 0.9999
    assert transition[:, sub.shape[1]:].std() > 0.5  # the channels the wider stage adds are new (He rows)


@pytest.mark.parametrize("coder", PLAIN_CODERS)
def test_the_default_keeps_the_path_in_the_parametrisation(coder):
    m = pnnh.create_model("pnnh20", coder=coder, coder_mix=0.0)
    layer = m.pnnh_layers()[2]
    assert layer.dirac is not None and layer.coder.dirac is not None  # learner conv and coder weight
    assert torch.count_nonzero(layer.coder.dirac.path) == 2 * layer.n_code  # +1/-1 per carried channel
    codes = layer_codes(m.train(), torch.randn(16, 1, 28, 28))
    assert F.cosine_similarity(codes[0].flatten(), codes[6].flatten(), 0) > 0.9  # W = P + 0.1 V/|V|


@pytest.mark.parametrize("coder", [*PLAIN_CODERS, "fixed"])
def test_cheap_coders_cut_parameters_and_the_flops_the_forward_computes(coder):
    mirror = pnnh.create_model("pnnh8")
    cheap = pnnh.create_model("pnnh8", coder=coder)
    assert n_params(cheap) < n_params(mirror)
    layer = cheap.pnnh_layers()[1]  # inside stage 1: every code channel from the coder
    assert layer.weight.shape[0] == layer.n_learn and layer.n_extra == 0  # the k x k conv has learner rows only
    x = torch.randn(2, 1, 16, 16)
    assert train_flops(cheap, x) < 0.93 * train_flops(mirror, x)
    wide_code = pnnh.create_model("pnnh8", coder=coder, coder_ratio=0.5)  # narrower learner, wider code
    assert train_flops(wide_code, x) < 0.9 * train_flops(pnnh.create_model("pnnh8", coder_ratio=0.5), x)


def test_layer_shapes_and_the_rows_a_wider_layer_adds():
    spec = CoderSpec("depthwise")
    layer = CheapCoderConv2d(16, 32, 3, 2, in_code=2, n_code=4, spec=spec)
    assert layer.coder.n_out == 2 and layer.n_extra == 2 and layer.weight.shape[0] == layer.n_learn + 2
    assert layer(torch.randn(2, 16, 9, 9)).shape == (2, 32, 5, 5)
    narrow = CheapCoderConv2d(64, 16, 1, 1, in_code=8, n_code=2, spec=CoderSpec("fixed"))
    assert narrow.coder.n_out == 2 and narrow.n_extra == 0
    assert narrow(torch.randn(2, 64, 5, 5)).shape == (2, 16, 5, 5)


@pytest.mark.parametrize("coder", [*PLAIN_CODERS, "fixed"])
def test_cheap_coders_fold_into_one_conv_and_deploy(coder):
    m = pnnh.create_model("pnnh20", coder=coder, coder_ratio=0.5)
    randomise_bn(m)
    m.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(run_folded_layers(m, x), m.forward_features(x), atol=1e-4, rtol=1e-4)
        fused = pnnh.deploy(m, fuse_relu=False, channels_last=False)
        assert isinstance(fused, nn.Sequential)
        kinds = {type(mod) for mod in fused.modules()} - {nn.Sequential}
        assert kinds <= {nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}, kinds
        torch.testing.assert_close(fused(x), m(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("coder", PLAIN_CODERS)
def test_interface_gradients_and_weights_round_trip(coder, check_cnn_interface, tmp_path):
    from pnnh.train import load_weights, save_weights

    m = pnnh.create_model("pnnh20", coder=coder, width=0.5)
    x = torch.randn(2, 1, 28, 28)
    m(x).sum().backward()
    layer = m.pnnh_layers()[3]
    assert layer.coder.weight.grad is not None and layer.coder.weight.grad.abs().sum() > 0
    assert len(m.blocks()) == 9
    save_weights(tmp_path / "w.safetensors", m)
    m2 = pnnh.create_model("pnnh20", coder=coder, width=0.5)
    load_weights(tmp_path / "w.safetensors", m2)
    assert torch.equal(m.eval()(x), m2.eval()(x))
    check_cnn_interface(m2, x, (2, 32, 7, 7))
    # channels_last training (where mirrored layers switch kernels) runs the cheap layers' own forward
    m3 = pnnh.create_model("pnnh20", coder=coder, width=0.5).to(memory_format=torch.channels_last).train()
    assert type(m3.pnnh_layers()[3]) is CheapCoderConv2d
    m3.load_state_dict(m.state_dict())
    torch.testing.assert_close(m3.eval()(x.contiguous(memory_format=torch.channels_last)), m(x), atol=1e-5, rtol=1e-5)


def test_a_training_run_with_a_cheap_coder_resumes_bit_identically(tmp_path, fmnist_small):
    def cfg(out):
        return TrainConfig(model="pnnh8", model_kwargs={"coder": "depthwise", "width": 0.5}, data="fashion-mnist",
                           data_dir=str(fmnist_small), train_subset=256, test_subset=64, batch_size=64,
                           eval_batch_size=64, epochs=2, lr=0.05, progress=False, out=str(out))

    full, cut = cfg(tmp_path / "a"), cfg(tmp_path / "b")
    train(full)

    def crash(step):
        if step == 6:  # mid-way through epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, on_step=crash)
    train(cut.replace(resume=True))
    a, b = load_file(f"{full.out}/model.safetensors"), load_file(f"{cut.out}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_cheap_coder_options_are_config_errors():
    with pytest.raises(ConfigError, match="orthogonal"):
        pnnh.create_model("pnnh20", coder="depthwise", coder_init="orthogonal")
    with pytest.raises(ConfigError, match="fixed"):
        pnnh.create_model("pnnh20", coder="fixed", coder_init="he")
    with pytest.raises(ConfigError, match="in_code > 0"):
        CheapCoderConv2d(1, 16, in_code=0, spec=CoderSpec("pointwise"))
    with pytest.raises(ConfigError, match="coder_ratio"):
        pnnh.create_model("pnnh20", coder="pointwise", coder_ratio=0.0)
    with pytest.raises(ConfigError, match="no stage-shared"):
        CheapCoderConv2d(16, 16, spec=CoderSpec("pointwise"), shared=object())
    with pytest.raises(ConfigError, match="own weights per layer"):
        pnnh.create_model("pnnh20", coder="shared", path_param="dirac")
