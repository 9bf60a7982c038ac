"""run_diagnostics end to end, the plots, and the `pnnh diagnose` command."""

import json

import pytest
import torch

import pnnh
from pnnh.analysis import diagnose, plot_comparison, plot_diagnostics, summarize
from pnnh.analysis.diagnose import load_images
from pnnh.cli import main
from pnnh.models import model_slug
from pnnh.train.checkpoint import save_weights


@pytest.fixture(scope="module")
def images():
    from pathlib import Path
    import os

    d = Path(os.environ.get("PNNH_DATA", "/usr/share/datasets/fashion-mnist"))
    x, y, _ = load_images("fashion-mnist", 128, str(d) if d.is_dir() else None)
    return x, y


@pytest.fixture(scope="module")
def results(images):
    x, y = images
    out = {}
    for name in ("plain20", "resnet20"):
        torch.manual_seed(0)
        out[name] = diagnose(pnnh.create_model(name, width=0.5), x, y, grad_lines=2, grad_points=6,
                             grad_max_probes=4, theory_depth=3, n_shuffles=6)
    return out


def test_result_is_complete_and_json_serialisable(results):
    r = results["resnet20"]
    json.loads(json.dumps(r))
    assert r["probe_mode"] == "blocks" and r["norm_stats"] == "batch" and r["images"] == 128
    probes = r["dissipation"]["probes"]
    for name in ("cka", "cka_debiased", "ridge_r2"):
        m = r["dissipation"]["metrics"][name]
        assert len(m["value"]) == len(m["floor_upper"]) == len(probes) == 10
    assert len(r["surviving"]["layers"]) == 19 and len(r["signal"]["blocks"]) == 9
    assert all(b["branch_var"] is not None for b in r["signal"]["blocks"])
    assert all(b["branch_var"] is None for b in results["plain20"]["signal"]["blocks"])
    assert r["lesion"]["skipped"].startswith("untrained")
    assert r["path_lengths"]["n_blocks"] == 9 and results["plain20"]["path_lengths"]["n_blocks"] == 0
    assert "dissipat" in summarize(r) or "above the noise floor" in summarize(r)


def test_residual_keeps_more_of_the_input_than_plain(results):
    p, r = results["plain20"], results["resnet20"]
    for name in ("ridge_r2", "cka_debiased"):
        pv, rv = p["dissipation"]["metrics"][name]["value"], r["dissipation"]["metrics"][name]["value"]
        assert rv[-1] > pv[-1] + 0.2  # same depth (19) at the last probe
        assert pv[0] > 0.8 and rv[0] > 0.8  # the stem still carries the input
    # the residual stream's block-output variance grows with depth within a stage (Brock et al.)
    var = [b["avg_var"] for b in r["signal"]["blocks"]]
    assert var[2] > var[0]


def test_model_is_not_modified(images):
    x, y = images
    m = pnnh.create_model("resnet20", width=0.25)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    diagnose(m, x[:32], y[:32], gradients=False, theory=False, lesion=True)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.training  # a fresh model's mode is left as it was


def test_generic_sequential_model(images):
    x, _ = images
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU()),
                                *[torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                                      torch.nn.ReLU()) for _ in range(3)])
    r = diagnose(model, x[:48], None, n_shuffles=4, grad_lines=2, grad_points=4, theory=False)
    assert [p["depth"] for p in r["dissipation"]["probes"]] == [0, 1, 2, 3, 4]
    assert r["lesion"]["skipped"] == "no labels"


def test_plots_are_written(results, tmp_path):
    paths = plot_diagnostics(results["resnet20"], tmp_path / "r")
    assert {p.name for p in paths} == {"dissipation.png", "surviving.png", "gradients.png", "signal.png"}
    assert all(p.stat().st_size > 5000 for p in paths)
    (comp,) = plot_comparison(results, tmp_path)
    assert comp.name == "comparison.png" and comp.stat().st_size > 5000


def test_cli_fresh_model_and_checkpoint(fmnist_dir, tmp_path, capsys):
    main(["diagnose", "--model", "plain20", "-k", "width=0.25", "--images", "48", "--no-gradients",
          "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "fresh"), "--no-plots"])
    r = json.loads((tmp_path / "fresh" / "diagnostics.json").read_text())
    assert r["model"] == "plain20" and r["probe_mode"] == "layers" and r["data"]["images"] == 48
    ckpt = tmp_path / "w.safetensors"
    save_weights(ckpt, pnnh.create_model("resnet20", width=0.25))
    main(["diagnose", "--checkpoint", str(ckpt), "--images", "32", "--no-gradients", "--lesion",
          "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "ck"), "--no-plots"])
    r = json.loads((tmp_path / "ck" / "diagnostics.json").read_text())
    assert r["model"] == "resnet20" and r["model_kwargs"]["width"] == 0.25
    assert len(r["lesion"]["delete"]) == 9 and r["checkpoint"] == str(ckpt)
    assert "resnet20" in capsys.readouterr().out
    # a checkpoint is trained: the lesion study runs by default, also without BatchNorm to show it
    vit = tmp_path / "vit.safetensors"
    save_weights(vit, pnnh.create_model("vit_mini_d6"))
    main(["diagnose", "--checkpoint", str(vit), "--images", "32", "--no-gradients",
          "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "vit"), "--no-plots"])
    r = json.loads((tmp_path / "vit" / "diagnostics.json").read_text())
    assert r["norm_stats"] == "none" and len(r["lesion"]["delete"]) == 6
    # several trained models side by side; the same model twice is labelled by its run folder
    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        save_weights(tmp_path / f"s{seed}" / "model.safetensors", pnnh.create_model("vit_mini_d6"))
    main(["diagnose", "--checkpoint", str(vit), "--checkpoint", str(tmp_path / "s0" / "model.safetensors"),
          "--checkpoint", str(tmp_path / "s1" / "model.safetensors"), "--images", "32", "--no-gradients",
          "--lesion-images", "16", "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "many")])
    written = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert written == sorted(["comparison.png", "vit_mini_d6_s0", "vit_mini_d6_s1", model_slug(f"vit_mini_d6:{tmp_path.name}")])
    for sub in (p for p in (tmp_path / "many").iterdir() if p.is_dir()):
        r = json.loads((sub / "diagnostics.json").read_text())
        assert r["model"] == "vit_mini_d6" and len(r["lesion"]["delete"]) == 6
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--model", "vit_mini_d6", "--checkpoint", str(vit), "--checkpoint", str(vit),
              "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "single --checkpoint" in capsys.readouterr().err


def test_cli_user_errors(fmnist_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--model", "plain20", "--dists-vgg", str(tmp_path / "missing.pth"),
              "--dists-weights", str(tmp_path / "w.pt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "never downloads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["diagnose", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


def test_lesion_runs_by_default_only_for_trained_models(images):
    x, y = images
    kw = dict(gradients=False, theory=False, n_shuffles=2)
    m = pnnh.create_model("resnet20", width=0.25)
    r = diagnose(m, x[:32], y[:32], norm_stats="running", **kw)  # forcing running stats is not training
    assert r["norm_stats"] == "running" and "skipped" in r["lesion"]
    m.train()
    with torch.no_grad():
        m(x[:64])  # moves the BatchNorm running statistics, as training does
    r = diagnose(m, x[:32], y[:32], **kw)
    assert r["norm_stats"] == "running" and len(r["lesion"]["delete"]) == 9
    assert diagnose(m, x[:32], y[:32], lesion=False, **kw)["lesion"]["skipped"].startswith("not requested")
    vit = pnnh.create_model("vit_mini_d6")  # no BatchNorm: nothing tells whether it is trained
    assert "no BatchNorm" in diagnose(vit, x[:32], y[:32], **kw)["lesion"]["skipped"]
    assert 0 <= r["lesion"]["baseline"] <= 1
