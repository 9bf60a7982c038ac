"""Residual, plain and PNNH Vision Transformers (pnnh/models/vit.py)."""

import operator

import pytest
import torch
import torch.fx
import torch.nn as nn

import pnnh
from pnnh.errors import ConfigError
from pnnh.models.vit import Block, MirrorCoder, PlainBlock, PNNHBlock, VisionTransformer


def small(block="residual", **kw) -> VisionTransformer:
    """A ViT small enough for unit tests: 32-wide, 2 heads, 28 px inputs in 7 px patches."""
    base = dict(embed_dim=32, num_heads=2, depth=2, patch_size=7, block=block)
    base.update(kw)
    return VisionTransformer(**base)


def test_registry_names_families_and_depths():
    for family in ("vit", "plain_vit", "pnnh_vit"):
        names = pnnh.list_models(family=family)
        assert names == [f"{family}_{s}_d{d}" for s in ("mini", "tiny") for d in (6, 12, 24)]
        for n in names:
            info = pnnh.model_info(n)
            assert info.layout == "vit" and info.depth == int(n.rsplit("_d", 1)[1])
    m = pnnh.create_model("pnnh_vit_tiny_d6")
    assert m.embed_dim == 192 and len(m.blocks()) == 6 and all(isinstance(b, PNNHBlock) for b in m.blocks())
    assert all(isinstance(b, PlainBlock) for b in pnnh.create_model("plain_vit_mini_d6").blocks())
    with pytest.raises(ConfigError, match="fixes depth"):
        pnnh.create_model("vit_mini_d6", depth=3)


@pytest.mark.parametrize("block", ["residual", "plain", "pnnh"])
@pytest.mark.parametrize("pool,patch,tokens", [("token", 7, 1 + 16), ("avg", 4, 49)])
def test_shapes_and_pooling(block, pool, patch, tokens):
    m = small(block, global_pool=pool, patch_size=patch, num_classes=7).eval()
    x = torch.randn(3, 1, 28, 28)
    feats = m.forward_features(x)
    assert feats.shape == (3, tokens, 32)
    assert (m.cls_token is not None) == (pool == "token") and m.num_prefix_tokens == (pool == "token")
    pooled = m.forward_head(feats, pre_logits=True)
    expect = feats[:, 0] if pool == "token" else feats.mean(1)
    torch.testing.assert_close(pooled, expect)
    assert torch.equal(m.forward_head(feats), m(x)) and m(x).shape == (3, 7)


def test_uniform_interface():
    m = pnnh.create_model("pnnh_vit_mini_d6", num_classes=5, in_chans=3, patch_size=7, img_size=28)
    assert m.default_cfg["input_size"] == (3, 28, 28) and m.default_cfg["layout"] == "vit"
    assert m.get_classifier().out_features == 5
    m.reset_classifier(4)
    assert m(torch.randn(2, 3, 28, 28)).shape == (2, 4) and m.get_classifier().out_features == 4
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    # the class token is added into an empty slot: the same as concatenating it (timm), exactly
    m.eval()
    x = torch.randn(2, 3, 28, 28)
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x)], 1) + m.pos_embed
    assert torch.equal(m.norm(m.layers(tokens)), m.forward_features(x))


def test_patch_size_that_does_not_divide_is_a_config_error():
    with pytest.raises(ConfigError, match="patch size 5 does not divide the image size 28.*1, 2, 4, 7, 14, 28"):
        pnnh.create_model("vit_mini_d6", patch_size=5)
    m = small()
    with pytest.raises(ConfigError, match="not divisible by the ViT patch size 7"):
        m(torch.randn(1, 1, 30, 30))
    with pytest.raises(ConfigError, match="built for 28x28.*img_size=35"):
        m(torch.randn(1, 1, 35, 35))


def test_engine_reports_bad_patch_size_as_config_error(tmp_path, fmnist_dir):
    from pnnh.train import TrainConfig, train

    cfg = TrainConfig(model="vit_mini_d6", model_kwargs={"patch_size": 6}, steps=1, train_subset=64, batch_size=32,
                      test_subset=32, progress=False, out=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="patch size 6 does not divide the image size 28"):
        train(cfg)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="num_heads"):
        small(num_heads=5)
    with pytest.raises(ConfigError, match="plain block has no branch"):
        small("plain", drop_path_rate=0.1)
    with pytest.raises(ConfigError, match="coder_ratio"):
        small("pnnh", coder_ratio=0)
    with pytest.raises(ConfigError, match="coder_gain must be > 0"):
        small("pnnh", coder_gain=0)
    with pytest.raises(ConfigError, match="options of PNNH ViTs"):
        pnnh.create_model("vit_mini_d6", coder_gain=0.1)
    with pytest.raises(ConfigError, match="global_pool"):
        small(global_pool="max")
    with pytest.raises(ConfigError, match="block"):
        small("highway")


@pytest.mark.parametrize("block", ["residual", "pnnh"])
def test_drop_path_is_identity_in_eval_and_random_in_train(block):
    torch.manual_seed(0)
    a = small(block, drop_path_rate=0.5, depth=3)
    b = small(block, drop_path_rate=0.0, depth=3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 28, 28)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a.train()
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("gain", [1.0, 0.1])
def test_mirror_coder_carries_its_input_through_the_relu(gain):
    """relu(E x) and relu(-E x), read by D = [E^T, -E^T], give back x exactly at init, whatever the gain."""
    coder, learner = MirrorCoder(24, 24, gain), nn.Linear(10, 24)
    x = torch.randn(5, 7, 24)
    code = coder(x)
    assert (code >= 0).all() and code.shape == (5, 7, 48)  # really went through a ReLU
    assert code.eq(0).float().mean() == 0.5  # one of each mirrored pair is cut
    out = coder.project(torch.zeros(5, 7, 10), x, learner)
    torch.testing.assert_close(out - learner.bias, x, rtol=0, atol=1e-6)
    # the projection is one linear layer over [learner ; code]
    h = torch.randn(5, 7, 10)
    torch.testing.assert_close(coder.project(h, x, learner), learner(h) + x, rtol=1e-6, atol=1e-6)
    # a narrower coder carries the first coder_dim channels and nothing else
    coder = MirrorCoder(24, 8, gain)
    out = coder.project(torch.zeros(5, 7, 10), x, learner) - learner.bias
    torch.testing.assert_close(out[..., :8], x[..., :8], rtol=0, atol=1e-6)
    assert out[..., 8:].abs().max() == 0


def test_coder_gain_scales_the_adam_step_not_the_function():
    """Stored as E / gain: one Adam step moves the effective E by about gain * lr."""
    steps = {}
    for gain in (1.0, 0.1):
        torch.manual_seed(0)
        coder, learner = MirrorCoder(16, 16, gain), nn.Linear(4, 16)
        opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
        x = torch.randn(32, 16)
        coder.project(torch.zeros(32, 4), x, learner).pow(3).mean().backward()
        before = coder.enc.detach() * gain
        opt.step()
        steps[gain] = (coder.enc.detach() * gain - before).abs().max().item()
    assert steps[1.0] == pytest.approx(1e-2, rel=1e-3) and steps[0.1] == pytest.approx(1e-3, rel=1e-3)


def test_pnnh_block_equals_residual_block_at_init():
    """Looks-linear coders make a PNNH block compute x + attn(norm(x)), then + mlp(norm(.)), at init."""
    torch.manual_seed(0)
    res, pn = Block(32, 2), PNNHBlock(32, 2, coder_gain=0.1)
    for lin in (res.attn.qkv, res.attn.proj, res.mlp.fc1, res.mlp.fc2):
        nn.init.trunc_normal_(lin.weight, std=0.2)
        nn.init.normal_(lin.bias, std=0.1)
    for name in ("attn", "mlp", "norm1", "norm2"):  # same learner weights in both
        getattr(pn, name).load_state_dict(getattr(res, name).state_dict())
    x = torch.randn(3, 17, 32)
    torch.testing.assert_close(pn(x), res(x), rtol=1e-5, atol=1e-5)
    # ... and is nevertheless a different, plain function once its coder weights move off looks-linear
    with torch.no_grad():
        pn.coder1.dec[:, 32:] *= 0.5
    assert not torch.allclose(pn(x), res(x), atol=1e-3)


def test_every_pnnh_vit_starts_with_looks_linear_coders():
    m = pnnh.create_model("pnnh_vit_mini_d6", patch_size=7)
    eye = torch.eye(96)
    for b in m.blocks():
        for c in (b.coder1, b.coder2):
            assert c.gain == 0.1
            torch.testing.assert_close(c.enc * c.gain, eye)
            torch.testing.assert_close(c.dec * c.gain, torch.cat([eye, -eye], 1))
        assert b.attn.proj.weight.std() < 0.03  # learner: timm's trunc-normal(0.02)
    half = pnnh.create_model("pnnh_vit_mini_d6", patch_size=7, coder_ratio=0.5)
    assert half.blocks()[0].coder1.enc.shape == (48, 96)


def _adds_and_cats(module: nn.Module) -> list[torch.fx.Node]:
    gm = torch.fx.symbolic_trace(module)
    return [n for n in gm.graph.nodes if n.target in (operator.add, torch.add, operator.iadd, "add", "add_")]


def test_blocks_trace_with_fx_and_only_residual_blocks_add():
    for blk, adds in ((Block(32, 2), 2), (PlainBlock(32, 2), 0), (PNNHBlock(32, 2), 0)):
        assert len(_adds_and_cats(blk)) == adds, type(blk).__name__
    # in a PNNH block the input feeds only parameterised layers: the norm and the coder's encoder
    gm = torch.fx.symbolic_trace(PNNHBlock(32, 2))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    users = sorted((u.op, getattr(u.target, "__name__", u.target)) for u in x.users)
    assert users == [("call_function", "linear"), ("call_module", "norm1")]  # F.linear(x, gain * E) and norm1
    for name in ("vit_mini_d6", "plain_vit_mini_d6", "pnnh_vit_mini_d6"):
        m = pnnh.create_model(name, patch_size=7).eval()
        gm = torch.fx.symbolic_trace(m)
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(gm(x), m(x))


def test_plain_vit_collapses_tokens_at_init_pnnh_and_residual_do_not():
    """Without an internal path, uniform attention at init makes every token the same (rank collapse)."""

    def token_cosine(name):
        torch.manual_seed(0)
        m = pnnh.create_model(name, patch_size=7).eval()
        with torch.no_grad():
            t = m.forward_features(torch.randn(4, 1, 28, 28))[:, 1:]
        t = nn.functional.normalize(t - t.mean(-1, keepdim=True), dim=-1)
        return (t @ t.transpose(1, 2)).mean().item()

    assert token_cosine("plain_vit_mini_d12") > 0.99
    assert token_cosine("vit_mini_d12") < 0.5 and token_cosine("pnnh_vit_mini_d12") < 0.5


def test_param_count_formula():
    """Per PNNH block the two coders add 3 * dim * coder_dim weights each (E, and the +/- decoder columns)."""
    r, p = small("residual"), small("pnnh")
    n = lambda m: sum(q.numel() for q in m.parameters())
    assert n(p) - n(r) == 2 * 2 * 3 * 32 * 32
    assert n(small("plain")) == n(r)


def test_tiny_pnnh_training_run_learns(tmp_path, fmnist_dir):
    from pnnh.train import TrainConfig, train

    cfg = TrainConfig(model="pnnh_vit_mini_d6", model_kwargs={"patch_size": 7, "embed_dim": 32, "num_heads": 2},
                      train_subset=2048, test_subset=500, batch_size=32, steps=64, optimizer="adamw", lr=3e-3,
                      weight_decay=0.05, schedule="cosine", warmup=0.1, augment=False, progress=False,
                      out=str(tmp_path / "r"))
    s = train(cfg)
    assert s["test_acc"] > 0.3, s["test_acc"]  # 10 classes: chance is 0.1
    assert s["curve"][-1][1] < s["curve"][0][1] - 0.2
