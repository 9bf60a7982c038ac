"""Two processes never write one run directory: the second gets a clear error, the first is untouched."""

import subprocess
import sys

import pytest

from pnnh.errors import ConfigError
from pnnh.train import TrainConfig, train

HOLD = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"{os.getpid()}\\n"); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def _cfg(data_dir, out):
    return TrainConfig(model="resnet20", model_kwargs={"width": 0.25}, data_dir=str(data_dir), train_subset=64,
                       test_subset=32, batch_size=32, steps=2, threads=1, progress=False, out=str(out))


def test_second_writer_of_a_run_directory_is_refused_and_a_dead_holder_leaves_no_stale_lock(fmnist_small, tmp_path):
    pytest.importorskip("fcntl")
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another running pnnh process \(pid {holder.pid}\)"):
            train(_cfg(fmnist_small, out))
        assert not (out / "checkpoint.safetensors").exists()  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    summary = train(_cfg(fmnist_small, out))
    assert summary["status"] == "complete"
    # finished: the lock is released (another process can take it at once)
    probe = "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", probe, str(out / ".lock")]).returncode == 0
