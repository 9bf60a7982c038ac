"""`pnnh models`: families checked, parameter counts cached, any valid CIFAR depth by name."""

import json

import pytest

import pnnh
from pnnh.cli import main
from pnnh.cli import models as models_cli


def run(args, capsys):
    try:
        main(args)
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_parameter_counts_are_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = json.loads(run(["models", "resnet2*", "--json"], capsys))
    assert [r["name"] for r in first] == ["resnet20"] and first[0]["params"] == 269_722 - 288  # 1 channel in
    assert json.loads((tmp_path / "pnnh" / "param-counts.json").read_text())["counts"] == {"resnet20": first[0]["params"]}

    def no_build(name):
        raise AssertionError(f"{name} built again")

    monkeypatch.setattr(models_cli, "_count_params", no_build)
    assert json.loads(run(["models", "resnet2*", "--json"], capsys)) == first
    table = run(["models", "resnet2*"], capsys).splitlines()
    assert table[0].startswith("name") and table[1].split()[:3] == ["resnet20", "resnet", "20"]


@pytest.mark.parametrize("name,blocks,bottleneck", [
    ("resnet14", 6, False), ("plain26", 12, False), ("preact_resnet38", 18, False), ("pnnh14", 6, False),
    ("llplain14", 6, False), ("resnet29", 9, True), ("pnnh29", 9, True),
])
def test_any_valid_cifar_depth_builds_by_name(name, blocks, bottleneck):
    info = pnnh.model_info(name)
    assert info.layout == "cifar" and info.depth == int("".join(filter(str.isdigit, name)))
    m = pnnh.create_model(name, width=0.25)
    assert len(m.blocks()) == blocks and m.pnnh_name == name
    assert name not in pnnh.list_models()  # built on request, not listed among the registered names
    if name.startswith("resnet") or name.startswith("plain"):
        assert (type(m.blocks()[0]).__name__ == "Bottleneck") == bottleneck
        assert (m.blocks()[0].shortcut is None) == name.startswith("plain")


def test_invalid_depth_is_unknown():
    for name in ("resnet15", "pnnh7", "plain2"):
        with pytest.raises(pnnh.errors.ModelNotFoundError, match=f"unknown model '{name}'"):
            pnnh.model_info(name)
