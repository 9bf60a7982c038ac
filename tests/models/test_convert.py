"""pnnh.convert: residual blocks found by structure become plain or PNNH twins of the same layout.

torchvision and timm do not import here, so the tests run on replicas of their block classes
(tests/resnet_replicas.py).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pnnh
from pnnh.analysis.structure import find_residual_connections
from pnnh.errors import ConfigError
from pnnh.layers import PNNHConv2d, PNNHParallelBlock
from pnnh.models.convert import PlainTransformerBlock
from pnnh.models.resnet import cifar_resnet
from resnet_replicas import TimmBasicBlock, TimmBottleneck, TimmResNet, TVBasicBlock, TVBottleneck, TVResNet
from vit_replicas import TimmResPostBlock, TimmViT


def _convs(model):
    """(in, out, kernel, stride) of every conv in forward order, shortcut projections left out."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and "downsample" not in name and "shortcut" not in name:
            out.append((m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]))
        elif isinstance(m, PNNHConv2d):
            out.append((m.in_ch, m.out_ch, m.kernel_size, m.stride))
    return out


def _check_twins(model, x):
    assert find_residual_connections(model)  # the identity shortcuts of the original
    for to in ("pnnh", "plain"):
        twin = pnnh.convert(model, to=to)
        assert _convs(twin) == _convs(model), to  # same widths, strides and depth
        assert not find_residual_connections(twin), to
        assert not any(isinstance(m, nn.Module) and "downsample" in n for n, m in twin.named_modules()), to
        assert twin(x).shape == model(x).shape
    assert _convs(model)  # the original is untouched
    assert any(n.endswith("downsample") for n, _ in model.named_modules())


@pytest.mark.parametrize("block", [TVBasicBlock, TVBottleneck])
def test_torchvision_resnets_become_plain_and_pnnh_twins(block):
    torch.manual_seed(0)
    model = TVResNet(block, [2, 1, 1, 1], num_classes=10).eval()
    _check_twins(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("block", [TimmBasicBlock, TimmBottleneck])
def test_timm_resnets_become_plain_and_pnnh_twins(block):
    torch.manual_seed(0)
    model = TimmResNet(block, [2, 2, 1, 1]).eval()
    _check_twins(model, torch.randn(2, 3, 16, 16))


def _preact_plain20(**kwargs):
    """The pre-activation ResNet-20's plain twin (no registered name: built by the family's builder)."""
    return cifar_resnet(20, preact=True, plain=True, num_classes=10, in_chans=1, **kwargs)


@pytest.mark.parametrize("name, plain_name, plain_kwargs", [("resnet20", "plain20", {}),
                                                            ("preact_resnet20", _preact_plain20, {}),
                                                            ("resnet50", "plain50", {"width": 0.25})])
def test_pnnh_resnets_become_their_registered_twins(name, plain_name, plain_kwargs):
    torch.manual_seed(0)
    model = pnnh.create_model(name, **({"width": 0.25} if name == "resnet50" else {})).eval()
    x = torch.randn(2, 1, 28, 28)
    plain = pnnh.convert(model, to="plain")
    registered_plain = (plain_name(**plain_kwargs) if callable(plain_name)
                        else pnnh.create_model(plain_name, **plain_kwargs))
    registered_plain.load_state_dict(plain.state_dict())  # the same tensors under the same names ...
    torch.testing.assert_close(plain(x), registered_plain.eval()(x))  # ... and the same function
    assert not find_residual_connections(plain) and not hasattr(plain, "pnnh_name")
    twin = pnnh.convert(model, to="pnnh", coder_ratio=0.5)
    assert _convs(twin) == _convs(model) and not find_residual_connections(twin)
    layers = [m for m in twin.modules() if isinstance(m, PNNHConv2d)]
    assert layers[0].in_code == 0 and all(b.in_code == a.n_code for a, b in zip(layers, layers[1:]))
    assert all(2 * m.n_code == round(0.5 * m.out_ch / 2) * 2 for m in layers)
    assert all(isinstance(b, pnnh.layers.PNNHSequential) for b in twin.blocks())  # blocks() finds the twins


def _fit(model, opt, x, y, steps):
    """Training losses of ``steps`` full-batch steps on one fixed batch."""
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_pnnh_twin_of_a_torchvision_resnet_trains():
    torch.manual_seed(0)
    twin = pnnh.convert(TVResNet(TVBasicBlock, [1, 1, 1, 1], num_classes=10), to="pnnh")
    twin = twin.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(twin.parameters(), lr=0.02, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last), torch.arange(8) % 10
    losses = _fit(twin, opt, x, y, steps=6)
    assert losses[-1] < 0.5 * losses[0], losses


class _GatedBlock(nn.Module):
    """A residual block convert does not know: ``x + conv(x)`` with a ``shortcut``."""

    def __init__(self):
        super().__init__()
        self.conv, self.shortcut = nn.Conv2d(4, 4, 3, padding=1), nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.conv(x)


class _SEBlock(TimmBasicBlock):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, attn_layer=lambda c: nn.Conv2d(c, c, 1), **kwargs)


def test_unsupported_blocks_and_bad_arguments_are_config_errors_naming_them():
    resnext = TVResNet(TVBottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)
    with pytest.raises(ConfigError, match=r"block 'layer1.0' \(TVBottleneck\).*groups=32"):
        pnnh.convert(resnext, to="pnnh")
    assert not find_residual_connections(pnnh.convert(resnext, to="plain"))  # plain twins keep any conv
    with pytest.raises(ConfigError, match=r"block 'body.1' \(_GatedBlock\).*shortcut"):
        pnnh.convert(nn.ModuleDict({"body": nn.Sequential(nn.Conv2d(3, 4, 1), _GatedBlock())}))
    silu = TimmResNet(TimmBasicBlock, [1, 1, 1, 1], act_layer=nn.SiLU)
    with pytest.raises(ConfigError, match="mirror a ReLU, the block uses SiLU"):
        pnnh.convert(silu)
    se = TimmResNet(_SEBlock, [1, 1, 1, 1])
    with pytest.raises(ConfigError, match="has se=Conv2d"):
        pnnh.convert(se, to="plain")
    with pytest.raises(ConfigError, match="no residual block found in Sequential"):
        pnnh.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ConfigError, match="to must be"):
        pnnh.convert(pnnh.create_model("resnet20"), to="resnet")
    with pytest.raises(ConfigError, match="unknown option.*coder_raito"):
        pnnh.convert(pnnh.create_model("resnet20"), coder_raito=0.5)


# -- Vision Transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: TimmViT(qkv_bias=True), lambda: TimmViT(init_values=1e-5),
                                  lambda: pnnh.create_model("vit_mini_d6")])
def test_vits_become_plain_and_pnnh_twins(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 1, 28, 28)
    blocks = [m for m in model.modules() if hasattr(m, "mlp")]
    assert len(find_residual_connections(model)) == 2 * len(blocks)  # two adds per block
    plain, twin = pnnh.convert(model, to="plain"), pnnh.convert(model, to="pnnh")
    assert not find_residual_connections(plain) and not find_residual_connections(twin)
    pblocks = [m for m in twin.modules() if isinstance(m, PNNHParallelBlock)]
    assert len(pblocks) == len(blocks) and pblocks[0].num_heads == blocks[0].attn.num_heads
    assert (pblocks[0].qkv.bias is None) == (blocks[0].attn.qkv.bias is None)
    with torch.no_grad():  # the plain twin keeps every weight: it is the residual net minus its adds
        assert twin(x).shape == model(x).shape
        b, pb = blocks[0], [m for m in plain.modules() if isinstance(m, PlainTransformerBlock)][0]
        t = torch.randn(2, 17, b.norm1.normalized_shape[0])
        ls1, ls2 = getattr(b, "ls1", nn.Identity()), getattr(b, "ls2", nn.Identity())
        torch.testing.assert_close(pb(t), ls2(b.mlp(b.norm2(ls1(b.attn(b.norm1(t)))))))
    assert sum(p.numel() for p in twin.parameters()) < sum(p.numel() for p in model.parameters())
    assert len(find_residual_connections(model)) == 2 * len(blocks)  # the original is untouched


def test_the_pnnh_twin_of_a_timm_vit_trains_and_takes_a_mask():
    torch.manual_seed(0)
    twin = pnnh.convert(TimmViT(qkv_bias=True), to="pnnh").train()
    opt = torch.optim.AdamW(twin.parameters(), lr=2e-3)
    losses = _fit(twin, opt, torch.randn(16, 1, 28, 28), torch.arange(16) % 10, steps=15)
    assert losses[-1] < 0.5 * losses[0], losses
    block = twin.blocks[0].eval()
    t = torch.randn(2, 5, 48)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(block(t, attn_mask=causal), block(t, is_causal=True))


def test_unsupported_transformer_blocks_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match=r"block 'blocks.0' \(TimmResPostBlock\).*Transformer block"):
        pnnh.convert(TimmViT(block_fn=TimmResPostBlock))
    with pytest.raises(ConfigError, match=r"q_norm \(LayerNorm\)"):
        pnnh.convert(TimmViT(qk_norm=True))
    assert not find_residual_connections(pnnh.convert(TimmViT(qk_norm=True), to="plain"))  # kept as they are
    with pytest.raises(ConfigError, match="learner units are GELUs, the block uses SiLU"):
        pnnh.convert(TimmViT(act_layer=nn.SiLU))
    with pytest.raises(ConfigError, match="no residual block found in VisionTransformer"):
        pnnh.convert(pnnh.create_model("plain_vit_mini_d6"))
