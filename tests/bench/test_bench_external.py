"""`pnnh bench` with models of other libraries (``timm:ARCH``, ``torchvision:ARCH``).

timm and torchvision do not import on the test machine, so stand-in modules with their entry
points (``timm.create_model``, ``torchvision.models.get_model``, ``list_models``) take their place
in ``sys.modules``: what is tested is that the bench builds and measures such a model beside a
registered one, and the errors a user gets.
"""

import sys
import types

import pytest
import torch.nn as nn

from pnnh.bench import BenchConfig, run_bench
from pnnh.bench.bench import build_external, is_external, parse_spec
from pnnh.errors import ConfigError

TINY = dict(batch_size=4, repeats=2, steps=1, warmup=0, threads=1, memory=False, peak=False)


def _tiny_net(num_classes: int, in_chans: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model(arch, pretrained, num_classes, in_chans, **kw):
        calls.append(dict(arch=arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kw))
        m = _tiny_net(num_classes, in_chans)
        m.pretrained_cfg = {"input_size": (in_chans, 12, 12)}
        return m

    mod = types.SimpleNamespace(create_model=create_model, list_models=lambda: ["tinynet", "resnet50"])
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls = []

    def get_model(arch, weights, num_classes, **kw):
        calls.append(dict(arch=arch, weights=weights, num_classes=num_classes, **kw))
        return _tiny_net(num_classes, 3)

    models = types.ModuleType("torchvision.models")
    models.get_model, models.list_models = get_model, lambda: ["resnet50"]
    tv = types.ModuleType("torchvision")
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_library_prefix_is_part_of_the_name_and_options_follow_it():
    ms = parse_spec("timm:resnet50:compile:bf16")
    assert (ms.name, ms.compile, ms.amp) == ("timm:resnet50", True, "bf16")
    assert is_external(ms.name) and not is_external(parse_spec("resnet50:compile").name)


def test_timm_model_is_measured_beside_a_registered_one(fake_timm):
    res = run_bench(BenchConfig(models=["resnet8", "timm:tinynet"], mode="both", model_kwargs={"width": 0.25},
                                input_size=16, **TINY))
    assert [(r["mode"], r["model"]) for r in res["rows"]] == [
        ("train", "resnet8"), ("train", "timm:tinynet"), ("infer", "resnet8"), ("infer", "timm:tinynet")]
    ext = res["rows"][1]
    assert ext["params"] == sum(p.numel() for p in _tiny_net(10, 1).parameters())
    assert ext["flops_per_img"] > 0 and ext["img_per_s"] > 0 and len(ext["rounds_s"]) == 2
    # built untrained, with the run's classes and channels; pnnh's -k options are not passed to timm
    assert {(c["arch"], c["pretrained"], c["num_classes"], c["in_chans"]) for c in fake_timm} == {
        ("tinynet", False, 10, 1)}
    assert all("width" not in c for c in fake_timm)


def test_first_external_model_sets_the_input_size(fake_timm):
    res = run_bench(BenchConfig(models=["timm:tinynet"], mode="infer", **TINY))
    assert res["config"]["input_size"] == 12  # its pretrained_cfg


def test_torchvision_model_gets_weights_none_and_needs_three_channels(fake_torchvision):
    net = build_external("torchvision:resnet50", num_classes=7, in_chans=3)
    assert fake_torchvision == [dict(arch="resnet50", weights=None, num_classes=7)]
    assert net[-1].out_features == 7
    with pytest.raises(ConfigError, match="3 input channels"):
        BenchConfig(models=["torchvision:resnet50"], in_chans=1).validate()


def test_unknown_architecture_names_close_matches(fake_timm):
    with pytest.raises(ConfigError, match="unknown timm model 'resnet5'.*resnet50"):
        BenchConfig(models=["resnet8", "timm:resnet5"]).validate()


def test_missing_library_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"timm models need the timm package.*pnnh\[timm\]"):
        BenchConfig(models=["timm:resnet50"]).validate()
