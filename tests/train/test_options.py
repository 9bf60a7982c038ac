"""Each training option has the effect it promises (real Fashion-MNIST, tiny models, few steps)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import pnnh
from pnnh.data import InMemoryLoader, load_dataset
from pnnh.train import TrainConfig, train


def _cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    base = dict(model="plain8", model_kwargs={"width": 0.5}, data="fashion-mnist", data_dir=str(data_dir),
                train_subset=256, test_subset=64, batch_size=64, eval_batch_size=64, steps=4, lr=0.05,
                progress=False, log_every=1, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def _initial_model(cfg: TrainConfig):
    torch.manual_seed(cfg.seed)  # as the engine does, right before it builds the model
    return pnnh.create_model(cfg.model, num_classes=10, in_chans=1, img_size=28, **cfg.model_kwargs)


def _first_batch(cfg: TrainConfig):
    ds = load_dataset(cfg.data, "train", cfg.data_dir).subset(cfg.train_subset)
    loader = InMemoryLoader(ds, cfg.batch_size, train=True, seed=cfg.seed, channels_last=cfg.channels_last)
    loader.augment = False  # runs shorter than 10 epochs do not augment
    loader.set_epoch(0)
    return next(iter(loader.iter_from(0)))


def _step_norm(cfg: TrainConfig) -> float:
    """Norm of the change of all parameters over a one-step run."""
    before = dict(_initial_model(cfg).named_parameters())
    after = load_file(f"{cfg.out}/model.safetensors")
    return math.sqrt(sum((after["model." + k] - p.detach()).double().square().sum().item() for k, p in before.items()))


def test_grad_clip_bounds_the_gradient_norm(tmp_path, fmnist_small):
    # plain SGD, one step: the parameters move by lr * gradient, so the step's norm is lr * |g|
    sgd = dict(steps=1, lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant")
    clipped = _cfg(tmp_path / "a", fmnist_small, grad_clip=0.02, **sgd)
    free = _cfg(tmp_path / "b", fmnist_small, **sgd)
    train(clipped)
    train(free)
    assert _step_norm(clipped) == pytest.approx(0.02, rel=1e-4)
    assert _step_norm(free) > 0.1  # the unclipped gradient is five times the bound and more


def test_label_smoothing_changes_the_loss_by_the_expected_amount(tmp_path, fmnist_small):
    eps = 0.9  # at init the logits are nearly uniform: a large eps makes the term visible
    cfg = _cfg(tmp_path, fmnist_small, label_smoothing=eps, steps=1)
    first_loss = train(cfg)["curve"][0][1]  # the loss of step 0, before any update
    model = _initial_model(cfg).to(memory_format=torch.channels_last).train()
    x, y = _first_batch(cfg)
    with torch.no_grad():
        logp = F.log_softmax(model(x).float(), 1)
    nll = -logp.gather(1, y[:, None]).mean().item()
    uniform = -logp.mean(1).mean().item()  # cross-entropy against the uniform distribution
    assert first_loss == pytest.approx((1 - eps) * nll + eps * uniform, abs=2e-5)
    assert abs(first_loss - nll) > 10 * 2e-5  # the smoothing term is visible at this tolerance


def test_eval_every_evaluates_on_those_epochs_and_the_last(tmp_path, fmnist_small):
    cfg = _cfg(tmp_path, fmnist_small, steps=None, epochs=3, eval_every=2)
    train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert [l["test_acc"] is not None for l in lines] == [False, True, True]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_in_reduced_precision_and_tracks_fp32(amp, tmp_path, fmnist_small):
    kw = dict(model_kwargs={"width": 0.25}, channels_last=False)
    ref = train(_cfg(tmp_path / "fp32", fmnist_small, **kw))["curve"]
    low = train(_cfg(tmp_path / amp, fmnist_small, amp=amp, **kw))["curve"]
    diffs = [abs(a[1] - b[1]) for a, b in zip(ref, low)]
    assert len(diffs) == 4 and max(diffs) < 0.05  # the same training, to reduced-precision accuracy
    assert max(diffs) > 0  # but not bit for bit: forward and backward ran in reduced precision


def _tiny_net(num_classes=10):
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(16, num_classes))


def test_compile_gives_the_same_loss_curve(tmp_path, fmnist_small, monkeypatch):
    # inductor generates and builds C++ kernels on CPU: a tiny net keeps that to a few kernels, built
    # in this process (no pool of compile workers to start)
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    kw = dict(model=_tiny_net, model_kwargs={}, steps=3, channels_last=False, lr=0.5)
    eager = train(_cfg(tmp_path / "eager", fmnist_small, **kw))
    compiled = train(_cfg(tmp_path / "compiled", fmnist_small, compile=True, **kw))
    assert [s for s, _ in compiled["curve"]] == [1, 2, 3]
    for (_, a), (_, b) in zip(eager["curve"], compiled["curve"]):
        assert b == pytest.approx(a, abs=1e-4)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)
    assert eager["curve"][0][1] != eager["curve"][-1][1]  # the steps moved the loss: the curves say something
