"""The training engine on real Fashion-MNIST (small subsets to stay fast)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pnnh.errors import CheckpointError, ConfigError, DivergenceError
from pnnh.train import TrainConfig, train
from pnnh.train.engine import lr_at


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="resnet20", data="fashion-mnist", train_subset=1024, test_subset=256, batch_size=64,
                epochs=2, lr=0.1, progress=False, out=str(tmp_path / "run"), model_kwargs={"width": 0.5})
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_outputs_and_learns(tmp_path, fmnist_dir):
    s = train(small_cfg(tmp_path, epochs=3))
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "params", "test_acc", "train_img_per_s", "epochs", "steps", "seed", "wall_s"):
        assert key in summary
    assert summary["steps"] == 3 * 16 and summary["epochs"] == 3
    assert 0 <= summary["test_acc"] <= 1 and summary["test_acc"] > 0.3  # 10 classes: chance is 0.1
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert s["test_acc"] == summary["test_acc"]


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, fmnist_dir):
    full = train(small_cfg(tmp_path / "a"))
    steps_per_epoch = 16

    def crash(step):
        if step == steps_per_epoch + 3:  # mid-way through epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    cfg = small_cfg(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=crash)
    resumed = train(cfg.replace(resume=True))
    wa = load_file(str(tmp_path / "a/run/model.safetensors"))
    wb = load_file(str(tmp_path / "b/run/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    assert resumed["test_acc"] == full["test_acc"] and resumed["test_loss"] == full["test_loss"]
    ma = (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()
    keys = ("epoch", "step", "train_loss", "train_acc", "test_acc", "test_loss")
    assert [{k: json.loads(l)[k] for k in keys} for l in ma] == [{k: json.loads(l)[k] for k in keys} for l in mb]


def test_mid_epoch_checkpoint_resume_is_exact(tmp_path, fmnist_dir):
    full = train(small_cfg(tmp_path / "a", epochs=1, checkpoint_every=3))

    def crash(step):
        if step == 5:  # after the step-3 checkpoint
            raise KeyboardInterrupt

    cfg = small_cfg(tmp_path / "b", epochs=1, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=crash)
    resumed = train(cfg.replace(resume=True))
    assert resumed["test_loss"] == full["test_loss"]


def test_existing_run_needs_resume_flag_and_matching_config(tmp_path, fmnist_dir):
    cfg = small_cfg(tmp_path, epochs=1)
    train(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    with pytest.raises(ConfigError, match="lr"):
        train(cfg.replace(resume=True, lr=0.2))
    again = train(cfg.replace(resume=True))  # finished run: nothing to redo
    assert again["steps"] == 16


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, fmnist_dir):
    cfg = small_cfg(tmp_path, epochs=3, lr=1e6, optimizer="sgd", schedule="constant", model="plain20")
    with pytest.raises(DivergenceError) as e:
        train(cfg)
    msg = str(e.value)
    assert "diverged" in msg and "step" in msg and "lr" in msg and "last finite loss" in msg
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "diverged"


def test_steps_budget_and_schedule_shapes(tmp_path):
    cfg = TrainConfig(steps=100, lr=1.0, schedule="onecycle", warmup=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 19
    assert lrs[-1] < 0.02 and lrs[0] == pytest.approx(0.04 + 0.96 / 20)
    cos = TrainConfig(steps=100, lr=1.0, schedule="cosine", warmup=0.0)
    assert lr_at(0, 100, cos) == pytest.approx(1.0) and lr_at(50, 100, cos) == pytest.approx(0.5)


def test_no_weight_decay_on_norms_and_biases():
    import pnnh
    from pnnh.train.engine import param_groups

    m = pnnh.create_model("resnet20")
    decay, no_decay = param_groups(m, 5e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and len(no_decay["params"]) > 0


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs must be a positive"),
    (dict(epochs=None, steps=-5), "steps must be a positive"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=float("nan")), "lr must be a finite"),
    (dict(epochs=2, steps=10), "exactly one of epochs or steps"),
    (dict(batch_size="64"), "batch_size must be of type int"),
    (dict(optimizer="rmsprop"), "optimizer"),
])
def test_bad_config_values(bad, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        small_cfg(tmp_path, **bad).validate()


def test_unknown_config_key_suggests():
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        TrainConfig.from_dict({"batchsize": 3})


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, fmnist_dir, capsys, monkeypatch, native):
    """bf16 autocast is emulated on an AVX2-only CPU (many times slower than fp32): training says so."""
    import pnnh.train.device as device

    assert device.cpu_bf16_native() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # this machine's answer
    monkeypatch.setattr(device, "cpu_bf16_native", lambda: native)
    train(small_cfg(tmp_path, amp="bf16", steps=2, epochs=None, train_subset=256, model="resnet8"))
    warned = "warning: amp bf16 on a CPU without native bf16 support" in capsys.readouterr().err
    assert warned is not native
