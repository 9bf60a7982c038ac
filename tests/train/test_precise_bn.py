"""Precise BN: BatchNorm running statistics re-estimated with the final weights."""

import json

import torch

import pnnh
from pnnh.data import load_dataset
from pnnh.train import TrainConfig, train
from pnnh.train.engine import precise_bn


def test_running_stats_become_the_average_of_batch_stats(fmnist_small):
    ds = load_dataset("fashion-mnist", "train", fmnist_small).subset(256)
    model = pnnh.create_model("resnet8", width=0.5)
    bn = model.stem[1]
    inputs = []
    hook = bn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    rng = torch.get_rng_state()
    used = precise_bn(model, ds, TrainConfig(batch_size=64, precise_bn=200, channels_last=False), torch.device("cpu"))
    hook.remove()
    assert used == 200 and [len(x) for x in inputs] == [64, 64, 64, 8]  # the first 200 images, in order
    mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_training_records_precise_bn_and_can_turn_it_off(fmnist_small, tmp_path):
    base = dict(model="resnet8", model_kwargs={"width": 0.25}, data_dir=str(fmnist_small), train_subset=128,
                test_subset=64, batch_size=32, steps=4, threads=1, progress=False)
    on = train(TrainConfig(**base, out=str(tmp_path / "on")))
    off = train(TrainConfig(**base, precise_bn=0, out=str(tmp_path / "off")))
    assert on["precise_bn"] == 128 and off["precise_bn"] == 0  # capped at the training set's size
    a = pnnh.load_model(tmp_path / "on" / "model.safetensors").state_dict()
    b = pnnh.load_model(tmp_path / "off" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)  # same weights
    assert not torch.equal(a["stem.1.running_var"], b["stem.1.running_var"])  # other statistics
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["precise_bn"] == 128
