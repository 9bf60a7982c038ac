"""pnnh.layers: PNNH layers stack like nn.Conv2d / nn.Linear and carry the code; one DiracNet piece."""

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.analysis.structure import is_plain
from pnnh.errors import ConfigError
from pnnh.layers import (CoderSpec, DiracWeight, PNNHConv2d, PNNHLinear, PNNHParallelBlock, PNNHSequential,
                         dirac_parametrize, dirac_weight, pnnh_stage)


def _code(layer, y):
    """The code e = relu(e) - relu(-e) in a PNNH layer's output (channels or last dim)."""
    n, c = layer.n_learn, layer.n_code
    y = y if y.dim() == 4 else y.movedim(-1, 1)
    return y[:, n:n + c] - y[:, n + c:n + 2 * c]


def test_conv_layers_stack_without_bookkeeping_and_carry_the_code():
    spec = CoderSpec(path_param="init", mix=0.0)
    net = nn.Sequential(PNNHConv2d(1, 16, in_code=0, spec=spec), PNNHConv2d(16, 16, spec=spec),
                        PNNHConv2d(16, 16, spec=spec)).train()
    assert [(m.in_code, m.n_code) for m in net] == [(0, 2), (2, 2), (2, 2)]  # the layout each layer writes
    assert is_plain(net)
    outs = []
    for m in net:
        m.register_forward_hook(lambda mod, inp, out: outs.append(_code(mod, out)))
    y = net(torch.randn(16, 1, 28, 28))
    assert y.shape == (16, 16, 28, 28) and (y >= 0).all()
    torch.testing.assert_close(outs[2], outs[0], atol=1e-3, rtol=1e-3)  # BN of a unit code is ~identity


def test_a_stage_chains_layouts_and_a_mismatch_names_both_layers():
    stage = pnnh_stage(16, 32, depth=3, stride=2)
    assert [m.stride for m in stage] == [2, 1, 1] and stage(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    assert [(m.in_code, m.n_code) for m in stage] == [(2, 4), (4, 4), (4, 4)]
    with pytest.raises(ConfigError, match="layer 2 reads 32 channels with 4 coder channels, but layer 0 writes 16"):
        PNNHSequential(PNNHConv2d(1, 16, in_code=0), nn.MaxPool2d(2), PNNHConv2d(32, 32))
    with pytest.raises(ConfigError, match="depth >= 1"):
        pnnh_stage(16, 16, depth=0)
    # the stage picks the CPU training kernels for all its layers, the 1-channel first one included
    stem_stage = pnnh_stage(1, 16, depth=2, in_code=0).to(memory_format=torch.channels_last).train()
    assert {type(m).__name__ for m in stem_stage} == {"TiedPNNHConv2d"}


def test_linear_layers_carry_the_code_across_the_relus_exactly():
    spec = CoderSpec(path_param="init", mix=0.0)
    mlp = nn.Sequential(PNNHLinear(32, 64, in_code=0, spec=spec), PNNHLinear(64, 64, spec=spec),
                        PNNHLinear(64, 64, spec=spec))
    assert [(m.in_code, m.n_code) for m in mlp] == [(0, 8), (8, 8), (8, 8)]
    outs = []
    for m in mlp:
        m.register_forward_hook(lambda mod, inp, out: outs.append(_code(mod, out)))
    y = mlp(torch.randn(4, 5, 32))  # (batch, tokens, features)
    assert y.shape == (4, 5, 64) and (y >= 0).all()
    torch.testing.assert_close(outs[2], outs[0])  # no norm inside: W_c x = e, unchanged
    y.sum().backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in mlp)
    dirac = PNNHLinear(64, 64)  # the default keeps the path in a DiracWeight, as the conv layer does
    assert isinstance(dirac.dirac, DiracWeight)
    torch.testing.assert_close(dirac.linear_weight(), dirac_weight(dirac.dirac.path, dirac.dirac.alpha, dirac.weight,
                                                                    dirac.dirac.beta))
    with pytest.raises(ConfigError, match="do not fit"):
        PNNHLinear(4, 64, in_code=3)


def test_one_dirac_parametrisation_for_plain_convs_linears_and_pnnh_layers():
    conv = dirac_parametrize(nn.Conv2d(8, 12, 3, padding=1, bias=False))
    p = conv.parametrizations.weight[0]
    assert isinstance(p, DiracWeight) and torch.equal(p.path[:8, :, 1, 1], torch.eye(8))
    assert torch.count_nonzero(p.path[8:]) == 0  # extra outputs carry no path
    v = conv.parametrizations.weight.original
    torch.testing.assert_close(conv.weight, p.path + 0.1 * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    linear = dirac_parametrize(nn.Linear(6, 6))
    assert torch.equal(linear.parametrizations.weight[0].path, torch.eye(6))
    layer = PNNHConv2d(16, 16)
    assert {n for n, _ in layer.named_parameters()} == {"weight", "dirac.alpha", "dirac.beta", "bn.weight", "bn.bias"}
    plain = pnnh.create_model("plain20", init="dirac_param")
    names = {n.rsplit(".", 1)[-1] for n, _ in plain.named_parameters() if "parametrizations" in n}
    assert names == {"original", "alpha", "beta"}  # the same alpha/beta names


def test_layers_build_the_same_pnnh_layer_the_registered_nets_use():
    torch.manual_seed(0)
    net = pnnh.create_model("pnnh20")
    ref = net.stages[0][0].layers[0]
    torch.manual_seed(0)
    mine = PNNHConv2d(16, 16)
    assert (mine.in_code, mine.n_code, mine.n_learn) == (ref.in_code, ref.n_code, ref.n_learn)
    assert torch.equal(mine.dirac.path, ref.dirac.path)


def test_transformer_blocks_in_your_own_model_are_plain_and_learn():
    class TinyTokenNet(nn.Module):  # a user's own Transformer: patch embedding, PNNH blocks, mean-pool head
        def __init__(self, dim=32, depth=4):
            super().__init__()
            self.embed = nn.Linear(16, dim)
            self.blocks = nn.Sequential(*[PNNHParallelBlock(dim, num_heads=2) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 3)

        def forward(self, x):  # x: (batch, tokens, 16)
            return self.head(self.norm(self.blocks(self.embed(x))).mean(1))

    torch.manual_seed(0)
    net = TinyTokenNet()
    assert is_plain(net)
    block = net.blocks[0]  # at init: the parallel residual block, computed without an addition
    t = torch.randn(2, 5, 32)
    with torch.no_grad():
        a = nn.functional.scaled_dot_product_attention(
            *block.qkv(block.norm(t)).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4).unbind(0)).transpose(1, 2)
        ref = t + nn.functional.linear(torch.cat([a.flatten(2), block.act(block.fc1(block.norm(t)))], -1),
                                       block.proj.weight, block.proj.bias)
        torch.testing.assert_close(block(t), ref, rtol=1e-5, atol=1e-5)
    x, y = torch.randn(64, 6, 16), torch.randint(0, 3, (64,))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it fits a small random task
    assert sum(p.numel() for p in block.parameters() if p.dim() == 2) == 11 * 32 * 32
