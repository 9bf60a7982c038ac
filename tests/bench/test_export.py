"""`pnnh export`: ONNX files that onnxruntime runs and that agree with PyTorch.

onnx and onnxruntime are the optional extra ``pnnh[export]``, part of the test setup: these tests
fail (not skip) without them.
"""

import importlib.util

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pnnh
from pnnh.bench import export as export_mod
from pnnh.bench.export import ExportError, export_onnx, run_onnx
from pnnh.cli import cli
from pnnh.train import save_weights


def test_export_extra_is_installed():
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    assert not missing, f"install the test setup's export extra: pip install 'pnnh[export]' (missing {missing})"


def _trained_like(name, **kw):
    model = pnnh.create_model(name, width=0.5, **kw)
    with torch.no_grad():  # BatchNorm statistics of real activations, as after training
        model.train()(torch.randn(32, model.default_cfg["input_size"][0], *model.default_cfg["input_size"][1:]))
    return model.eval()


@pytest.mark.parametrize("name,fused", [("plain20", True), ("resnet20", True), ("resnet20", False)])
def test_export_matches_pytorch_in_onnxruntime(tmp_path, name, fused):
    import onnx

    model = _trained_like(name)
    info = export_onnx(model, tmp_path / "m.onnx", fused=fused)
    assert info["checked"] and info["max_abs_diff"] < 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    ops = {n.op_type for n in proto.graph.node}
    if fused:
        assert "BatchNormalization" not in ops
        assert ("Add" in ops) == name.startswith("resnet")  # a plain net is a pure chain
    x = torch.randn(3, 1, 28, 28)  # the batch dimension is dynamic
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x.numpy()), model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_cli_exports_a_checkpoint(tmp_path):
    model = _trained_like("plain20", in_chans=3, img_size=32)
    save_weights(tmp_path / "w.safetensors", model)
    res = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "w.safetensors"), "--onnx",
                                   str(tmp_path / "out/p.onnx")])
    assert res.exit_code == 0, res.output
    assert "parity ok" in res.stdout and "1x3x32x32" in res.stdout
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "out/p.onnx", x.numpy()), model(x).numpy(), atol=1e-4, rtol=1e-4)
    res = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "w.safetensors"), "--model", "resnet20",
                                   "--onnx", str(tmp_path / "x.onnx")])
    assert res.exit_code != 0 and "holds plain20" in str(res.exception)


def test_a_disagreeing_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "run_onnx", lambda path, x: run_onnx(path, x) + 1e-2)
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(_trained_like("plain20"), tmp_path / "m.onnx")


def test_missing_onnxruntime_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "onnxruntime_available", lambda: False)
    with pytest.raises(ExportError, match=r"pnnh\[export\]"):
        export_onnx(_trained_like("plain20"), tmp_path / "m.onnx")


@pytest.mark.parametrize("name,kw", [("pnnh20", {}), ("pnnh20", {"path_param": "init"}), ("llplain20", {}),
                                     ("pnnh_vit_mini_d6", {"embed_dim": 24, "num_heads": 2}),
                                     ("pnnh_vit_mini_d6", {"embed_dim": 24, "num_heads": 2, "coder": "sublayer"}),
                                     ("dirac_vit_mini_d6", {"embed_dim": 24, "num_heads": 2}),
                                     ("plain_vit_mini_d6", {"embed_dim": 24, "num_heads": 2})])
def test_pnnh_looks_linear_and_vit_models_export_with_parity(tmp_path, name, kw):
    import onnx

    model = pnnh.create_model(name, **kw).eval() if "vit" in name else _trained_like(name, **kw)
    with torch.no_grad():  # a classifier of trained size (small inits give outputs near zero)
        model.get_classifier().weight.normal_()
        model.get_classifier().bias.normal_()
    info = export_onnx(model, tmp_path / "m.onnx")
    assert info["checked"] and info["max_abs_diff"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    if "vit" not in name:  # deployed: BN folded, no residual add, a conv chain
        assert "BatchNormalization" not in ops and "Add" not in ops and "Conv" in ops
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(tmp_path / "m.onnx", x.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ref).max() > 1e-2  # outputs of real size, so the tolerance means something
