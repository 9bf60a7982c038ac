"""examples/custom_pnnh_cnn.py runs end to end at a tiny budget (engine API and bare loop)."""

import importlib.util
from pathlib import Path

import torch

from pnnh.analysis.structure import is_plain

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_pnnh_cnn.py"


def test_the_example_builds_a_plain_pnnh_cnn_and_trains_it_with_the_engine_and_a_bare_loop(fmnist_small, tmp_path):
    spec = importlib.util.spec_from_file_location("custom_pnnh_cnn_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # registers example_pnnh11
    net = example.SmallPNNHNet()
    assert is_plain(net, torch.randn(2, 1, 28, 28))
    result = example.main(["--steps", "12", "--data-dir", str(fmnist_small), "--train-subset", "512",
                           "--out", str(tmp_path / "run")])
    engine = result["engine"]
    assert engine["model"] == "example_pnnh11" and engine["steps"] == 12
    assert engine["params"] == sum(p.numel() for p in net.parameters())
    assert (tmp_path / "run" / "model.safetensors").exists()
    losses = result["bare_loop_losses"]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert 0.0 <= result["bare_loop_acc"] <= 1.0
