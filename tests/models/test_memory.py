"""Residual memory networks: the LSTM reads every block, and without it the net is the ResNet."""

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.errors import ConfigError
from pnnh.models.memory import ResidualMemoryNet


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def lstm_params(d_in: int, h: int) -> int:
    return 4 * (d_in * h + h * h + 2 * h)  # input and hidden weights of four gates, two biases


@pytest.mark.parametrize("depth", [20, 56])
def test_registered_and_param_count(depth):
    info = pnnh.model_info(f"rmn_resnet{depth}")
    assert (info.family, info.depth, info.layout) == ("rmn", depth, "cifar")
    rmn, res = pnnh.create_model(f"rmn_resnet{depth}"), pnnh.create_model(f"resnet{depth}")
    # the ResNet, an LSTM 64 -> 64, and 64 more inputs to the 10-way classifier
    assert n_params(rmn) - n_params(res) == lstm_params(64, 64) + 64 * 10
    assert n_params(pnnh.create_model("rmn_resnet20", memory_size=32)) - n_params(pnnh.create_model("resnet20")) \
        == lstm_params(64, 32) + 32 * 10


def test_memory_reads_every_block_and_feeds_the_logits():
    torch.manual_seed(0)
    model = pnnh.create_model("rmn_resnet20").train()
    x = torch.randn(4, 1, 28, 28)
    _, reads = model.memory_reads(x)
    assert len(reads) == len(model.blocks()) == 9
    assert [v.shape[1] for v in reads] == [16] * 3 + [32] * 3 + [64] * 3
    for v in reads:
        v.retain_grad()
    h = model.memory(reads)
    h.pow(2).sum().backward()
    for i, v in enumerate(reads):  # the memory state depends on every block's pooled output
        assert v.grad is not None and v.grad.abs().sum() > 0, f"block {i} is not read"

    model.zero_grad()
    model(x).logsumexp(1).sum().backward()
    for name, p in model.memory.named_parameters():  # the logits' gradient reaches the LSTM
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.fc.in_features == 64 + 64


def test_any_cifar_depth_resolves_by_name():
    assert pnnh.model_info("rmn_resnet14").depth == 14 and "rmn_resnet14" not in pnnh.list_models("rmn*")
    m = pnnh.create_model("rmn_resnet29")  # 9n+2: bottleneck blocks, 256 features, memory as wide
    assert m.fc.in_features == 256 + 256 and m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_stage_reads():
    model = pnnh.create_model("rmn_resnet20", read="stage")
    _, reads = model.memory_reads(torch.randn(2, 1, 28, 28))
    assert [v.shape[1] for v in reads] == [16, 32, 64]
    with pytest.raises(ConfigError, match="read must be"):
        pnnh.create_model("rmn_resnet20", read="layer")
    with pytest.raises(ConfigError, match="residual"):
        pnnh.create_model("rmn_resnet20", shortcut=None)


def test_without_the_memory_it_is_the_resnet():
    """Same seed, same convolutional weights; with the classifier's memory inputs at zero the
    logits are the ResNet's: the memory is the only difference."""
    torch.manual_seed(3)
    res = pnnh.create_model("resnet20").eval()
    torch.manual_seed(3)
    rmn = pnnh.create_model("rmn_resnet20").eval()
    shared = {k: v for k, v in rmn.state_dict().items() if not k.startswith(("memory.", "fc."))}
    assert all(torch.equal(v, res.state_dict()[k]) for k, v in shared.items())
    with torch.no_grad():
        rmn.fc.weight.zero_()
        rmn.fc.weight[:, :64] = res.fc.weight
        rmn.fc.bias.copy_(res.fc.bias)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rmn(x), res(x), rtol=0, atol=1e-6)
    # and with the memory's columns on, the logits move
    with torch.no_grad():
        rmn.fc.weight[:, 64:] = 0.5
    assert not torch.allclose(rmn(x), res(x), atol=1e-3)


def test_uniform_interface():
    model = pnnh.create_model("rmn_resnet20", num_classes=7)
    x = torch.randn(2, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, 7, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    assert model.default_cfg["input_size"] == (1, 28, 28)
    assert isinstance(model, ResidualMemoryNet) and len(model.blocks()) == 9


def test_structure_detector_sees_every_shortcut_and_the_memory_merge():
    from pnnh.analysis.structure import find_residual_connections

    found = find_residual_connections(pnnh.create_model("rmn_resnet20"))
    assert [f.op for f in found] == ["add"] * 9 + ["cat"]  # one shortcut per block, then the head's input:
    # the last block's features reach the classifier directly and through the LSTM (one weighted layer)
    assert (found[-1].shortcut_layers, found[-1].branch_layers) == (0, 1)
