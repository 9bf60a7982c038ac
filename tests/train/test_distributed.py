"""Multi-process training with real processes: torchrun + gloo on CPU, restarts, DDP gradients.

Every test here starts real OS processes joined by a gloo process group. They are small
(resnet20 at width 0.25 on 1024 real Fashion-MNIST images, 32 steps) so the file stays
around half a minute on two cores.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pnnh
from pnnh.data import InMemoryLoader, load_dataset
from pnnh.errors import ConfigError
from pnnh.train import TrainConfig, train
from pnnh.train import distributed as dist_utils
from pnnh.train.checkpoint import read_metadata

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PNNH_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1", **extra)  # a crashing worker prints its Python stacks
    return env


def _torchrun(out: Path, data_dir: Path, *, max_restarts: int = 0) -> list[str]:
    # `python -m torch.distributed.run` is the `torchrun` console script, bound to this interpreter.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(max_restarts), "-m", "pnnh", "train", "--model", "resnet20", "-k", "width=0.25",
            "--data-dir", str(data_dir), "--batch-size", "32", "--epochs", "2", "--checkpoint-every", "8",
            "--eval-batch-size", "128", "--no-progress", "--out", str(out)]


def _metrics(out: Path) -> list[dict]:
    return [{k: json.loads(l)[k] for k in METRIC_KEYS} for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(fmnist_small, tmp_path_factory):
    """One uninterrupted `torchrun --nproc-per-node 2 -m pnnh train` run (the reference of the restart test)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    t0 = time.perf_counter()
    p = subprocess.run(_torchrun(out, fmnist_small), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-20000:]  # the whole log: a rank's traceback sits above torchrun's summary
    return out, p, time.perf_counter() - t0


def test_torchrun_two_processes_train_and_only_rank0_writes(ddp_run):
    out, p, seconds = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    print(f"\n2-process gloo DDP: test acc {summary['test_acc']:.4f} after {summary['steps']} steps "
          f"(global batch 64), {seconds:.1f} s wall including start-up")
    assert summary["world_size"] == 2 and summary["steps"] == 2 * 1024 // 64
    assert summary["test_acc"] > 0.3  # 10 classes: chance is 0.1
    # threads: the cores split between the 2 local processes (OMP_NUM_THREADS=1 is torchrun's default)
    assert summary["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    # one writer: one line per epoch (not per rank), one summary line on stdout, no stray files
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    assert p.stdout.count("test acc") == 1, p.stdout
    assert sorted(f.name for f in out.iterdir()) == [".lock", "checkpoint.safetensors", "metrics.jsonl", "model.safetensors",
                                                     "summary.json"]
    # metrics are reduced over ranks: the epoch saw all 1024 images, not one rank's 512
    assert read_metadata(out / "checkpoint.safetensors")["state"]["step"] == 32


def _descendants(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids + [d for k in kids for d in _descendants(k)]


def _worker_pid(torchrun_pid: int, rank: int) -> int | None:
    for pid in _descendants(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


def test_sigkill_one_worker_torchrun_restarts_and_resumes_exactly(ddp_run, fmnist_small, tmp_path):
    """--max-restarts 1: SIGKILL rank 1 mid-epoch; the restarted group resumes by itself and ends
    with the uninterrupted run's weights and metrics, bit for bit (tolerance 0)."""
    ref_out = ddp_run[0]
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(out, fmnist_small, max_restarts=1), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while killed_at is None and proc.poll() is None and time.monotonic() < deadline:
            ckpt = out / "checkpoint.safetensors"
            if ckpt.exists():  # first checkpoint: step 8 of 16 in epoch 1, so the kill lands mid-epoch
                victim = _worker_pid(proc.pid, rank=1)
                if victim is not None:
                    os.kill(victim, signal.SIGKILL)
                    killed_at = read_metadata(ckpt)["state"]["step"]
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None and killed_at < 16, "the worker was not killed mid-epoch 1"
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming" in stderr and "at step 8" in stderr, stderr[-3000:]  # the restart resumed, not restarted
    wa, wb = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    assert _metrics(out) == _metrics(ref_out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_rendezvous_matches_one_node_with_two_processes(ddp_run, fmnist_small, tmp_path):
    """Two torchrun agents ("nodes" 0 and 1, one process each) meeting through a c10d rendezvous on
    127.0.0.1 train the run of one node with two processes: same metrics and weights, bit for bit."""
    ref_out = ddp_run[0]
    ref = json.loads((ref_out / "summary.json").read_text())
    out = tmp_path / "run"
    standalone = _torchrun(out, fmnist_small)
    train_args = standalone[standalone.index("train") - 2:]  # -m pnnh train ...
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                   "--rdzv-id", "pnnh-two-nodes", "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0",
                   *train_args, "--threads", str(ref["threads"])]  # the threads of one of two local processes
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == ref["steps"]
    assert sum("test acc" in o for o, _ in outputs) == 1  # one writer: global rank 0, on one of the nodes
    assert _metrics(out) == _metrics(ref_out)
    wa, wb = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)


_GRAD_WORKER = r"""
import sys, torch, torch.nn.functional as F
from safetensors.torch import save_file
import pnnh
from pnnh.data import InMemoryLoader, load_dataset
from pnnh.errors import ConfigError
from pnnh.train import TrainConfig, train
from pnnh.train import distributed as D

data_dir, out = sys.argv[1], sys.argv[2]
assert D.init_from_env("cpu")
torch.manual_seed(0)
model = pnnh.create_model("resnet20", width=0.25)
model.eval()  # BatchNorm on running statistics: per sample, so splitting the batch cannot change it
ddp = D.wrap_model(model, torch.device("cpu"))
loader = InMemoryLoader(load_dataset("fashion-mnist", "train", data_dir), 16, train=True, augment=True, seed=3,
                        rank=D.rank(), world_size=D.world_size())
loader.set_epoch(1)
x, y = next(loader.iter_from(2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
F.cross_entropy(ddp(x), y).backward()
grads = {"grad." + n: p.grad.clone() for n, p in model.named_parameters()}
opt.step()
if D.rank() == 0:
    save_file({**grads, **{"weight." + n: p.detach().clone() for n, p in model.named_parameters()}}, out)
try:  # SyncBatchNorm has no CPU kernels: asking for it under DDP on CPU is a clear error on every rank
    train(TrainConfig(steps=1, sync_bn=True, progress=False))
except ConfigError as e:
    print("REFUSED:", e)
D.shutdown()
"""


def test_ddp_gradients_equal_single_process_on_the_global_batch(fmnist_small, tmp_path):
    """One DDP step over 2 ranks (16 images each) == one step of 1 process on the same 32 images.

    The loader gives rank r the slice [16r, 16r+16) of global batch i, augmentation included, and
    DDP averages the two mean-loss gradients, which is the mean over 32. BatchNorm runs on running
    statistics (eval mode): in training mode each rank would normalise with its own 16-image
    statistics, a different function (use ``sync_bn`` on CUDA for that). The two sides differ only
    in float32 summation order: each parameter's gradient must agree to a relative (L2) error of
    1e-5 (measured: <= 2.2e-6, on gradients up to 18 in magnitude), weights after the step likewise.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    procs = [subprocess.Popen([sys.executable, "-c", _GRAD_WORKER, str(fmnist_small), str(out)], cwd=REPO,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e[-3000:]
        assert "REFUSED: sync_bn needs CUDA" in o, o

    torch.manual_seed(0)
    model = pnnh.create_model("resnet20", width=0.25)
    model.eval()
    loader = InMemoryLoader(load_dataset("fashion-mnist", "train", fmnist_small), 32, train=True, augment=True, seed=3)
    loader.set_epoch(1)
    x, y = next(loader.iter_from(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()

    ddp, weights = load_file(str(out)), dict(model.named_parameters())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    worst = max(rel(ddp["grad." + n], g) for n, g in grads.items())
    print(f"\nDDP vs single-process gradients: worst relative L2 error {worst:.1e}")
    for n, g in grads.items():
        assert g.norm() > 0, n  # every parameter got a gradient: the comparison is not vacuous
        assert rel(ddp["grad." + n], g) < 1e-5, n
        assert rel(ddp["weight." + n], weights[n].detach()) < 1e-5, n


def test_default_threads_split_cores_between_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dist_utils.default_threads() is None  # one process: torch's own default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun exports when it is unset
    assert dist_utils.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert dist_utils.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's explicit choice is kept
    assert dist_utils.default_threads() is None


def test_torchrun_restart_resumes_only_its_own_job(fmnist_small, tmp_path, monkeypatch):
    """A restarted worker (TORCHELASTIC_RESTART_COUNT > 0) resumes without --resume only a checkpoint
    written under the same TORCHELASTIC_RUN_ID; another job's run directory still needs --resume."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    cfg = TrainConfig(model="resnet20", model_kwargs={"width": 0.25}, data_dir=str(fmnist_small), train_subset=256,
                      test_subset=64, batch_size=64, steps=4, progress=False, out=str(tmp_path / "run"), threads=1)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    first = train(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = train(cfg)  # no resume flag: continues (here: re-evaluates) its own finished run
    assert again["test_acc"] == first["test_acc"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)


def test_resume_with_another_number_of_processes_is_refused(ddp_run, fmnist_small, tmp_path):
    import shutil

    run = shutil.copytree(ddp_run[0], tmp_path / "run")
    cfg = TrainConfig(model="resnet20", model_kwargs={"width": 0.25}, data_dir=str(fmnist_small), batch_size=32,
                      epochs=2, checkpoint_every=8, eval_batch_size=128, progress=False, out=str(run), resume=True)
    with pytest.raises(ConfigError, match=r"trained by 2 process\(es\), this run has 1"):
        train(cfg)
