"""The experiment runner's guarantees with real launchers, on real (small) Fashion-MNIST.

One tiny study (plain8 and resnet8 at a quarter width, 24 steps on 1,024 images, one thread per
run) is trained in this process as the reference; then through ``--launcher local --jobs 2``
(two worker processes) and ``--launcher slurm`` (a real one-node Slurm cluster started by
``scripts/slurm_local.sh`` for this module and stopped afterwards). In both, the worker training
resnet8 is SIGKILLed part-way: the study fails naming that run, the next invocation keeps the
finished run untouched and resumes the killed one from its last checkpoint, and every per-run
result equals the reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pnnh.experiments import LaunchOptions
from pnnh.report.study import plan_study, run_study

REPO = Path(__file__).resolve().parents[2]
SLURM_HINT = ("Slurm not found: install Debian's slurm-wlm and munge (WITH_SLURM=1 bash scripts/setup.sh, "
              "which `make test` runs)")
PROGRESS = re.compile(r"(?:\| |^progress: )(\d+) done, (\d+) running(?:, (\d+) queued)?, (\d+) left \| elapsed \d+:\d\d, "
                      r"ETA (\d+:\d\d|\?)$")


def _args(data_dir: Path, out: Path) -> list[str]:
    return ["--families", "plain,resnet", "--depths", "8", "--seeds", "1", "--steps", "24", "--data-dir", str(data_dir),
            "-k", "width=0.25", "--threads", "1", "--no-progress", "--out", str(out)]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def reference(fmnist_small, tmp_path_factory) -> dict[str, dict]:
    """Per-run results of the tiny study trained one run after another in this process."""
    out = tmp_path_factory.mktemp("in-process")
    study = plan_study("quick", out=out, families=["plain", "resnet"], depths=[8], seeds=1, data_dir=str(fmnist_small),
                       threads=1, train={"steps": 24}, model_kwargs={"width": 0.25})
    results = run_study(study, log=lambda line: None, render=False)
    return {r["model"]: r for r in results["runs"]}


def _kill_second_run_part_way(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL the process training resnet8 once it has a checkpoint but no summary (the engine's
    ``.lock`` names the process that holds the run)."""
    run = out / "runs" / "resnet8-s0"
    deadline = time.monotonic() + 240
    while not ((run / "checkpoint.safetensors").exists() and (run / ".lock").exists()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "resnet8 did not checkpoint in time"
        time.sleep(0.02)
    pid = int((run / ".lock").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    assert not (run / "summary.json").exists(), "resnet8 finished before the kill; the test needs it part-way"


def _check_progress(lines: list[str], total: int) -> None:
    counts = [(line, PROGRESS.search(line)) for line in lines if " done, " in line]
    assert counts, lines
    for line, m in counts:
        assert m, line
        done, running, queued, left = (int(m.group(i) or 0) for i in (1, 2, 3, 4))
        assert done + running + queued + left == total, m.group(0)


def _check_same_results(out: Path, reference: dict[str, dict]) -> None:
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["complete"] and [r["model"] for r in results["runs"]] == ["plain8", "resnet8"]
    for r in results["runs"]:
        ref = reference[r["model"]]
        assert r["seed"] == ref["seed"] and r["steps"] == ref["steps"] == 24
        assert r["test_acc"] == ref["test_acc"], (r["model"], r["test_acc"], ref["test_acc"])
        assert r["curves"]["train_loss"] == ref["curves"]["train_loss"]
    # resumed, not restarted: every epoch logged once
    metrics = [json.loads(l)["step"] for l in (out / "runs/resnet8-s0/metrics.jsonl").read_text().splitlines()]
    assert metrics == [8, 16, 24]


def _kill_then_resume(cmd: list[str], out: Path, env: dict[str, str], reference: dict[str, dict]) -> str:
    """Run ``cmd``, kill resnet8's worker part-way, check the failure, re-run, check the results."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _kill_second_run_part_way(proc, out)
        first = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, first
    assert re.search(r"\[2/2\] resnet8 seed 0: failed, .*; re-run to resume it from its last checkpoint", first), first
    assert "error: 1 of 2 runs did not finish (resnet8-s0:" in first, first
    assert not (out / "report.md").exists()
    partial = json.loads((out / "results.json").read_text())  # the finished run only, once
    assert [r["model"] for r in partial["runs"]] == ["plain8"] and not partial["study"]["complete"]
    kept = (out / "runs/plain8-s0/summary.json").stat().st_mtime_ns

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[1/2] plain8 seed 0: finished earlier, kept" in again.stdout
    assert "[2/2] resnet8 seed 0: resuming from its checkpoint" in again.stdout
    assert (out / "runs/plain8-s0/summary.json").stat().st_mtime_ns == kept
    _check_same_results(out, reference)
    _check_progress(first.splitlines() + again.stdout.splitlines(), total=2)
    last = PROGRESS.search(again.stdout.splitlines()[-2])  # the line before "report: ..."
    assert last.group(1, 2, 3, 4, 5) == ("2", "0", None, "0", "0:00"), again.stdout
    return first + again.stdout


def test_local_workers_give_the_same_results_and_resume_a_killed_worker(reference, fmnist_small, tmp_path):
    out = tmp_path / "local"
    cmd = [sys.executable, "-m", "pnnh", "study", *_args(fmnist_small, out), "--launcher", "local", "--jobs", "2"]
    log = _kill_then_resume(cmd, out, _env(), reference)
    assert "launching 2 runs on 2 worker processes of 1 thread" in log
    assert "killed by signal 9" in log and (out / "logs" / "resnet8-s0.log").exists()
    assert "Warning" not in (out / "logs" / "plain8-s0.log").read_text()  # a worker's log holds its run only

    # a finished study trains nothing, whatever the launcher: no worker is started
    summaries = sorted(out.glob("runs/*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    lines: list[str] = []
    study = plan_study("quick", out=out, families=["plain", "resnet"], depths=[8], seeds=1, data_dir=str(fmnist_small),
                       threads=1, train={"steps": 24}, model_kwargs={"width": 0.25})
    run_study(study, log=lines.append, render=False, launch=LaunchOptions(jobs=2))
    assert sum("finished earlier, kept" in l for l in lines) == 2 and not any("launching" in l for l in lines)
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["plain8-s0.log", "resnet8-s0.log"]


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster (munged, slurmctld, slurmd) for this module; yields its SLURM_CONF."""
    if not all(shutil.which(exe) or Path("/usr/sbin", exe).exists() for exe in ("munged", "slurmctld", "slurmd")):
        pytest.fail(SLURM_HINT)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PNNH_SLURM_DIR": str(state), "PNNH_SLURM_PORT": str(_free_port_pair())}
    script = ["bash", str(REPO / "scripts" / "slurm_local.sh")]
    up = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield str(state / "slurm.conf")
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)


def test_slurm_jobs_give_the_same_results_and_resume_a_killed_job(reference, fmnist_small, tmp_path, slurm_cluster):
    out = tmp_path / "slurm"
    env = _env(SLURM_CONF=slurm_cluster)
    cmd = [sys.executable, "-m", "pnnh", "study", *_args(fmnist_small, out), "--launcher", "slurm",
           "--slurm-cpus", "1", "--slurm-time", "10"]
    log = _kill_then_resume(cmd, out, env, reference)
    assert "ended without a result" in log
    # the first invocation submitted both runs as one job array (<array id>_<task>), the second one job
    names = sorted(p.name for p in (out / "slurm").iterdir())
    jobs = [m.group(1, 2) for m in (re.match(r"(\d+)(?:_(\d+))?_submitted\.pkl$", n) for n in names) if m]
    assert len(jobs) == 3 and len({a for a, _ in jobs}) == 2 and sorted(t for _, t in jobs if t) == ["0", "1"], names
