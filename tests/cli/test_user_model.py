"""The user's own model in every tool: `--model file.py:factory`, TrainConfig(model=module or factory),
pnnh.analysis.diagnose and pnnh.deploy on any nn.Module."""

import json
import textwrap

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import pnnh
from pnnh.analysis import diagnose
from pnnh.cli import cli, main
from pnnh.errors import ConfigError
from pnnh.models import create_model, model_slug
from pnnh.train import TrainConfig, train

MODEL_FILE = '''
import torch.nn as nn


class SmallNet(nn.Module):
    """conv-BN-ReLU stages in one Sequential; blocks() returns slices of it (new modules)."""

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        layers = [nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def blocks(self):
        return [self.features[i:i + 3] for i in range(0, len(self.features), 3)]

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x).flatten(1)
        return self.fc(x)


class NoBlocks(SmallNet):
    blocks = None


def build(width=8, num_classes=10):
    return SmallNet(width, num_classes)


def build_plain(num_classes=10):
    return NoBlocks(8, num_classes)
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_FILE)
    return path


def test_create_model_takes_a_file_spec_with_options(model_file):
    m = create_model(f"{model_file}:build", num_classes=4, width=6)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 4) and m.features[0].out_channels == 6
    assert m.pnnh_name == f"{model_file}:build" and model_slug(m.pnnh_name) == "my_model-build"
    with pytest.raises(ConfigError, match="does not take"):
        create_model(f"{model_file}:build", depth=3)
    with pytest.raises(ConfigError, match="has no callable 'nope'.*build"):
        create_model(f"{model_file}:nope")
    with pytest.raises(ConfigError, match="model file not found"):
        create_model(f"{model_file.parent / 'missing.py'}:build")


def test_diagnose_cli_on_a_model_file(model_file, fmnist_small, tmp_path, capsys):
    main(["diagnose", "--model", f"{model_file}:build", "--images", "32", "--no-gradients", "--no-plots",
          "--data-dir", str(fmnist_small), "--out", str(tmp_path / "d")])
    r = json.loads((tmp_path / "d/diagnostics.json").read_text())
    # blocks() slices the Sequential: every slice is probed (stem + 4 blocks), none is lost
    assert r["probe_mode"] == "blocks" and [p["depth"] for p in r["dissipation"]["probes"]] == [0, 1, 2, 3, 4]
    assert r["model"] == f"{model_file}:build"
    assert "no probe fired" not in capsys.readouterr().out


def test_diagnose_api_probes_every_activation_without_blocks(model_file):
    m = create_model(f"{model_file}:build_plain")
    x = torch.randn(24, 1, 28, 28)
    r = diagnose(m, x, torch.randint(0, 10, (24,)), gradients=False, theory=False, n_shuffles=2)
    assert r["probe_mode"] == "layers" and len(r["dissipation"]["probes"]) == 4
    assert r["lesion"]["skipped"] == "the model has no blocks"
    with pytest.raises(ConfigError, match="did you mean n_shuffles"):
        diagnose(m, x, n_shuffle=2)


def test_train_config_takes_a_module_or_a_factory(model_file, fmnist_small, tmp_path):
    from pnnh.models import load_factory

    factory = load_factory(f"{model_file}:build")
    base = dict(data="fashion-mnist", data_dir=str(fmnist_small), train_subset=128, test_subset=64, batch_size=64,
                eval_batch_size=64, steps=2, progress=False)
    module = factory(width=4)
    before = module.fc.weight.detach().clone()
    s = train(TrainConfig(model=module, out=str(tmp_path / "m"), **base))
    assert s["model"].endswith("SmallNet") and not torch.equal(module.fc.weight, before)  # trained in place
    s = train(TrainConfig(model=factory, model_kwargs={"width": 4}, out=str(tmp_path / "f"), **base))
    assert s["params"] == sum(p.numel() for p in module.parameters())
    with pytest.raises(ConfigError, match=r"model must be .* got int$"):
        TrainConfig(model=3, steps=1).validate()
    with pytest.raises(ConfigError, match="must return \\(batch, 10\\) logits"):
        train(TrainConfig(model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), **base))


def test_train_compare_bench_export_take_a_model_file(model_file, fmnist_small, tmp_path):
    spec = f"{model_file}:build"
    res = CliRunner().invoke(cli, ["train", "--model", spec, "-k", "width=4", "--steps", "2", "--train-subset", "128",
                                   "--test-subset", "64", "--data-dir", str(fmnist_small), "--no-progress",
                                   "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t/summary.json").read_text())["model"] == spec
    res = CliRunner().invoke(cli, ["compare", "--models", f"plain8,{spec}", "--steps", "2", "--data-dir",
                                   str(fmnist_small), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c/my_model-build/summary.json").exists()
    res = CliRunner().invoke(cli, ["bench", "--models", f"{spec},{spec}:fused", "--mode", "infer", "--input-size",
                                   "28", "--repeats", "1", "--steps", "1", "--warmup", "0", "--no-peak", "--no-memory",
                                   "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["model"] for r in rows] == [spec, f"{spec}:fused"] and all(r["img_per_s"] > 0 for r in rows)
    res = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "t/model.safetensors"), "--input-size", "28",
                                   "--onnx", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "parity ok" in res.stdout


def test_deploy_takes_any_module(model_file):
    m = create_model(f"{model_file}:build").eval()
    with torch.no_grad():
        m.features[1].running_var.uniform_(0.5, 2)
        x = torch.randn(3, 1, 28, 28)
        d = pnnh.deploy(m)
        torch.testing.assert_close(d(x), m(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in d.modules())
