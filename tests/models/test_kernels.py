"""The CPU training kernels compute the reference PNNH layer's function: values, gradients, statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F

import pnnh
from pnnh.analysis.structure import is_plain
from pnnh.models.kernels import StepWeights, TiedPNNHConv2d, batched_tied_weights, select_kernels, tied_rows
from pnnh.models.layers import dirac_weight
from pnnh.models.pnnh_cnn import PNNHConv2d, upgrade_state_dict

CL = torch.channels_last


def _kinds(model):
    return {type(m).__name__ for m in model.modules() if isinstance(m, PNNHConv2d)}


def _randomise_affine(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)


def test_reference_and_kernel_agree_in_values_gradients_and_running_statistics():
    """pnnh20 trained two SGD steps as the reference (NCHW) and through the kernels (channels_last, CPU):
    same logits, same gradient for every parameter, same BatchNorm running statistics."""
    torch.manual_seed(0)
    ref = pnnh.create_model("pnnh20")
    _randomise_affine(ref)
    fast = copy.deepcopy(ref).to(memory_format=CL)
    ref.train(), fast.train()
    assert _kinds(ref) == {"PNNHConv2d"} and _kinds(fast) == {"TiedPNNHConv2d"}
    opt_r, opt_f = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, fast))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(2):
        out_r, out_f = ref(x), fast(x.contiguous(memory_format=CL))
        torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
        for m, out, opt in ((ref, out_r, opt_r), (fast, out_f, opt_f)):
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
        for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
        opt_r.step(), opt_f.step()
    for (name, b), c in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.eval(), fast.eval()  # eval: every layer is the reference again, with the statistics training left
    assert _kinds(fast) == {"PNNHConv2d"}
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)


def test_kernel_tracks_the_reference_under_bf16_autocast():
    """Training under bf16 autocast (the ``-bf16`` ablation budgets) takes the same kernel, and it is as
    close to the fp32 layer as the reference layer under the same autocast: logits and every gradient."""
    torch.manual_seed(0)
    exact = pnnh.create_model("pnnh20", width=0.5)
    _randomise_affine(exact)
    ref, fast = copy.deepcopy(exact), copy.deepcopy(exact).to(memory_format=CL)
    for m in (exact, ref, fast):
        m.train()
    assert _kinds(fast) == {"TiedPNNHConv2d"}
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def step(m, inp, amp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(inp)
            loss = F.cross_entropy(out, y)
        loss.backward()
        return out.float()

    o32, o_ref, o_fast = step(exact, x, False), step(ref, x, True), step(fast, x.contiguous(memory_format=CL), True)
    err = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
    assert 0 < err(o_ref, o32) < 0.03 and err(o_fast, o32) < 2 * err(o_ref, o32)  # bf16 ran, and no worse
    for (name, p), q, r in zip(exact.named_parameters(), ref.parameters(), fast.parameters()):
        assert r.grad.dtype == torch.float32, name
        if p.grad.norm() > 0:
            assert err(r.grad, p.grad) <= 2 * err(q.grad, p.grad) + 0.02, name
    for (name, b), c in zip(exact.named_buffers(), fast.buffers()):
        torch.testing.assert_close(c.float(), b.float(), rtol=0.05, atol=0.02, msg=name)


def test_kernels_are_chosen_by_mode_device_format_and_norm_and_are_plain_in_structure():
    m = pnnh.create_model("pnnh20")
    assert _kinds(m.train()) == {"PNNHConv2d"}  # NCHW: the reference
    m.to(memory_format=CL)  # .to() selects too: the 1-channel stem follows the rest of the net
    assert _kinds(m) == {"TiedPNNHConv2d"} and m.stem[0].step_weights is m._kernel_step_weights
    assert _kinds(m.double()) == {"TiedPNNHConv2d"}
    assert is_plain(m)  # torch.fx traces the training form too (its ops are leaves)
    assert _kinds(m.eval()) == {"PNNHConv2d"} and m._kernel_step_weights is None
    assert is_plain(m)
    frozen = pnnh.create_model("pnnh20", coder_ratio=0.0).to(memory_format=CL).train()
    assert _kinds(frozen) == {"PNNHConv2d"}  # no coder channels: nothing to tie
    lone = PNNHConv2d(1, 16, in_code=0).to(memory_format=CL).train()
    assert type(lone) is PNNHConv2d  # a weight contiguous both ways, alone: no format to follow
    assert select_kernels(PNNHConv2d(16, 16).to(memory_format=CL).train()) == 1


def test_a_one_channel_batch_keeps_the_whole_net_on_the_channels_last_path():
    """The engine's loader hands a 1-channel batch through ``.contiguous(channels_last)``, which
    keeps NCHW strides (the tensor is contiguous both ways). The stem must still write
    channels_last, or the next layer falls to the slow 14-channel BatchNorm."""
    m = pnnh.create_model("pnnh20").to(memory_format=CL).train()
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=CL)
    assert x.stride() == (784, 784, 28, 1)  # the strides the loader's batches have
    outputs = []
    for layer in m.pnnh_layers():
        layer.register_forward_hook(lambda mod, inp, out: outputs.append(out.is_contiguous(memory_format=CL)))
    m(x)
    assert len(outputs) == 19 and all(outputs)


def test_running_statistics_survive_whatever_replaces_the_modules_tensors(tmp_path):
    """The kernel updates ``bn.running_mean``/``running_var`` in place through a full-width
    storage. Whatever replaces or overwrites those tensors (deepcopy, a dtype change,
    ``load_state_dict`` with or without ``assign``) must not cut the update off, and the state dict
    and checkpoints keep the ``C_l + C_c`` shapes."""
    from pnnh.train.checkpoint import load_weights, save_weights

    def reference_stats(layer, x):  # one reference step on a copy
        ref = copy.deepcopy(layer).to(memory_format=torch.contiguous_format).train()
        assert type(ref) is PNNHConv2d
        ref(x.to(layer.weight.dtype))
        return ref.bn.running_mean.clone(), ref.bn.running_var.clone()

    torch.manual_seed(0)
    x = torch.randn(8, 16, 7, 7) + 0.5
    layer = PNNHConv2d(16, 16, n_code=4, in_code=4).to(memory_format=CL).train()
    c = layer.bn.num_features
    for change in ("none", "deepcopy", "double", "load", "load_assign"):
        if change == "deepcopy":
            layer = copy.deepcopy(layer)
        elif change == "double":
            layer = layer.double()
        elif change in ("load", "load_assign"):
            other = {k: v.clone() + (0.25 if "running" in k else 0) for k, v in layer.state_dict().items()}
            layer.load_state_dict(other, assign=change == "load_assign")
        assert type(layer) is TiedPNNHConv2d, change
        want_mean, want_var = reference_stats(layer, x)
        layer(x.to(layer.weight.dtype).contiguous(memory_format=CL))
        assert layer.bn.running_mean.shape == (c,) and layer.bn.running_var.shape == (c,), change
        torch.testing.assert_close(layer.bn.running_mean, want_mean, msg=change)
        torch.testing.assert_close(layer.bn.running_var, want_var, msg=change)
    save_weights(tmp_path / "w.safetensors", layer)  # the module's statistics, not the scratch behind them
    fresh = PNNHConv2d(16, 16, n_code=4, in_code=4).double()
    load_weights(tmp_path / "w.safetensors", fresh)
    assert torch.equal(fresh.bn.running_mean, layer.bn.running_mean)
    assert torch.equal(fresh.bn.running_var, layer.bn.running_var)


def test_a_frozen_batch_norm_inside_a_training_kernel_uses_its_statistics():
    torch.manual_seed(0)
    layer = PNNHConv2d(16, 16).to(memory_format=CL).train()
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(layer).to(memory_format=torch.contiguous_format)
    layer.bn.eval(), ref.bn.eval()
    x = torch.randn(4, 16, 6, 6)
    torch.testing.assert_close(layer(x.contiguous(memory_format=CL)), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_tied_weights_are_each_layers_tied_rows(channels_last):
    m = pnnh.create_model("pnnh20")
    if channels_last:
        m = m.to(memory_format=CL)
    layers = [lay for lay in m.pnnh_layers() if lay.dirac is not None]
    for layer, (w, gamma, beta) in zip(layers, batched_tied_weights(layers)):
        n, bn = layer.n_learn, layer.bn
        full = dirac_weight(layer.dirac.path, layer.dirac.alpha, layer.weight, layer.dirac.beta)
        torch.testing.assert_close(w, torch.cat([full, -full[n:]]))
        torch.testing.assert_close(gamma, torch.cat([bn.weight, bn.weight[n:]]))
        torch.testing.assert_close(beta, torch.cat([bn.bias, -bn.bias[n:]]))
        if w.shape[1] > 1:  # (a 1-channel stem weight is contiguous in both formats)
            assert w.is_contiguous(memory_format=CL) == channels_last


def test_step_weights_live_for_one_forward_only():
    m = pnnh.create_model("pnnh20").to(memory_format=CL).train()
    step: StepWeights = m._kernel_step_weights
    seen = []
    m.stem[0].register_forward_pre_hook(lambda mod, inp: seen.append(len(step.pending)))
    m(torch.randn(2, 1, 28, 28).contiguous(memory_format=CL))
    assert seen == [len(m.pnnh_layers())] and step.pending == {}
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 3, 28, 28))  # wrong channels: the forward fails ...
    assert step.pending == {}  # ... and leaves no weights behind for the next


@pytest.mark.parametrize("dim, sign", [(0, -1.0), (1, 1.0), (2, -1.0)])
def test_tied_rows_value_and_gradient(dim, sign):
    """``tied_rows(t, n, dim, sign)`` is ``cat(t, sign * t[n:])`` along ``dim``, gradient included."""
    torch.manual_seed(0)
    t = torch.randn(5, 6, 4, dtype=torch.double, requires_grad=True)
    n = 2
    ref = torch.cat([t, sign * t.narrow(dim, n, t.shape[dim] - n)], dim)
    assert torch.equal(tied_rows(t, n, dim, sign), ref)
    assert torch.autograd.gradcheck(lambda a: tied_rows(a, n, dim, sign), (t,))


def test_state_dicts_of_pnnh_0_1_load(tmp_path):
    """PNNH layers saved their DiracNet parameters as ``path``/``path_scale``/``weight_scale``; those
    files load into the layers' ``dirac.path``/``dirac.alpha``/``dirac.beta``, directly and as checkpoints."""
    from safetensors.torch import load_file, save_file

    from pnnh.train.checkpoint import load_weights, save_weights

    torch.manual_seed(0)
    src = pnnh.create_model("pnnh20").eval()
    with torch.no_grad():
        for layer in src.pnnh_layers():
            layer.dirac.alpha.uniform_(0.5, 1.5)
            layer.dirac.beta.uniform_(0.05, 0.2)
    renames = {"dirac.path": "path", "dirac.alpha": "path_scale", "dirac.beta": "weight_scale"}

    def old_name(key):
        for new, old in renames.items():
            if key.endswith("." + new):
                return key[: -len(new)] + old
        return key

    old = {old_name(k): v for k, v in src.state_dict().items()}
    assert "stem.0.path_scale" in old and list(upgrade_state_dict(old)) == list(src.state_dict())
    x = torch.randn(2, 1, 28, 28)
    direct = pnnh.create_model("pnnh20").eval()
    direct.load_state_dict(old)
    torch.testing.assert_close(direct(x), src(x))
    save_weights(tmp_path / "w.safetensors", src)
    tensors = load_file(tmp_path / "w.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        meta = f.metadata()
    save_file({old_name(k): v for k, v in tensors.items()}, tmp_path / "old.safetensors", metadata=meta)
    loaded = pnnh.create_model("pnnh20").eval()
    load_weights(tmp_path / "old.safetensors", loaded)
    torch.testing.assert_close(loaded(x), src(x))


def test_pnnh_kernels_reference_turns_the_kernels_off_and_a_bad_value_is_named(monkeypatch):
    """``PNNH_KERNELS=reference``: every layer runs the reference forward, with the same function;
    an unknown value is one ConfigError naming the variable."""
    torch.manual_seed(0)
    model = pnnh.create_model("pnnh8").to(memory_format=CL).train()
    assert _kinds(model) == {"TiedPNNHConv2d"}
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=CL)
    fast = model(x)
    monkeypatch.setenv("PNNH_KERNELS", "reference")
    model.train()
    assert _kinds(model) == {"PNNHConv2d"} and model.__dict__.get("_kernel_step_weights") is None
    torch.testing.assert_close(model(x), fast, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("PNNH_KERNELS", "fastest")
    with pytest.raises(pnnh.errors.ConfigError, match="PNNH_KERNELS must be one of auto, reference"):
        model.train()


def test_the_training_kernel_traces_without_graph_breaks():
    """torch.compile sees a PNNH net's training forward (the tied kernel, its batched weights and linked
    running statistics) as one graph: a graph break per layer made the compiled step slower than eager."""
    torch._dynamo.reset()
    model = pnnh.create_model("pnnh8").to(memory_format=CL).train()
    assert _kinds(model) == {"TiedPNNHConv2d"}
    torch._dynamo.utils.counters.clear()
    out = torch.compile(model, backend="eager")(torch.randn(4, 1, 28, 28).contiguous(memory_format=CL))
    out.sum().backward()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert model.stem[0].bn.num_batches_tracked.item() == 1  # the running statistics were updated, once
