"""Interconnected (mixed) dilated conv nets: the cross-connections are the only difference."""

import math

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.analysis.structure import find_residual_connections
from pnnh.errors import ConfigError
from pnnh.models.dilated import (DilatedNet, image_to_sequence, mixture_layers, receptive_windows, swapped_pairs,
                                 wavenet_dilations)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def pair_and_mixed(sequence="rows", **kw):
    """The two registered nets with the same weights."""
    pair = pnnh.create_model(f"dilated_pair_{sequence}", **kw).eval()
    mixed = pnnh.create_model(f"mixed_dilated_{sequence}", **kw).eval()
    mixed.load_state_dict(pair.state_dict())
    return pair, mixed


def test_the_two_networks_have_different_mode_trees_that_meet_at_even_layers():
    n = wavenet_dilations(28)
    assert n == [1, 2, 4, 8, 16] and swapped_pairs(n) == [2, 1, 8, 4, 16]
    assert receptive_windows(n)[-1] == frozenset(range(32))  # the last step sees all 28 rows
    a, b = receptive_windows(n), receptive_windows(swapped_pairs(n))
    assert a[0] == {0, 1} and b[0] == {0, 2}  # t pairs with t-1 in N, with t-2 in N-bar
    assert a[1] == b[1] == frozenset(range(4))
    assert mixture_layers([n, swapped_pairs(n)]) == [2, 4]
    assert mixture_layers([wavenet_dilations(784), swapped_pairs(wavenet_dilations(784))]) == [2, 4, 6, 8]


@pytest.mark.parametrize("sequence", ["rows", "pixels"])
def test_same_parameters_and_the_mixed_net_is_interconnected_at_every_mixture_node(sequence):
    pair, mixed = pair_and_mixed(sequence)
    assert n_params(pair) == n_params(mixed)
    assert [layer.mix for layer in pair.layers] == [False] * len(pair.layers)
    expected = [2, 4] if sequence == "rows" else [2, 4, 6, 8]
    assert [i + 1 for i, layer in enumerate(mixed.layers) if layer.mix] == expected


def test_output_depends_on_the_cross_connection_and_ablating_it_recovers_the_pair():
    pair, mixed = pair_and_mixed()
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(mixed(x), pair(x))
    for layer in mixed.layers:  # ablate every interconnection
        layer.mix = False
    torch.testing.assert_close(mixed(x), pair(x), rtol=0, atol=0)


def test_one_networks_state_reads_the_other_networks_weights_only_when_interconnected():
    x = torch.randn(4, 1, 28, 28)
    for name, expect in (("mixed_dilated_rows", True), ("dilated_pair_rows", False)):
        m = pnnh.create_model(name).eval()
        other_first_conv = m.layers[0].streams[1][0][1].weight  # network N-bar, layer 1
        h = m.layers(m.stem(image_to_sequence(x, "rows")))
        own = h[:, :m.num_features]  # network N's last layer
        (g,) = torch.autograd.grad(own.pow(2).sum(), other_first_conv, allow_unused=True)
        assert (g is not None and g.abs().sum() > 0) == expect, name


def test_layers_are_causal_and_the_readout_sees_every_row():
    m = pnnh.create_model("mixed_dilated_rows").eval()
    x = torch.randn(2, 1, 28, 28)
    y = x.clone()
    y[:, :, 20:] += 1.0  # change rows 20..27
    fx, fy = m.forward_features(x), m.forward_features(y)
    torch.testing.assert_close(fx[:, :, :20], fy[:, :, :20], rtol=0, atol=0)  # steps < 20 do not see them
    z = x.clone()
    z[:, :, 0] += 1.0  # the first row reaches the last step
    assert not torch.allclose(m(z), m(x))


def test_interconnections_are_not_shortcuts():
    for name in ("dilated_pair_rows", "mixed_dilated_rows", "mixed_dilated_pixels"):
        assert find_residual_connections(pnnh.create_model(name)) == [], name


def test_image_to_sequence():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    rows = image_to_sequence(x, "rows")
    assert rows.shape == (2, 15, 4) and torch.equal(rows[:, :, 1], x[:, :, 1, :].reshape(2, 15))
    pixels = image_to_sequence(x, "pixels")
    assert pixels.shape == (2, 3, 20) and torch.equal(pixels[:, :, 7], x[:, :, 1, 2])
    cl = x.contiguous(memory_format=torch.channels_last)  # the engine trains channels-last
    assert torch.equal(image_to_sequence(cl, "rows"), rows)


@pytest.mark.parametrize("name", ["dilated_pair_rows", "mixed_dilated_rows"])
def test_model_interface(name):
    m = pnnh.create_model(name, width=16).eval()
    x = torch.randn(3, 1, 28, 28)
    assert m.default_cfg["input_size"] == (1, 28, 28)
    calls = []
    hooks = [b.register_forward_hook(lambda mod, i, o: calls.append(mod)) for b in m.blocks()]
    feats = m.forward_features(x)
    for h in hooks:
        h.remove()
    assert calls == m.blocks() and feats.shape == (3, 16, 28)
    assert torch.equal(m.forward_head(feats), m(x)) and m.forward_head(feats, pre_logits=True).shape == (3, 16)
    m.reset_classifier(4)
    assert m(x).shape == (3, 4) and m.get_classifier().out_features == 4


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="mixture nodes"):
        DilatedNet([[1, 2, 4], [2, 1, 4]], mix_at=(1,))
    with pytest.raises(ConfigError, match="fixes"):
        pnnh.create_model("mixed_dilated_rows", sequence="pixels")
    with pytest.raises(ConfigError, match="width"):
        pnnh.create_model("mixed_dilated_rows", width=0)
    with pytest.raises(ConfigError, match="same number"):
        DilatedNet([[1, 2], [1]])


@pytest.mark.parametrize("name", ["dilated_pair_rows", "mixed_dilated_rows"])
def test_trains_through_the_engine(name, tmp_path, fmnist_dir):
    from pnnh.train import TrainConfig, train

    s = train(TrainConfig(model=name, data="fashion-mnist", train_subset=64, test_subset=32, batch_size=16, steps=3,
                          progress=False, out=str(tmp_path / name)))
    assert s["status"] == "complete" and all(math.isfinite(loss) for _, loss in s["curve"])
    assert s["params"] == n_params(pnnh.create_model(name))
