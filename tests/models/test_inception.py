"""Inception-ResNet and its Inception twin: the shortcuts, the residual scale, equal parameters."""

import math

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.analysis.structure import find_residual_connections
from pnnh.errors import ConfigError
from pnnh.models.inception import InceptionBlock, InceptionBlockA, InceptionNet, Reduction

SMALL = dict(width=0.25)  # 16/32/64 channels: the same layout, fast


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def inception_blocks(m) -> list[InceptionBlock]:
    return [b for b in m.blocks() if isinstance(b, InceptionBlock)]


@pytest.mark.parametrize("size", ["s", "m"])
def test_twin_has_the_same_parameters_and_no_shortcut(size):
    res, twin = pnnh.create_model(f"inception_resnet_{size}"), pnnh.create_model(f"inception_{size}")
    assert n_params(res) == n_params(twin)
    assert [(k, v.shape) for k, v in res.state_dict().items()] == [(k, v.shape) for k, v in twin.state_dict().items()]
    assert pnnh.model_info(f"inception_resnet_{size}").depth == pnnh.model_info(f"inception_{size}").depth
    assert find_residual_connections(twin) == []
    assert all(b.shortcut is None for b in twin.blocks())


@pytest.mark.parametrize("size,blocks", [("s", (2, 4, 2)), ("m", (5, 10, 5))])
def test_residual_net_has_exactly_one_identity_shortcut_per_inception_block(size, blocks):
    m = pnnh.create_model(f"inception_resnet_{size}")
    found = find_residual_connections(m)
    assert len(inception_blocks(m)) == sum(blocks)
    assert len(found) == sum(blocks)  # the reductions have none
    assert all(f.op == "add" and f.shortcut_layers == 0 for f in found)
    assert len([b for b in m.blocks() if isinstance(b, Reduction)]) == 2


def test_block_computes_relu_of_trunk_plus_scaled_linear_projection():
    torch.manual_seed(0)
    blk = InceptionBlockA(16, residual=True, scale=0.3).eval()
    x = torch.relu(torch.randn(2, 16, 7, 7))
    proj = blk.proj(torch.cat([b(x) for b in blk.branches], 1))
    torch.testing.assert_close(blk(x), torch.relu(x + 0.3 * proj))
    twin = InceptionBlockA(16, residual=False).eval()
    twin.load_state_dict(blk.state_dict())
    torch.testing.assert_close(twin(x), torch.relu(proj))
    assert not isinstance(blk.proj, nn.Sequential) and blk.proj.bias is not None  # linear: no BN, no ReLU


def test_the_scale_changes_the_output_and_defaults_to_0_2():
    a = pnnh.create_model("inception_resnet_s", **SMALL)
    b = pnnh.create_model("inception_resnet_s", scale=0.1, **SMALL)
    b.load_state_dict(a.state_dict())
    assert all(blk.scale == 0.2 for blk in inception_blocks(a)) and all(blk.scale == 0.1 for blk in inception_blocks(b))
    x = torch.randn(2, 1, 28, 28)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    with pytest.raises(ConfigError, match="twin"):
        pnnh.create_model("inception_s", scale=0.1)
    with pytest.raises(ConfigError, match="fixes"):
        pnnh.create_model("inception_s", residual=True)


def test_branches_are_inception_shaped():
    m = InceptionNet((1, 1, 1), width=0.5)
    a, b, c = inception_blocks(m)
    kernels = lambda blk: [[conv[0].kernel_size for conv in branch] for branch in blk.branches]  # noqa: E731
    assert kernels(a) == [[(1, 1)], [(1, 1), (3, 3)], [(1, 1), (3, 3), (3, 3)]]  # 1x1 | 3x3 | double 3x3
    assert kernels(b) == [[(1, 1)], [(1, 1), (1, 5), (5, 1)]]  # factorised 5x5
    assert kernels(c) == [[(1, 1)], [(1, 1), (1, 3), (3, 1)]]  # factorised 3x3
    x = torch.randn(2, 1, 28, 28)
    shapes = []
    hooks = [blk.register_forward_hook(lambda mod, i, o: shapes.append(tuple(o.shape))) for blk in m.blocks()]
    m(x)
    for h in hooks:
        h.remove()
    assert shapes == [(2, 32, 28, 28), (2, 64, 14, 14), (2, 64, 14, 14), (2, 128, 7, 7), (2, 128, 7, 7)]


@pytest.mark.parametrize("name", ["inception_resnet_s", "inception_s"])
def test_model_interface(name, check_cnn_interface):
    m = pnnh.create_model(name, **SMALL).eval()
    assert m.default_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    calls = []
    hooks = [b.register_forward_hook(lambda mod, i, o: calls.append(mod)) for b in m.blocks()]
    m(x)
    for h in hooks:
        h.remove()
    assert calls == m.blocks()
    check_cnn_interface(m, x, (2, 64, 7, 7))


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="three"):
        InceptionNet((2, 2))
    with pytest.raises(ConfigError, match="width"):
        pnnh.create_model("inception_resnet_s", width=0)


@pytest.mark.parametrize("name", ["inception_resnet_s", "inception_s"])
def test_trains_through_the_engine(name, tmp_path, fmnist_dir):
    from pnnh.train import TrainConfig, train

    s = train(TrainConfig(model=name, model_kwargs=SMALL, data="fashion-mnist", train_subset=64, test_subset=32,
                          batch_size=16, steps=3, progress=False, out=str(tmp_path / name)))
    assert s["status"] == "complete" and all(math.isfinite(loss) for _, loss in s["curve"])
    assert s["params"] == n_params(pnnh.create_model(name, **SMALL))
