"""Statistics over seeds and the reuse/resume rule of the experiment runner, without training."""

import json
import math
import os

import pytest

from pnnh.errors import ConfigError
from pnnh.experiments import Grid, Run, difference, mean, mean_std, sample_std, welch_se
from pnnh.experiments.grid import load_yaml, run_cost
from pnnh.experiments.state import check_grid, conflicts, finished, marker_config, write_marker
from pnnh.train import TrainConfig


def test_mean_sample_std_and_welch_error():
    assert mean([50.0, 70.0]) == 60.0 and math.isnan(mean([]))
    assert sample_std([50.0, 70.0]) == pytest.approx(14.1421356)  # n - 1 in the denominator
    assert sample_std([3.0]) == 0.0 and all(math.isnan(x) for x in mean_std([]))
    # sqrt(14.142^2/2 + 1.414^2/2) = sqrt(101)
    assert welch_se([50.0, 70.0], [80.0, 82.0]) == pytest.approx(math.sqrt(101))
    assert difference([50.0, 70.0], [80.0, 82.0]) == (-21.0, pytest.approx(math.sqrt(101)))
    assert difference([], [1.0]) is None
    # unequal sizes: each side's variance over its own n
    assert welch_se([1.0, 2.0, 3.0], [10.0, 14.0]) == pytest.approx(math.sqrt(1 / 3 + 8 / 2))


def _run(tmp_path, **kw) -> Run:
    cfg = TrainConfig(model="resnet20", steps=10, seed=0, out=str(tmp_path / "r"), resume=True, **kw)
    return Run("r", "resnet20 seed 0", cfg)


def _finish(run: Run, status="complete") -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "summary.json").write_text(json.dumps({"status": status, "test_acc": 0.5, "model": run.cfg.model,
                                                      "model_kwargs": {}, "data": run.cfg.data, "seed": 0}))


def test_finished_means_a_final_summary(tmp_path):
    run = _run(tmp_path)
    assert finished(run) is None
    run.dir.mkdir(parents=True)
    (run.dir / "summary.json").write_text("{not json")
    assert finished(run) is None
    _finish(run, "diverged")
    assert finished(run)["status"] == "diverged"  # a diverged run is a result: never retrained


def test_marker_decides_reuse_on_the_result_keys_only(tmp_path):
    run = _run(tmp_path, test_subset=100)
    _finish(run)
    write_marker(run, "ablate_config.json")
    saved = json.loads((run.dir / "ablate_config.json").read_text())
    assert saved == marker_config(run.cfg) and "threads" not in saved and "out" not in saved
    grid = Grid("g", tmp_path, [run], marker="ablate_config.json")
    # where and how it runs does not matter: threads, data_dir, log_every, checkpoints
    same = _run(tmp_path, test_subset=100, threads=3, data_dir="/elsewhere", log_every=1, checkpoint_every=5)
    assert conflicts(same, grid.marker) == []
    # a key the marker lacks (a field newer than the run) counts as its default
    del saved["grad_clip"]
    (run.dir / "ablate_config.json").write_text(json.dumps(saved))
    assert conflicts(same, grid.marker) == []
    assert conflicts(_run(tmp_path, test_subset=100, grad_clip=1.0), grid.marker) == [
        "grad_clip: on disk None, now 1.0"]
    # what the result depends on: refused for the whole grid before anything trains
    other = _run(tmp_path, test_subset=200, lr=0.05)
    assert conflicts(other, grid.marker) == ["lr: on disk 0.1, now 0.05", "test_subset: on disk 100, now 200"]
    with pytest.raises(ConfigError, match=r"holds runs made with different settings: r \(lr: on disk 0.1"):
        check_grid(Grid("g", tmp_path, [other], marker="ablate_config.json"))


def test_without_marker_or_checkpoint_the_summary_is_compared(tmp_path):
    run = _run(tmp_path)
    _finish(run)
    assert conflicts(run) == []
    assert conflicts(_run(tmp_path, data="cifar10")) == ["data: on disk 'fashion-mnist', now 'cifar10'"]


def test_yaml_grid_files_and_costs(tmp_path):
    quick = load_yaml("study/quick.yaml")  # found under configs/
    assert quick["name"] == "quick" and quick["train"]["steps"] == 60
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    small = TrainConfig(model="resnet20", steps=10, model_kwargs={"width": 0.5})
    assert run_cost(TrainConfig(model="resnet56", steps=10)) > run_cost(TrainConfig(model="resnet20", steps=10))
    assert run_cost(small) == pytest.approx(run_cost(TrainConfig(model="resnet20", steps=10)) / 4)


def test_a_refused_slurm_submission_is_one_error_line(tmp_path, monkeypatch, capsys):
    from pnnh.cli import main

    fake = tmp_path / "bin" / "sbatch"  # a scheduler that refuses the job, as sbatch does
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(SystemExit) as e:
        main(["study", "--launcher", "slurm", "--slurm-partition", "nope", "--families", "plain", "--depths", "8",
              "--seeds", "1", "--steps", "2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: could not submit 1 run(s) to Slurm: sbatch: error: Batch job submission failed: Invalid partition "
        "name specified (is this a Slurm login node, with SLURM_CONF set where needed?)")
    with pytest.raises(SystemExit) as e:
        main(["study", "--jobs", "0", "--out", str(tmp_path / "s")])
    assert e.value.code == 2 and "error: jobs must be >= 1, got 0" in capsys.readouterr().err
