"""channels_last is the engine default (measured faster, docs/benchmarks.md) and changes no results."""

import torch
from safetensors.torch import load_file

from pnnh.train import TrainConfig, train


def test_channels_last_is_the_default_and_trains_the_same_model(tmp_path, fmnist_dir):
    assert TrainConfig().channels_last is True
    base = dict(model="resnet20", data="fashion-mnist", train_subset=256, test_subset=128, batch_size=64, steps=4,
                progress=False, model_kwargs={"width": 0.5},
                precise_bn=0)  # the memory formats' training paths compared (precise BN re-estimates the statistics)
    nhwc = train(TrainConfig(**base, out=str(tmp_path / "nhwc")))
    nchw = train(TrainConfig(**base, channels_last=False, out=str(tmp_path / "nchw")))
    assert abs(nhwc["test_loss"] - nchw["test_loss"]) < 1e-3
    wa, wb = load_file(str(tmp_path / "nhwc/model.safetensors")), load_file(str(tmp_path / "nchw/model.safetensors"))
    for k in wa:  # the memory formats differ only in the order of float additions (max |diff| seen: 1e-3)
        torch.testing.assert_close(wa[k].double(), wb[k].double(), rtol=1e-2, atol=5e-4, msg=k)
