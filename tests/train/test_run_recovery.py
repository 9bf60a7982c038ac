"""A run directory after things went wrong: a torn metrics line, a diverged run, writers' leftovers.

Real runs on real (small) Fashion-MNIST, real files on disk; the full-disk append fails in a
subprocess whose file-size limit makes the kernel refuse the write.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pnnh
from pnnh.errors import DivergenceError
from pnnh.train import TrainConfig, train
from pnnh.train.checkpoint import load_checkpoint, read_metadata
from pnnh.train.engine import build_optimizer

REPO = Path(__file__).resolve().parents[2]
KEYS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc")


def _cfg(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="resnet8", model_kwargs={"width": 0.25}, data_dir=str(data_dir), train_subset=128,
                test_subset=64, batch_size=32, epochs=2, threads=1, progress=False, out=str(out))
    return TrainConfig(**{**base, **kw})


def _metrics(path: Path) -> list[dict]:
    return [{k: json.loads(l)[k] for k in KEYS} for l in path.read_text().splitlines()]


def test_torn_last_metrics_line_does_not_break_resume(fmnist_small, tmp_path, capsys):
    ref = train(_cfg(fmnist_small, tmp_path / "ref"))
    cfg = _cfg(fmnist_small, tmp_path / "run")

    def stop(step):
        if step == 6:  # in epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:  # what a full disk leaves: the append cut off mid-record, no newline
        f.write('{"epoch": 2, "st')
    resumed = train(cfg.replace(resume=True))
    assert "dropped 1 incomplete line(s)" in capsys.readouterr().err
    assert resumed["test_loss"] == ref["test_loss"]
    assert _metrics(metrics) == _metrics(tmp_path / "ref" / "metrics.jsonl")


def test_failed_metrics_append_leaves_no_torn_line(tmp_path):
    """The kernel refuses the append half-way (EFBIG under RLIMIT_FSIZE, as ENOSPC on a full disk)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "step": 4}\n')
    code = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        from pnnh.train.engine import _append_line
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = Path({str(path)!r}).stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, size + 10))
        try:
            _append_line(Path({str(path)!r}), '{{"epoch": 2, "step": 8, "train_loss": 1.0}}')
        except OSError as e:
            print(e.filename, e.strerror)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{path} File too large"
    assert path.read_text() == '{"epoch": 1, "step": 4}\n'  # the partial record was cut back off


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_divergence_keeps_the_last_finite_checkpoint(fmnist_small, tmp_path):
    # lr 1e12: step 1 leaves finite (huge) weights, step 2 makes BatchNorm running_var infinite
    cfg = _cfg(fmnist_small, tmp_path / "run", steps=16, epochs=None, lr=1e12, checkpoint_every=1)
    with pytest.raises(DivergenceError, match=r"non-finite \(.*running_var\) by step 2 .* kept at .*checkpoint"):
        train(cfg)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    assert read_metadata(ckpt)["state"]["step"] == 1
    assert _all_finite(load_file(str(ckpt)))
    model = pnnh.create_model("resnet8", width=0.25)
    state = load_checkpoint(ckpt, model, build_optimizer(model, cfg))
    assert state["step"] == 1 and _all_finite(model.state_dict())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == 2


def test_run_ending_with_non_finite_weights_is_not_complete(fmnist_small, tmp_path):
    # lr 100 for one epoch of 8 steps: every loss stays finite, yet BatchNorm statistics end up infinite
    cfg = _cfg(fmnist_small, tmp_path / "run", train_subset=256, steps=8, epochs=None, lr=100)
    with pytest.raises(DivergenceError, match=r"non-finite .* by step 8"):
        train(cfg)
    out = tmp_path / "run"
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


def test_overflowing_gradient_under_clip_is_named_as_the_cause(fmnist_small, tmp_path):
    # an 806-layer plain BN net at initialisation: the loss is finite, the backward pass overflows,
    # and clipping by the non-finite norm turns every gradient into NaN
    cfg = _cfg(fmnist_small, tmp_path / "run", model="plain806", steps=4, epochs=None, grad_clip=1.0)
    with pytest.raises(DivergenceError, match=r"loss became nan at step 1 .*gradient norm at step 0 was (inf|nan): "
                                              r"the backward pass overflowed"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_resume_removes_killed_writers_temp_files(fmnist_small, tmp_path):
    cfg = _cfg(fmnist_small, tmp_path / "run", epochs=1)
    train(cfg)
    out = tmp_path / "run"
    leftovers = [out / ".tmp2wdc0Y", out / ".checkpoint.safetensors.tmp4242", out / ".summary.json.tmp17"]
    for p in leftovers:  # safetensors' own temp file, and ours, as a SIGKILL mid-write leaves them
        p.write_bytes(b"partial")
    keep = out / ".tmp-notes"  # not a writer's temp file
    keep.write_text("mine")
    train(cfg.replace(resume=True))
    assert not any(p.exists() for p in leftovers) and keep.exists()


def test_study_dir_cleanup_spares_live_writers(tmp_path):
    from pnnh.utils import remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".results.json.tmp{dead.pid}"
    live = tmp_path / f".results.json.tmp{os.getpid()}"
    orphan = tmp_path / ".tmpAbC123"  # safetensors' temp file: no owner to ask, kept unless owned
    for p in (stale, live, orphan):
        p.write_text("{")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert live.exists() and orphan.exists()


def test_torchrun_user_error_one_line_and_not_rerun(fmnist_small, tmp_path):
    """A user error seen by rank 0 only (its run directory already holds a run): rank 1 stops with it
    quietly (no gloo traceback around it), and the --max-restarts attempts repeat the error at once."""
    out = tmp_path / "run"
    train(_cfg(fmnist_small, out, steps=2, epochs=None))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PNNH_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
            "2", "-m", "pnnh", "train", "--model", "resnet8", "-k", "width=0.25", "--data-dir", str(fmnist_small),
            "--train-subset", "128", "--test-subset", "64", "--batch-size", "32", "--steps", "2", "--no-progress",
            "--out", str(out)]
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert errors == [f"error: {out} already holds a run; pass --resume to continue it or choose another --out"] * 3, p.stderr
    assert "gloo" not in p.stderr.lower() and "pnnh/train" not in p.stderr, p.stderr  # no worker traceback
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"  # the run is untouched
    assert not (out / ".user-error.json").exists()  # the note for restarts ends with the job


@pytest.mark.parametrize("restart,kept", [(1, True), (2, False)])
def test_the_user_error_note_is_repeated_and_removed_by_the_last_attempt(tmp_path, monkeypatch, capsys, restart, kept):
    """Attempt ``restart`` of a torchrun job with --max-restarts 2 (one process; the note as the first attempt
    left it): the error is repeated before anything runs; the last attempt removes the note."""
    from pnnh.cli import main

    for k, v in {"TORCHELASTIC_RUN_ID": "job-1", "TORCHELASTIC_MAX_RESTARTS": "2",
                 "TORCHELASTIC_RESTART_COUNT": str(restart)}.items():
        monkeypatch.setenv(k, v)
    note = tmp_path / "run" / ".user-error.json"
    note.parent.mkdir()
    note.write_text(json.dumps({"run_id": "job-1", "error": "the first attempt's error", "exit_code": 2}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "resnet8", "--steps", "1", "--data-dir", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and capsys.readouterr().err == "error: the first attempt's error\n"
    assert note.exists() == kept
    if not kept:  # a new user error in the last attempt records nothing either
        with pytest.raises(SystemExit):
            main(["train", "--model", "resnet8", "--steps", "1", "--data-dir", str(tmp_path / "nowhere"),
                  "--out", str(tmp_path / "run")])
        assert "error:" in capsys.readouterr().err and not note.exists()
