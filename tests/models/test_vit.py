"""Residual, plain and PNNH Vision Transformers (pnnh/models/vit.py)."""

import operator

import pytest
import torch
import torch.fx
import torch.nn as nn

import pnnh
from pnnh.errors import ConfigError
from pnnh.analysis.structure import find_residual_connections
from pnnh.models.vit import (Block, DiracBlock, DiracLinear, MirrorCoder, PlainBlock, PNNHBlock, PNNHParallelBlock,
                             split_joint_in_proj,
                             ShapedAttention, SkiplessBlock, VisionTransformer)


def small(block="residual", **kw) -> VisionTransformer:
    """A ViT small enough for unit tests: 32-wide, 2 heads, 28 px inputs in 7 px patches."""
    base = dict(embed_dim=32, num_heads=2, depth=2, patch_size=7, block=block)
    base.update(kw)
    return VisionTransformer(**base)


def test_registry_names_families_and_depths():
    for family in ("vit", "plain_vit", "pnnh_vit", "dirac_vit", "skipless_vit"):
        names = pnnh.list_models(family=family)
        assert names == [f"{family}_{s}_d{d}" for s in ("mini", "tiny") for d in (6, 12, 24)]
        for n in names:
            info = pnnh.model_info(n)
            assert info.layout == "vit" and info.depth == int(n.rsplit("_d", 1)[1])
    m = pnnh.create_model("pnnh_vit_tiny_d6")
    assert m.embed_dim == 192 and len(m.blocks()) == 6 and all(isinstance(b, PNNHParallelBlock) for b in m.blocks())
    assert all(isinstance(b, PlainBlock) for b in pnnh.create_model("plain_vit_mini_d6").blocks())
    assert all(isinstance(b, PNNHParallelBlock) for b in pnnh.create_model("pnnh_vit_mini_d6", coder="block").blocks())
    assert all(isinstance(b, DiracBlock) for b in pnnh.create_model("dirac_vit_mini_d6").blocks())
    assert all(isinstance(b, SkiplessBlock) for b in pnnh.create_model("skipless_vit_mini_d6").blocks())
    with pytest.raises(ConfigError, match="fixes depth"):
        pnnh.create_model("vit_mini_d6", depth=3)


@pytest.mark.parametrize("block,kw", [("residual", {}), ("plain", {}), ("pnnh", {"coder": "sublayer"}), ("pnnh", {}),
                                      ("dirac", {}), ("skipless", {}), ("skipless", {"attn_shape": "value_skipinit"})])
@pytest.mark.parametrize("pool,patch,tokens", [("token", 7, 1 + 16), ("avg", 4, 49)])
def test_shapes_and_pooling(block, kw, pool, patch, tokens):
    m = small(block, global_pool=pool, patch_size=patch, num_classes=7, **kw).eval()
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
    with pytest.raises(ConfigError, match="options of PNNH ViTs"):
        pnnh.create_model("skipless_vit_mini_d6", coder="block")
    with pytest.raises(ConfigError, match="unknown coder 'tied'; use block, sublayer"):
        small("pnnh", coder="tied")
    with pytest.raises(ConfigError, match="leaving no learner units"):
        small("pnnh", coder="block", mlp_ratio=2)
    with pytest.raises(ConfigError, match="attn_shape is an option of skipless"):
        pnnh.create_model("vit_mini_d6", attn_shape="shaped")
    with pytest.raises(ConfigError, match="unknown attn_shape"):
        small("skipless", attn_shape="e-spa")
    with pytest.raises(ConfigError, match="skipless block has no branch"):
        small("skipless", drop_path_rate=0.1)
    with pytest.raises(ConfigError, match="global_pool"):
        small(global_pool="max")
    with pytest.raises(ConfigError, match="block"):
        small("highway")


@pytest.mark.parametrize("block,kw", [("residual", {}), ("pnnh", {"coder": "sublayer"}), ("pnnh", {})])
def test_drop_path_is_identity_in_eval_and_random_in_train(block, kw):
    torch.manual_seed(0)
    a = small(block, drop_path_rate=0.5, depth=3, **kw)
    b = small(block, drop_path_rate=0.0, depth=3, **kw)
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


@pytest.mark.parametrize("coder", ["block", "sublayer"])
def test_path_param_keeps_the_function_and_gradients_but_decays_to_the_identity(coder):
    """``path_param="param"`` (the default): E = E0 + gain * enc. The same model and gradients as
    ``"init"``; AdamW's decay then pulls the coder to the looks-linear path instead of shrinking it to zero."""
    torch.manual_seed(0)
    a = pnnh.create_model("pnnh_vit_mini_d6", patch_size=7, coder=coder, path_param="init")
    b = pnnh.create_model("pnnh_vit_mini_d6", patch_size=7, coder=coder)
    assert {m.path_param for m in b.modules() if isinstance(m, MirrorCoder)} == {"param"}
    b.load_state_dict({k: v for k, v in a.state_dict().items() if ".coder" not in k}, strict=False)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for m in (a, b):
        nn.functional.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6)
    assert len(b.state_dict()) == len(a.state_dict()) + 2 * (6 if coder == "block" else 12)  # the fixed paths
    c = (b.blocks()[0].coder if coder == "block" else b.blocks()[0].coder1)
    ca = (a.blocks()[0].coder if coder == "block" else a.blocks()[0].coder1)
    for m, coder_ in ((a, ca), (b, c)):  # decay alone (no loss): "init" shrinks E, "param" keeps it
        opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5)
        for _ in range(5):
            opt.zero_grad(set_to_none=False)
            opt.step()
    torch.testing.assert_close(c.encoder_weight(), torch.eye(96))
    assert ca.encoder_weight().diagonal().max() < 0.8
    with pytest.raises(ConfigError, match="path_param"):
        pnnh.create_model("pnnh_vit_mini_d6", path_param="dirac")
    with pytest.raises(ConfigError, match="path_param"):
        pnnh.create_model("vit_mini_d6", path_param="param")


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
        pn.coder1.dec[:, 32:] += 5 * torch.eye(32)  # D- = -I -> -I/2 (gain 0.1)
    assert not torch.allclose(pn(x), res(x), atol=1e-3)


@pytest.mark.parametrize("coder", ["block", "sublayer"])
def test_every_pnnh_vit_starts_with_looks_linear_coders(coder):
    m = pnnh.create_model("pnnh_vit_mini_d6", patch_size=7, coder=coder)
    eye = torch.eye(96)
    for b in m.blocks():
        coders, proj = ((b.coder,), b.proj) if coder == "block" else ((b.coder1, b.coder2), b.attn.proj)
        for c in coders:
            assert c.gain == 0.1
            torch.testing.assert_close(c.encoder_weight(), eye)
            torch.testing.assert_close(c.decoder_weight(), torch.cat([eye, -eye], 1))
        assert proj.weight.std() < 0.03  # learner: timm's trunc-normal(0.02)
    half = pnnh.create_model("pnnh_vit_mini_d6", patch_size=7, coder_ratio=0.5, coder=coder).blocks()[0]
    assert (half.coder if coder == "block" else half.coder1).enc.shape == (48, 96)


def test_the_default_pnnh_vit_is_the_block_coder():
    assert pnnh.create_model("pnnh_vit_mini_d12", patch_size=7).coder == "block"
    assert all(isinstance(b, PNNHParallelBlock) for b in pnnh.create_model("pnnh_vit_mini_d6").blocks())


def _adds_and_cats(module: nn.Module) -> list[torch.fx.Node]:
    """The graph's additions of activations (additions of weights to weights, e.g. ``E0 + gain * enc``,
    are not counted: they compute a parameter, not a path)."""
    gm = torch.fx.symbolic_trace(module)
    weights: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:  # nodes computed from parameters and buffers alone
        if n.op == "get_attr" or (n.op != "placeholder" and n.all_input_nodes and set(n.all_input_nodes) <= weights):
            weights.add(n)
    return [n for n in gm.graph.nodes
            if n.target in (operator.add, torch.add, operator.iadd, "add", "add_") and n not in weights]


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
    """Per sub-layer PNNH block the two coders add 3 * dim * coder_dim weights each (E, and the +/- decoder
    columns); a block-coder PNNH block holds 11 dim^2 weights against the residual block's 12 dim^2 (and
    5 dim fewer biases and norm weights: no fc2 bias, one LayerNorm)."""
    r, sub, blk = small("residual"), small("pnnh", coder="sublayer"), small("pnnh")
    n = lambda m: sum(q.numel() for q in m.parameters())
    assert n(sub) - n(r) == 2 * 2 * 3 * 32 * 32
    assert n(r) - n(blk) == 2 * (32 * 32 + 5 * 32)
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


# -- coder="block": one PNNH layer per block --------------------------------------------------------

def _perturbed_parallel_block(dim=32, heads=2, **kw) -> PNNHParallelBlock:
    torch.manual_seed(0)
    b = PNNHParallelBlock(dim, heads, coder_gain=0.1, **kw)
    for lin in (b.qkv, b.fc1, b.proj):  # learner weights large enough to matter
        nn.init.trunc_normal_(lin.weight, std=0.2)
        nn.init.normal_(lin.bias, std=0.1)
    return b


def test_parallel_pnnh_block_carries_its_input_at_init():
    """Looks-linear coder: the block is x + P A(LN x) + W2 gelu(W1 LN x) + b, the parallel residual block."""
    b = _perturbed_parallel_block()
    x = torch.randn(3, 17, 32)
    qkv, u = b.qkv(b.norm(x)), b.fc1(b.norm(x))
    q, k, v = qkv.unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4).unbind(0)
    a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    expect = x + b.proj(torch.cat([a, nn.functional.gelu(u)], dim=-1))
    torch.testing.assert_close(b(x), expect, rtol=1e-5, atol=1e-5)
    # the path runs through the coder's ReLUs: off looks-linear, the block is no longer x + f(x)
    with torch.no_grad():
        b.coder.dec[:, 32:] += 5 * torch.eye(32)  # D- = -I -> -I/2 (gain 0.1)
    assert not torch.allclose(b(x), expect, atol=1e-3)
    # the learner is 4 * 32 hidden units minus the 2 * 32 mirrored code units
    assert b.hidden == 64 and b.coder.coder_dim == 32


def test_parallel_pnnh_block_one_buffer_equals_the_eager_form():
    """The one-buffer form computes the eager concatenations' function, forward and backward (to float rounding)."""
    b = _perturbed_parallel_block()
    with torch.no_grad():
        b.coder.enc.add_(torch.randn_like(b.coder.enc))
        b.coder.dec.add_(torch.randn_like(b.coder.dec))
    results = []
    for fused in (True, False):
        b.fused = fused
        b.zero_grad()
        x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = b(x)
        y.pow(2).sum().backward()
        results.append([y, x.grad] + [p.grad for p in b.parameters()])
    for got, want in zip(*results):  # float rounding scales with the tensor's largest entry (sums of products)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("size", ["mini", "tiny"])
@pytest.mark.parametrize("depth", [12, 24])
def test_block_coder_costs_no_more_parameters_than_the_residual_vit(size, depth):
    n = lambda m: sum(q.numel() for q in m.parameters())
    res = n(pnnh.create_model(f"vit_{size}_d{depth}"))
    block = pnnh.create_model(f"pnnh_vit_{size}_d{depth}", coder="block")
    dim = block.embed_dim
    assert n(block) <= 0.92 * res  # 11 dim^2 against 12 dim^2 weights per block
    assert n(pnnh.create_model(f"pnnh_vit_{size}_d{depth}", coder="block", mlp_ratio=4.5)) <= res
    # per block: [q; k; v; W1] (dim x 5 dim), E (dim x dim), [P | W2 | D] (dim x 5 dim), biases, one norm
    per_block = sum(q.numel() for q in block.blocks()[0].parameters())
    assert per_block == 5 * dim * dim + 5 * dim + dim * dim + 5 * dim * dim + dim + 2 * dim


def test_new_families_have_no_residual_connection():
    for name, kw in (("pnnh_vit_mini_d6", {"coder": "block"}), ("pnnh_vit_mini_d6", {"path_param": "param"}),
                     ("dirac_vit_mini_d6", {}), ("skipless_vit_mini_d6", {}),
                     ("skipless_vit_mini_d6", {"attn_shape": "value_skipinit"})):
        m = pnnh.create_model(name, patch_size=7, **kw).eval()
        assert find_residual_connections(m) == [], name
        gm = torch.fx.symbolic_trace(m)  # the traced graph (eager concatenations) is the model's function
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)
    # in a block-coder PNNH block the input feeds only the norm and the coder's encoder
    gm = torch.fx.symbolic_trace(PNNHParallelBlock(32, 2))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    users = sorted((u.op, getattr(u.target, "__name__", u.target)) for u in x.users)
    assert users == [("call_function", "linear"), ("call_module", "norm")]


# -- rivals: DiracNet-style plain ViT, skipless ViT with shaped / value-SkipInit attention ---------

def test_dirac_linear_keeps_the_identity_in_its_parametrisation():
    torch.manual_seed(0)
    lin = DiracLinear(16, 16)
    x = torch.randn(5, 16)
    w = lin.effective_weight()
    rows = lin.weight / lin.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w, torch.eye(16) + 0.1 * rows)
    # V enters only through its direction: scaling it (weight decay, large Adam steps) changes nothing
    y = lin(x)
    with torch.no_grad():
        lin.weight.mul_(1e-3)
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        lin.beta.zero_()
    torch.testing.assert_close(lin(x), x)  # b = 0: exactly the identity
    wide = DiracLinear(8, 24)  # a rectangular map: the identity on its first 8 units
    torch.testing.assert_close(wide.path, torch.eye(24, 8))


def test_dirac_block_starts_with_identity_paths_everywhere():
    m = pnnh.create_model("dirac_vit_mini_d6", patch_size=7)
    for b in m.blocks():
        assert all(isinstance(lin, DiracLinear) for lin in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
        torch.testing.assert_close(b.attn.qkv.path, torch.eye(96).repeat(3, 1))
        assert b.mlp.fc1.path.shape == (384, 96) and b.mlp.fc1.path[:96].equal(torch.eye(96))


@pytest.mark.parametrize("shape", ["shaped", "value_skipinit"])
def test_shaped_attention_is_the_identity_at_init_and_its_formula_after(shape):
    """M = a I + b softmax(q k^T / sqrt(d)) - c U; identity value / projection and M = I at init."""
    m = small("skipless", attn_shape=shape)
    attn = m.blocks()[0].attn
    x = torch.randn(3, 17, 32)
    torch.testing.assert_close(attn(x), x, rtol=1e-5, atol=1e-5)
    # perturbed: the fused form equals the explicit attention matrix
    torch.manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = attn.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4).unbind(0)
    s = (q @ k.transpose(-2, -1) / 4.0).softmax(-1)
    mix = attn.skip_gain * torch.eye(17) + attn.attn_gain * s - attn.centre_gain / 17
    expect = attn.proj((mix @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x), expect, rtol=1e-5, atol=1e-5)
    assert isinstance(attn, ShapedAttention) and attn.centre_gain.requires_grad == (shape == "shaped")


def test_skipless_block_at_init_is_norm_plus_scaled_mlp():
    m = small("skipless")
    b = m.blocks()[0]
    x = torch.randn(3, 17, 32)
    h = b.norm(x)
    torch.testing.assert_close(b(x), h + 0.1 * b.mlp(h), rtol=1e-5, atol=1e-5)


def test_parallel_pnnh_block_loads_a_joint_in_proj_state_dict_and_takes_qkv_bias_false():
    """[W_qkv; W_1] stored as one `in_proj` matrix loads by rows; q, k, v without bias is an option."""
    b = _perturbed_parallel_block()
    sd = b.state_dict()
    joint = {k: v for k, v in sd.items() if not k.startswith(("qkv.", "fc1."))}
    joint["in_proj.weight"] = torch.cat([sd["qkv.weight"], sd["fc1.weight"]])
    joint["in_proj.bias"] = torch.cat([sd["qkv.bias"], sd["fc1.bias"]])
    fresh = PNNHParallelBlock(32, 2, coder_gain=0.1)
    fresh.load_state_dict(joint)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(fresh(x), b(x))
    # the checkpoint loader's form: a whole model's state dict, split back into the model's keys
    model = pnnh.create_model("pnnh_vit_mini_d6", coder="block", embed_dim=32, num_heads=2)
    own = model.state_dict()
    stored = {}
    for k, v in own.items():
        if k.endswith(("qkv.weight", "qkv.bias")):
            stored[k.replace("qkv.", "in_proj.")] = torch.cat([v, own[k.replace("qkv.", "fc1.")]])
        elif ".fc1." not in k or "layers" not in k:
            stored[k] = v
    assert "layers.0.in_proj.weight" in stored and "layers.0.fc1.weight" not in stored
    upgraded = split_joint_in_proj(stored)
    assert set(upgraded) == set(own) and all(torch.equal(upgraded[k], own[k]) for k in own)
    nobias = PNNHParallelBlock(32, 2, qkv_bias=False)
    assert nobias.qkv.bias is None and nobias.fc1.bias is not None
    assert nobias(x).shape == x.shape
