"""pnnh.load_model: a run's weights file rebuilds its model, with classes and normalisation."""

import json

import pytest
import torch

import pnnh
from pnnh.data import load_dataset
from pnnh.train import TrainConfig, train


def test_load_model_rebuilds_a_trained_run(fmnist_small, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(model="pnnh8", model_kwargs={"width": 0.5}, data_dir=str(fmnist_small), train_subset=256,
                      test_subset=128, batch_size=32, steps=8, threads=1, progress=False, out=str(out)))
    summary = json.loads((out / "summary.json").read_text())
    model = pnnh.load_model(out / "model.safetensors")
    test = load_dataset("fashion-mnist", "test", fmnist_small).subset(128)
    cfg = model.default_cfg
    assert model.pnnh_name == "pnnh8" and not model.training
    assert cfg["classes"] == test.classes and len(cfg["classes"]) == 10 and cfg["input_size"] == [1, 28, 28]
    mean, std = torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        pred = model((test.images.float() / 255 - mean) / std).argmax(1)
    assert (pred == test.labels).float().mean().item() == pytest.approx(summary["test_acc"], abs=1 / 128)
    again = pnnh.load_model(out / "checkpoint.safetensors")  # a checkpoint holds the same weights
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_model_refuses_a_file_without_a_model(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"model.x": torch.zeros(1)}, str(path), metadata={"format": "pnnh-checkpoint-v1", "kind": "weights"})
    with pytest.raises(pnnh.CheckpointError, match="does not record which model it holds"):
        pnnh.load_model(path)
