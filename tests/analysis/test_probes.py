"""Probes: where the hooks sit, their depths, BatchNorm calibration, no side effects."""

import pytest
import torch
import torch.nn as nn

import pnnh
from pnnh.analysis.probes import (ProbeTap, activation_modules, branch_end, calibrate_batch_norm, get_blocks,
                                  resolve_norm_stats, resolve_probe_mode)
from pnnh.errors import ConfigError


def _record(model, mode, x):
    with torch.no_grad(), ProbeTap(model, mode, lambda t, p: t.clone()) as tap:
        model(x)
    return tap


def test_depth_axis_is_shared_by_layer_and_block_probes():
    x = torch.randn(4, 1, 28, 28)
    plain, res = pnnh.create_model("plain20", width=0.25).eval(), pnnh.create_model("resnet20", width=0.25).eval()
    assert resolve_probe_mode(plain, "auto") == "layers" and resolve_probe_mode(res, "auto") == "blocks"
    p = _record(plain, "layers", x)
    assert [q.depth for q in p.probes] == list(range(1, 20))  # every conv-BN-ReLU of plain20
    r = _record(res, "blocks", x)
    assert [q.depth for q in r.probes] == [1] + list(range(3, 20, 2))  # stem, then every block output
    assert r.probes[0].name == "stem" and r.probes[1].name == "stages.0.0"
    # the block probe of a plain net is its act2 output: same tensor, same depth
    pb = _record(plain, "blocks", x)
    by_name = {q.name: q for q in p.probes}
    for q in pb.probes[1:]:
        assert torch.equal(q.value, by_name[q.name + ".act2"].value) and q.depth == by_name[q.name + ".act2"].depth


def test_hooks_are_removed_and_shortcut_convs_are_not_counted():
    m = pnnh.create_model("resnet20", width=0.25, shortcut="B").eval()  # projection shortcuts: 1x1 convs
    tap = _record(m, "blocks", torch.randn(2, 1, 28, 28))
    assert tap.probes[-1].depth == 19
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    names = [n for n, _ in activation_modules(m)]
    assert not any("shortcut" in n for n in names) and len(names) == 19
    assert branch_end(m.blocks()[0]) is m.blocks()[0].bn2
    assert branch_end(pnnh.create_model("plain20").blocks()[0]) is None
    pre = pnnh.create_model("preact_resnet20", width=0.25)
    assert branch_end(pre.blocks()[0]) is pre.blocks()[0].conv2


def test_weight_shared_module_gives_one_probe_per_call():
    blk = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    model = nn.Sequential(blk, blk, nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    tap = _record(model, "blocks", torch.randn(2, 3, 8, 8))
    assert [q.name for q in tap.probes] == ["stem", "0", "0#1", "2"]
    assert [q.depth for q in tap.probes] == [0, 1, 2, 3]


def test_batch_norm_calibration_matches_batch_statistics_and_leaves_eval_mode():
    x = torch.randn(32, 1, 28, 28)
    torch.manual_seed(1)
    m = pnnh.create_model("plain20", width=0.25)
    assert resolve_norm_stats(m) == "batch"
    m.train()
    with torch.no_grad():
        ref = m(x)  # batch statistics (this also updates the running ones, which we then discard)
    torch.manual_seed(1)
    m = pnnh.create_model("plain20", width=0.25)
    with torch.no_grad(), calibrate_batch_norm(m):
        out = m(x)
    assert not m.training and all(not b.training for b in m.modules())
    with torch.no_grad():
        again = m(x)  # eval mode with the calibrated statistics
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(again, ref, rtol=1e-3, atol=1e-3)  # unbiased vs biased variance only
    assert resolve_norm_stats(m) == "running"
    assert resolve_norm_stats(nn.Sequential(nn.Linear(2, 2))) == "none"


def test_errors_are_config_errors():
    with pytest.raises(ConfigError, match="blocks"):
        get_blocks(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="probe mode"):
        resolve_probe_mode(pnnh.create_model("plain20"), "every")
    with pytest.raises(ConfigError, match="activation"):
        with ProbeTap(nn.Sequential(nn.Linear(2, 2)), "layers", lambda t, p: None):
            pass


def test_branch_end_is_the_merged_branch_for_catalogue_blocks():
    """Scaled / SE branches are measured after the scale or excitation, where they are added."""
    import pnnh
    from pnnh.analysis.probes import branch_end

    blk = pnnh.create_model("scaled_resnet20").blocks()[0]
    assert branch_end(blk) is blk.branch_out
    r = pnnh.create_model("resnet20").blocks()[0]
    assert branch_end(r) is r.bn2
    plain = pnnh.create_model("plain20").blocks()[0]
    assert branch_end(plain) is None
