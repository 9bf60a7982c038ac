"""The depth study end to end on real Fashion-MNIST (tiny budgets), planning, and kill-and-resume."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pnnh.errors import ConfigError
from pnnh.report.study import FAMILIES, PRESETS, check_study_dir, plan_study, run_study

REPO = Path(__file__).resolve().parents[2]


def test_tiny_study_writes_every_output_with_its_runs(tiny_study):
    out, results, lines = tiny_study
    for name in ("study.json", "results.json", "results.csv", "report.md", "report.html",
                 "plots/accuracy_vs_depth.png", "plots/loss_curves.png", "plots/accuracy_vs_params.png",
                 "plots/accuracy_vs_wall.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = results["runs"]
    assert [(r["family"], r["model"], r["depth"], r["seed"]) for r in runs] == [("plain", "plain8", 8, 0),
                                                                                 ("resnet", "resnet8", 8, 0)]
    assert results == json.loads((out / "results.json").read_text())
    assert results["study"]["complete"] and results["study"]["runs_finished"] == 2
    for r in runs:
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert r["status"] == "complete" and r["steps"] == 12 and r["test_images"] == 256
        assert r["test_acc"] == summary["test_acc"] and r["params"] == summary["params"] > 0
        assert r["train_img_per_s"] > 0 and r["wall_s"] > 0 and r["model_kwargs"] == {"width": 0.25}
        loss = r["curves"]["train_loss"]
        assert [p[0] for p in loss] == [5, 10, 12] and all(0 < p[1] < 20 for p in loss)
        # an epoch of 1,024 images is 8 steps: evaluated after epoch 1 and at the end
        assert [p[0] for p in r["curves"]["test_acc"]] == [8, 12] and r["curves"]["test_acc"][-1][1] == r["test_acc"]
    # the two nets differ only in the (parameter-free, option-A) shortcut
    assert runs[0]["params"] == runs[1]["params"]
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["model"], float(r["test_acc"])) for r in rows] == [(r["model"], r["test_acc"]) for r in runs]
    assert "curves" not in rows[0]
    md = (out / "report.md").read_text()
    for r in runs:  # the accuracy table holds the measured numbers
        assert f"{r['test_acc'] * 100:.1f}%" in md
    assert "| depth | plain | resnet |" in md and "| 8 |" in md
    assert re.search(r"- At depth 8, (plain8 and resnet8 are within (2 points|seed error) \(|"
                     r"(plain8|resnet8) is \d+\.\d points above (resnet8|plain8): )", md), md
    assert "first 256 test images" in md and "Changed from the preset" in md
    assert md.count("](plots/") == 4
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<script" not in html
    # progress a person can follow: run i of n, then an ETA
    assert lines[0].startswith("study 'quick': 2 runs")
    assert any(re.match(r"\[1/2\] plain8 seed 0: test acc \d+\.\d%, \d+ train img/s, .* ETA \d+:\d\d$", l)
               for l in lines), lines
    assert any(l.startswith("[2/2] resnet8 seed 0: test acc") for l in lines)
    assert lines[-1].startswith("report: ")


def test_rerun_keeps_finished_runs_untouched(tiny_study, tiny_spec):
    out, results, _ = tiny_study
    summaries = sorted(out.glob("runs/*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    lines: list[str] = []
    again = run_study(plan_study("quick", out=out, **tiny_spec), log=lines.append, render=False)
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    assert sum("finished earlier, kept" in l for l in lines) == 2
    assert again["runs"] == results["runs"]


def test_a_changed_recipe_is_refused_before_training(tiny_study, tiny_spec):
    out, _, _ = tiny_study
    changed = plan_study("quick", out=out, **{**tiny_spec, "train": {**tiny_spec["train"], "steps": 13}})
    with pytest.raises(ConfigError, match=r"different settings.*steps: on disk 12, now 13"):
        check_study_dir(changed)
    changed = plan_study("quick", out=out, **{**tiny_spec, "train": {**tiny_spec["train"], "test_subset": 512}})
    with pytest.raises(ConfigError, match="test_subset"):
        check_study_dir(changed)


def test_plan_maps_families_to_models_and_skips_missing_depths(tmp_path):
    study = plan_study("quick", out=tmp_path, families=["plain", "resnet", "plain_dirac"], depths=[15, 20],
                       seeds=2, model_kwargs={"width": 0.5})
    got = {(r.run_id, r.model, tuple(sorted(r.model_kwargs.items()))) for r in study.runs}
    assert got == {(f"{f}20-s{s}", m, kw) for s in (0, 1) for f, m, kw in (
        ("plain", "plain20", (("width", 0.5),)), ("resnet", "resnet20", (("width", 0.5),)),
        ("plain_dirac", "plain20", (("init", "dirac"), ("width", 0.5))))}
    assert [r.run_id for r in study.runs][:3] == ["plain20-s0", "resnet20-s0", "plain_dirac20-s0"]
    assert len(study.skipped) == 3 and all("at depth 15" in s and "no registered model" in s for s in study.skipped)
    assert study.runs[0].cfg.out == str(tmp_path / "runs" / "plain20-s0") and study.runs[0].cfg.resume


def test_quick_preset_defaults_and_the_pnnh_family(tmp_path):
    q = PRESETS["quick"]
    assert q.families == ("plain", "resnet", "pnnh") and q.depths == (20, 56)
    assert q.seeds >= 2  # the verdicts need a seed-to-seed error (pnnh.report.render.verdicts)
    study = plan_study("quick", out=tmp_path)
    assert {r.model for r in study.runs} == {"plain20", "resnet20", "pnnh20", "plain56", "resnet56", "pnnh56"}
    assert len(study.runs) == 6 * q.seeds and {r.seed for r in study.runs} == set(range(q.seeds))
    assert not study.skipped
    assert FAMILIES["plain_dirac"].model_kwargs == {"init": "dirac"}


@pytest.mark.parametrize("kw,match", [
    (dict(families=["plian"]), "unknown family 'plian' \\(did you mean plain"),
    (dict(depths=[15]), "nothing to run"),
    (dict(seeds=0), "seeds must be"),
    (dict(train={"steps": -1}), "steps must be a positive"),
])
def test_plan_errors_are_clear(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        plan_study("quick", out=tmp_path, **kw)


def test_cli_reports_bad_options_on_one_line(capsys):
    from pnnh.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "--depths", "8,x", "--out", "unused"])
    assert e.value.code == 2 and "error: --depths takes comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["study", "--steps", "5", "--epochs", "1", "--out", "unused"])
    assert e.value.code == 2


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path, fmnist_dir):
    """SIGKILL the study while its second run is part-way, re-run: run 1 kept, run 2 resumed, study done."""
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "pnnh", "study", "--families", "plain,resnet", "--depths", "8", "--seeds", "1",
           "--steps", "40", "--train-subset", "2048", "--test-subset", "256", "-k", "width=0.25", "--threads", "1",
           "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first, second = out / "runs/plain8-s0", out / "runs/resnet8-s0"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        # wait until run 1 finished and run 2 wrote a checkpoint (an epoch is 16 steps) but not its summary
        while not ((first / "summary.json").exists() and (second / "checkpoint.safetensors").exists()):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "study did not reach its second run in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not (second / "summary.json").exists(), "run 2 finished before the kill; the test needs it part-way"
    assert not (out / "report.md").exists()
    partial = json.loads((out / "results.json").read_text())  # written after run 1
    assert [r["model"] for r in partial["runs"]] == ["plain8"] and not partial["study"]["complete"]
    kept_mtime = (first / "summary.json").stat().st_mtime_ns
    kept_weights = (first / "model.safetensors").stat().st_mtime_ns

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/2] plain8 seed 0: finished earlier, kept" in done.stdout
    assert "[2/2] resnet8 seed 0: resuming from its checkpoint" in done.stdout
    assert (first / "summary.json").stat().st_mtime_ns == kept_mtime
    assert (first / "model.safetensors").stat().st_mtime_ns == kept_weights
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["complete"] and [r["model"] for r in results["runs"]] == ["plain8", "resnet8"]
    assert all(r["status"] == "complete" and r["steps"] == 40 for r in results["runs"])
    lines = [json.loads(l) for l in (second / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [16, 32, 40]  # resumed, not restarted: no epoch twice
    assert (out / "report.html").exists()
    assert f"Command: `pnnh {' '.join(cmd[3:])}`" in (out / "report.md").read_text()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_plans_valid_runs(tmp_path, name):
    study = plan_study(name, out=tmp_path, families=["plain", "resnet"])
    p = PRESETS[name]
    assert len(study.runs) == 2 * len(p.depths) * p.seeds and not study.skipped
    assert {r.cfg.data for r in study.runs} == {p.data} and all(r.cfg.resume for r in study.runs)
    if name == "paper":
        cfg = study.runs[0].cfg
        assert cfg.epochs >= 160 and cfg.augment and cfg.weight_decay == 1e-4 and cfg.momentum == 0.9
        assert study.describe()["depths"] == [20, 32, 44, 56, 110]


def test_a_family_without_a_pattern_is_found_in_the_registry():
    from pnnh.report.study import Family, _family

    fam = Family("resnet", None)
    assert fam.model_name(20) == "resnet20" and fam.model_name(18) == "resnet18" and fam.model_name(14) is None
    assert _family("resnet") is FAMILIES["resnet"]


def test_missing_data_fails_before_anything_is_written(tmp_path):
    from pnnh.errors import DataError

    study = plan_study("paper", out=tmp_path / "s", families=["plain"], data_dir=str(tmp_path / "no-data"))
    with pytest.raises(DataError, match="cifar"):
        run_study(study, log=lambda line: None)
    assert not (tmp_path / "s").exists()
