"""Crash safety: SIGKILL a real `python -m pnnh train` process again and again, resume each time.

The run checkpoints every 2 steps. Kills alternate between two moments: while a checkpoint is
being written (the test polls for the writer's temp file and kills the instant it appears) and
at a random time in the middle of training steps. After every kill the checkpoint on disk must
load completely; the final weights and metrics must equal those of a run never interrupted.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import pnnh
from pnnh.train import TrainConfig, train
from pnnh.train.checkpoint import load_checkpoint, read_metadata
from pnnh.train.engine import build_optimizer

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc")


def _cfg(data_dir: Path, out: Path) -> TrainConfig:
    return TrainConfig(model="resnet20", model_kwargs={"width": 0.25}, data_dir=str(data_dir), train_subset=512,
                       test_subset=128, batch_size=32, epochs=2, checkpoint_every=2, threads=1, progress=False,
                       out=str(out))


def _argv(cfg: TrainConfig) -> list[str]:
    return [sys.executable, "-m", "pnnh", "train", "--model", cfg.model, "-k", "width=0.25", "--data-dir",
            cfg.data_dir, "--train-subset", str(cfg.train_subset), "--test-subset", str(cfg.test_subset),
            "--batch-size", str(cfg.batch_size), "--epochs", str(cfg.epochs), "--checkpoint-every",
            str(cfg.checkpoint_every), "--threads", "1", "--no-progress", "--out", cfg.out, "--resume"]


def _ckpt_step(ckpt: Path) -> int:
    return read_metadata(ckpt)["state"]["step"] if ckpt.exists() else 0


def _kill_once(argv: list[str], out: Path, mode: str, rng: random.Random) -> tuple[str, int, bool]:
    """Start a resume, wait for it to make progress, SIGKILL it; (what happened, ckpt step, temp file left)."""
    ckpt = out / "checkpoint.safetensors"
    start_step = _ckpt_step(ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        progressed = False
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if not progressed:  # a checkpoint newer than where this attempt started: it is training
                progressed = _ckpt_step(ckpt) > start_step
                time.sleep(0.01)
            elif mode == "step":
                time.sleep(rng.uniform(0, 0.05))
                break
            elif any(out.glob(".checkpoint.safetensors.tmp*")):  # mode "write": a checkpoint is being written
                break
            else:
                time.sleep(0.0002)  # a write can take well under 1 ms on tmpfs
        if proc.poll() is not None:
            return "finished", _ckpt_step(ckpt), False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    left = any(out.glob(".checkpoint.safetensors.tmp*"))
    return f"killed ({mode})", _ckpt_step(ckpt), left


def test_sigkill_anywhere_never_corrupts_and_resume_is_exact(fmnist_small, tmp_path):
    ref = train(_cfg(fmnist_small, tmp_path / "ref"))
    out = tmp_path / "run"
    cfg = _cfg(fmnist_small, out)
    argv = _argv(cfg)  # --resume on an empty directory starts afresh
    rng = random.Random(0)
    log, last_step, temp_left = [], 0, False
    for mode in ("write", "step", "write", "step"):
        what, step, left = _kill_once(argv, out, mode, rng)
        log.append((what, step, left))
        # whatever the moment of the kill, the checkpoint on disk is complete and loads
        model = pnnh.create_model("resnet20", width=0.25)
        state = load_checkpoint(out / "checkpoint.safetensors", model, build_optimizer(model, cfg))
        assert state["step"] == step and step >= last_step and step % 2 == 0, log
        for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
            json.loads(line)  # every metrics line is whole
        last_step, temp_left = step, temp_left or left
        if what == "finished":
            break
    print("\nkills:", log)
    assert sum(w.startswith("killed") for w, _, _ in log) >= 4, log
    assert temp_left, f"no kill landed inside a checkpoint write: {log}"

    p = subprocess.run(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not list(out.glob(".*.tmp*"))  # temp files of killed writers are cleaned up on resume
    wa, wb = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] == ref["test_acc"] and summary["test_loss"] == ref["test_loss"]
    metrics = [{k: json.loads(l)[k] for k in METRIC_KEYS} for l in (out / "metrics.jsonl").read_text().splitlines()]
    ref_metrics = [{k: json.loads(l)[k] for k in METRIC_KEYS}
                   for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == ref_metrics
