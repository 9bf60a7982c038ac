"""pnnh.load_model: a run's weights file rebuilds its model, with classes and normalisation; the run's
files (safetensors metadata) and its ONNX export record them."""

import json

import pytest
import torch

import pnnh
from pnnh.cli import cli
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


def test_run_files_and_their_onnx_export_record_classes_and_normalisation(fmnist_small, tmp_path):
    import onnx
    from click.testing import CliRunner
    from safetensors import safe_open

    out = tmp_path / "run"
    train(TrainConfig(model="resnet8", model_kwargs={"width": 0.5}, data_dir=str(fmnist_small), train_subset=128,
                      test_subset=64, batch_size=32, steps=4, threads=1, progress=False, out=str(out)))
    ds = load_dataset("fashion-mnist", "train", fmnist_small)
    want = {"data": "fashion-mnist", "classes": ds.classes, "mean": list(ds.mean), "std": list(ds.std),
            "input_size": [1, 28, 28], "model": "resnet8",
            "model_kwargs": {"num_classes": 10, "in_chans": 1, "width": 0.5, "img_size": 28}}
    assert ds.classes[0] == "T-shirt/top" and len(ds.mean) == len(ds.std) == 1
    for name in ("model.safetensors", "checkpoint.safetensors"):  # safetensors' own reader, no pnnh code
        with safe_open(str(out / name), "pt") as f:
            raw = f.metadata()
        assert {k: json.loads(raw[k]) for k in want} == want, name
        cfg = pnnh.load_model(out / name).pretrained_cfg
        assert cfg["label_names"] == cfg["classes"] == ds.classes and cfg["num_classes"] == 10
        assert cfg["mean"] == list(ds.mean) and cfg["std"] == list(ds.std) and cfg["data"] == "fashion-mnist"

    res = CliRunner().invoke(cli, ["export", "--checkpoint", str(out / "model.safetensors"),
                                   "--onnx", str(tmp_path / "r8.onnx")])
    assert res.exit_code == 0, res.output
    assert "metadata_props: model, 10 class names, mean/std of fashion-mnist" in res.output
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "r8.onnx")).metadata_props}
    assert {k: json.loads(props[k]) for k in want} == want
    # a model built without a run records its architecture only
    from pnnh.bench.export import export_onnx, read_onnx_metadata

    info = export_onnx(pnnh.create_model("plain8", width=0.25), tmp_path / "p8.onnx", check=False)
    assert read_onnx_metadata(tmp_path / "p8.onnx") == info["metadata"] == {
        "model": "plain8", "model_kwargs": {"num_classes": 10, "in_chans": 1, "width": 0.25}, "input_size": [1, 28, 28]}


def test_a_pnnh_vit_file_that_names_no_coder_loads_as_the_coder_its_weights_hold(tmp_path):
    """Files record the options a model was built with; a PNNH ViT saved without ``coder`` (the sub-layer
    design was once the default) rebuilds as the coder its weights hold, and loading it into the
    block-coder default names the option that fits."""
    from pnnh.train.checkpoint import load_weights, save_weights

    kw = dict(embed_dim=24, num_heads=2, patch_size=7)
    for coder in ("sublayer", "block"):
        model = pnnh.create_model("pnnh_vit_mini_d6", coder=coder, **kw).eval()
        del model.pnnh_kwargs["coder"]
        save_weights(tmp_path / f"{coder}.safetensors", model)
        loaded = pnnh.load_model(tmp_path / f"{coder}.safetensors")
        assert loaded.coder == coder
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(pnnh.CheckpointError, match="sub-layer PNNH ViT: build the model with coder='sublayer'"):
        load_weights(tmp_path / "sublayer.safetensors", pnnh.create_model("pnnh_vit_mini_d6", **kw))


def test_a_pnnh_vit_loads_with_the_coder_path_its_weights_hold(tmp_path):
    from pnnh.train.checkpoint import load_weights, save_weights

    kw = dict(embed_dim=24, num_heads=2, patch_size=7)
    x = torch.randn(2, 1, 28, 28)
    for path_param in ("param", "init"):
        model = pnnh.create_model("pnnh_vit_mini_d6", path_param=path_param, **kw).eval()
        with torch.no_grad():
            model.blocks()[0].coder.enc.add_(0.1)  # off the identity, so a wrong path would show
        save_weights(tmp_path / f"{path_param}.safetensors", model)
        model.pnnh_kwargs.pop("path_param")  # a file that relied on the default of its day
        save_weights(tmp_path / f"{path_param}-default.safetensors", model)
        for name in (path_param, f"{path_param}-default"):
            loaded = pnnh.load_model(tmp_path / f"{name}.safetensors")
            assert loaded.blocks()[0].coder.path_param == path_param
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), model(x))
    assert pnnh.create_model("pnnh_vit_mini_d6", **kw).blocks()[0].coder.path_param == "param"
    with pytest.raises(pnnh.CheckpointError, match="path_param='param'"):
        load_weights(tmp_path / "param.safetensors", pnnh.create_model("pnnh_vit_mini_d6", path_param="init", **kw))
    with pytest.raises(pnnh.CheckpointError, match="path_param='init'"):
        load_weights(tmp_path / "init.safetensors", pnnh.create_model("pnnh_vit_mini_d6", **kw))
