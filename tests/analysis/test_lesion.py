"""Lesion study: deleting and swapping blocks at test time, and the path-length distribution."""

import math

import torch
import torch.nn as nn

import pnnh
from pnnh.analysis.lesion import _patched, block_shapes, lesion_study, path_length_distribution, shortcut_path


def _run(model, x, order, replace=None):
    """Forward a pnnh CNN block by block, in ``order``, replacing block i's output by ``replace[i](h)``."""
    replace = replace or {}
    h = model.stem(x)
    blocks = model.blocks()
    for i in order:
        h = replace[i](h) if i in replace else blocks[i](h)
    return model.forward_head(model.final_norm(h))


@torch.no_grad()
def test_delete_and_swap_compute_what_they_say():
    m = pnnh.create_model("resnet20", width=0.25).eval()
    x = torch.randn(6, 1, 28, 28)
    b = m.blocks()
    before = m(x)
    deleted = _run(m, x, range(9), {3: b[3].shortcut})  # references computed outside the patches
    swapped = _run(m, x, [0, 2, 1, 3, 4, 5, 6, 7, 8])
    with _patched([(b[3], shortcut_path(b[3]))]):  # a downsampling block: option-A shortcut remains
        assert torch.allclose(m(x), deleted, rtol=1e-5, atol=1e-6)
    with _patched([(b[1], b[2].forward), (b[2], b[1].forward)]):
        assert torch.allclose(m(x), swapped, rtol=1e-5, atol=1e-6)
    assert torch.equal(m(x), before)  # restored
    assert all("forward" not in blk.__dict__ for blk in b)


@torch.no_grad()
def test_lesion_study_kinds_and_counts():
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    res = lesion_study(pnnh.create_model("resnet20", width=0.25).eval(), x, y)
    assert [d["kind"] for d in res["delete"]] == ["shortcut"] * 9
    assert [s["blocks"] for s in res["swap"]] == [[0, 1], [1, 2], [4, 5], [7, 8]]
    assert res["path_lengths"]["n_blocks"] == 9
    plain = lesion_study(pnnh.create_model("plain20", width=0.25).eval(), x, y)
    kinds = [d["kind"] for d in plain["delete"]]
    assert kinds[3] == kinds[6] == "none" and kinds.count("identity") == 7  # shape-changing blocks stay
    assert plain["delete"][3]["acc"] is None and plain["path_lengths"]["n_blocks"] == 0
    pre = lesion_study(pnnh.create_model("preact_resnet20", width=0.25).eval(), x, y)
    assert all(d["acc"] is not None for d in pre["delete"])


def test_generic_sequential_of_blocks():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.Flatten(), nn.Linear(4 * 36, 3))).eval()
    assert block_shapes(model, torch.randn(2, 1, 6, 6))[:3] == [((1, 6, 6), (4, 6, 6)), ((4, 6, 6), (4, 6, 6)),
                                                                  ((4, 6, 6), (4, 6, 6))]
    res = lesion_study(model, torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))
    assert [d["kind"] for d in res["delete"]] == ["none", "identity", "identity", "none"]
    assert [s["blocks"] for s in res["swap"]] == [[1, 2]]


def test_path_lengths_are_binomial():
    d = path_length_distribution(27)
    assert math.isclose(sum(d["fraction"]), 1.0)
    assert d["fraction"][13] == math.comb(27, 13) / 2 ** 27 and d["mean"] == 13.5
    assert path_length_distribution(0)["fraction"] == [1.0]
