"""Exact resume where it is hardest: random layers (drop-path, dropout), mixed precision, divergence.

A resumed run must end with the same weights, bit for bit, as one that never stopped. Models with
random layers draw masks from the global generator, so this holds only if the checkpoint restores
the generator state; an fp16 run holds a loss scale that changes during training (GradScaler), so
it holds only if the checkpoint restores the scaler too.
"""

import math

import re

import pytest
import torch
from safetensors.torch import load_file

import pnnh
from pnnh.errors import DivergenceError
from pnnh.train import TrainConfig, train
from pnnh.train.checkpoint import load_checkpoint, read_metadata
from pnnh.train.engine import build_optimizer

STEPS_PER_EPOCH = 4  # 256 images, batch 64


def _cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    base = dict(data="fashion-mnist", data_dir=str(data_dir), train_subset=256, test_subset=64, batch_size=64,
                eval_batch_size=64, epochs=2, lr=0.05, progress=False, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def _weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    return load_file(f"{cfg.out}/model.safetensors")


def _interrupted(cfg: TrainConfig, at_step: int) -> dict:
    def crash(step):
        if step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=crash)
    return train(cfg.replace(resume=True))


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"


RANDOM_LAYERS = {
    "drop_path_resnet": ("droppath_resnet20", {"width": 0.25}),
    "dropout": ("plain20", {"width": 0.5, "drop_rate": 0.5}),
    "vit_drop_path": ("pnnh_vit_mini_d6", {"embed_dim": 24, "num_heads": 2, "patch_size": 7, "drop_path_rate": 0.3,
                                           "drop_rate": 0.3}),
}


@pytest.mark.parametrize("kind", list(RANDOM_LAYERS))
def test_resume_is_bit_identical_with_random_layers(kind, tmp_path, fmnist_small):
    model, kwargs = RANDOM_LAYERS[kind]
    full = _cfg(tmp_path / "a", fmnist_small, model=model, model_kwargs=kwargs)
    cut = _cfg(tmp_path / "b", fmnist_small, model=model, model_kwargs=kwargs)
    s_full = train(full)
    s_cut = _interrupted(cut, STEPS_PER_EPOCH + 2)  # mid-way through epoch 2, after the epoch-1 checkpoint
    _assert_bit_identical(_weights(full), _weights(cut))
    assert s_cut["curve"] == s_full["curve"] and s_cut["test_loss"] == s_full["test_loss"]


class _GrowEveryStep(torch.amp.GradScaler):
    """A GradScaler that doubles its scale after every finite step, so within a few steps it
    overflows, skips a step and backs off: its state changes during the test's short run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "growth_interval": 1})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_resume_is_bit_identical(amp, tmp_path, fmnist_small, monkeypatch):
    if amp == "fp16":
        monkeypatch.setattr(torch.amp, "GradScaler", _GrowEveryStep)
    kw = dict(model="plain8", model_kwargs={"width": 0.25}, amp=amp, channels_last=False, log_every=1)
    full = _cfg(tmp_path / "a", fmnist_small, **kw)
    cut = _cfg(tmp_path / "b", fmnist_small, **kw)
    s_full = train(full)
    s_cut = _interrupted(cut, STEPS_PER_EPOCH + 2)
    _assert_bit_identical(_weights(full), _weights(cut))
    assert s_cut["curve"] == s_full["curve"]
    scaler = read_metadata(tmp_path / "a/run/checkpoint.safetensors")["state"]["scaler"]
    if amp == "fp16":  # 2 epochs of doubling from 2^16 overflowed: the scale moved and was saved
        assert scaler["scale"] != 65536.0 and math.log2(scaler["scale"]).is_integer()
    else:
        assert scaler is None  # bf16 needs no loss scaling


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, fmnist_small):
    cfg = _cfg(tmp_path, fmnist_small, model="plain20", model_kwargs={"width": 0.5}, train_subset=1024, epochs=3,
               lr=1e6, schedule="constant", checkpoint_every=2)
    with pytest.raises(DivergenceError, match="last good checkpoint is kept") as e:
        train(cfg)
    ckpt = tmp_path / "run/checkpoint.safetensors"
    state = read_metadata(ckpt)["state"]
    diverged_at = int(re.search(r"\bstep (\d+)", str(e.value))[1])
    assert 0 < state["step"] < diverged_at  # a real checkpoint came first
    tensors = load_file(str(ckpt))
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"the kept checkpoint holds non-finite values: {bad[:3]}"
    model = pnnh.create_model("plain20", width=0.5)
    load_checkpoint(ckpt, model, build_optimizer(model, cfg))
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
