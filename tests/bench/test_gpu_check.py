"""The GPU check's dry run on the CPU: every step runs in its own process at tiny sizes and lands in
one JSON file and one Markdown page; a failing or overrunning step is recorded and the rest run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pnnh.bench.gpu_check import JSON_NAME, MD_NAME, STEPS, _converter, bench_models, main, make_plan, run_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, fmnist_small):
    out = tmp_path_factory.mktemp("gpu-check")
    code = main(["--dry-run", "--data-dir", str(fmnist_small), str(out)])
    return code, json.loads((out / JSON_NAME).read_text()), (out / MD_NAME).read_text()


def test_dry_run_runs_every_step_and_writes_json_and_markdown(dry_run):
    code, res, md = dry_run
    steps = res["steps"]
    assert list(steps) == list(STEPS) and res["dry_run"] and res["device"] == "cpu"
    assert code == 0, {k: v.get("error") for k, v in steps.items()}
    assert steps["environment"]["status"] == "ok" and steps["environment"]["torch"] == torch.__version__
    for name in ("cuda_tests", "fmnist_amp", "bench_cifar", "bench_cifar_reference", "profile_cifar", "bench_imagenet"):
        assert steps[name]["status"] == "ok" and steps[name]["seconds"] > 0
    assert list(steps["bench_cifar_reference"]["results"]) == ["train"]  # the kernels change training only
    assert steps["convert"]["status"] == ("ok" if _converter() else "skipped")
    for name in ("bench_cifar_compile", "bench_imagenet_compile"):
        assert steps[name] == {"status": "skipped", "reason": "dry run: torch.compile is exercised on the GPU only"}
    assert res["elapsed_s"] < res["budget_s"]
    # the Markdown summary names every step with its status
    assert md.startswith("# GPU check (dry run")
    for name, step in steps.items():
        assert f"| {name} | {step['status']} |" in md


def test_dry_run_ran_the_cuda_marked_tests(dry_run):
    tests = dry_run[1]["steps"]["cuda_tests"]
    assert "-m cuda" in tests["command"] and len(tests["cases"]) >= 10
    names = [c["test"] for c in tests["cases"]]
    assert "test_cuda_batches_equal_cpu_batches" in " ".join(names)  # cuda-marked tests outside tests/cuda too
    assert not any("test_loader_validation" in n for n in names)  # and only those
    if not torch.cuda.is_available():  # skipped with their stated reason, nothing hidden
        assert tests["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": len(tests["cases"])}
        assert {c["message"] for c in tests["cases"]} == {"needs a CUDA device"}


def test_dry_run_trained_and_benched_the_three_families(dry_run):
    _, res, md = dry_run
    runs = res["steps"]["fmnist_amp"]["runs"]
    assert list(runs) == ["resnet8", "pnnh8", "plain8"]
    for r in runs.values():
        assert 0 <= r["test_acc"] <= 1 and r["train_img_per_s"] > 0 and r["steps"] == 2  # 128 images, batch 64
    for name, ours in (("bench_cifar", ("resnet8", "pnnh8", "plain8")), ("bench_imagenet", ("resnet18", "pnnh18", "plain18"))):
        results = res["steps"][name]["results"]
        assert [r["model"] for r in results["train"]["rows"]] == list(ours)
        assert [r["model"] for r in results["infer"]["rows"]] == [ours[0], *(f"{m}:fused" for m in ours)]
        assert all(r["img_per_s"] > 0 for mode in ("train", "infer") for r in results[mode]["rows"])
    assert res["steps"]["bench_imagenet"]["settings"]["num_classes"] == 1000
    assert "| pnnh8:fused |" in md and "| plain18 |" in md and "| resnet8 |" in md


def test_dry_run_profiled_a_training_step_of_the_residual_and_the_pnnh_net(dry_run):
    _, res, md = dry_run
    profiles = res["steps"]["profile_cifar"]["profiles"]
    assert list(profiles) == ["resnet8", "pnnh8"]
    for p in profiles.values():
        assert p["step_ms"] > 0 and p["device"] == "cpu" and p["device_busy_ms"] is None and p["kernels"] is None
        assert p["ops"] and all(o["ms"] > 0 and o["calls"] > 0 for o in p["ops"])
        assert any("conv" in o["name"] for o in p["ops"])  # the step's own operators, not the profiler's
    assert "## `profile_cifar`" in md and "| pnnh8 |" in md


def test_failed_and_overrunning_steps_are_recorded_and_the_rest_run(tmp_path, fmnist_small):
    plan = make_plan(tmp_path / "a", dry_run=True, data_dir=str(fmnist_small))
    plan.cifar_models = ("resnet8", "nosuchnet8", "plain8")
    res = run_check(plan, ["fmnist_amp", "bench_cifar", "environment"], log=lambda s: None)["steps"]
    fm = res["fmnist_amp"]
    assert fm["status"] == "failed" and "nosuchnet8" in fm["runs"]["nosuchnet8"]["error"]
    assert fm["runs"]["plain8"]["test_acc"] >= 0  # the model after the failing one still ran
    assert res["bench_cifar"]["status"] == "failed" and "nosuchnet8" in res["bench_cifar"]["results"]["train"]["error"]
    assert res["environment"]["status"] == "ok"

    plan = make_plan(tmp_path / "b", dry_run=True, budget_s=8)
    plan.bench_rounds = {"repeats": 10_000, "steps": 100, "warmup": 0}  # far longer than its box
    plan.step_timeout_s["bench_cifar"] = 5
    res = run_check(plan, ["bench_cifar", "environment"], log=lambda s: None)
    steps = res["steps"]
    assert steps["bench_cifar"]["status"] == "timeout" and 5 <= steps["bench_cifar"]["seconds"] < 30
    assert steps["environment"] == {"status": "skipped", "reason": "total budget of 8 s spent"}
    assert json.loads((tmp_path / "b" / JSON_NAME).read_text())["steps"]["bench_cifar"]["status"] == "timeout"


def test_bad_arguments_get_one_error_line(capsys):
    assert main(["--steps", "nosuchstep", "out"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown step(s) nosuchstep")
    if not torch.cuda.is_available():
        assert main(["out"]) == 2
        assert "error: no CUDA device here" in capsys.readouterr().err


def test_wrapper_script_runs_the_module(tmp_path):
    env = {**os.environ, "PNNH_GPU_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "w"), "--dry-run",
                           "--steps", "environment"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "w" / JSON_NAME).read_text())
    assert list(res["steps"]) == ["environment"] and res["steps"]["environment"]["status"] == "ok"


def test_gpu_plan_benches_the_issue_s_models(monkeypatch):
    import types

    plan = make_plan("unused")
    assert (plan.device, plan.amp, plan.cifar_batch, plan.imagenet_batch, plan.imagenet_size) == ("cuda", "bf16", 512, 256, 224)
    train, infer, missing = bench_models(plan, "cifar", compiled=False)
    assert train == ["resnet56", "pnnh56", "plain56"]
    assert infer == ["resnet56", "resnet56:fused", "pnnh56:fused", "plain56:fused"] and missing == {}
    train, infer, _ = bench_models(plan, "imagenet", compiled=True)
    assert train == ["resnet50", "pnnh50", "plain50", "resnet50:compile", "pnnh50:compile", "plain50:compile"]
    assert infer == ["resnet50:fused", "pnnh50:fused", "plain50:fused",
                     "resnet50:fused:compile", "pnnh50:fused:compile", "plain50:fused:compile"]
    # timm importable (a stand-in), torchvision not: timm's resnet50 joins the same rounds, torchvision's is reported
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(list_models=lambda: ["resnet50"]))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    train, infer, missing = bench_models(plan, "imagenet", compiled=False)
    assert train == ["resnet50", "pnnh50", "plain50", "timm:resnet50"]
    assert infer == ["resnet50", "timm:resnet50", "resnet50:fused", "pnnh50:fused", "plain50:fused"]
    assert list(missing) == ["torchvision:resnet50"] and "torchvision" in missing["torchvision:resnet50"]


def test_convert_step_trains_the_converted_nets(tmp_path):
    from pnnh.bench.gpu_check import step_convert

    plan = make_plan(tmp_path, dry_run=True)
    res = step_convert(plan, lambda partial: None)
    assert res.get("status", "ok") == "ok" and res["source"] == "pnnh:resnet18"
    for r in (res, res["vit"]):  # the ResNet and the ViT: converted to PNNH, trained for the plan's steps
        assert len(r["losses"]) == plan.convert_steps and r["train_img_per_s"] > 0
        assert all(math.isfinite(loss) for loss in r["losses"])
    assert res["vit"]["source"] == "pnnh:vit_mini_d6"
    assert res["vit"]["params_converted"] < res["vit"]["params_source"]  # 11/12 of each block's weights
