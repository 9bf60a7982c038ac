"""Bad input through the command line, table-tested.

Each row runs ``pnnh train`` (``pnnh.cli.main``, in this process) with one thing wrong and checks:
a non-zero exit code, one ``error:`` line that says what is wrong, no traceback, and that a
finished run already on disk is byte-for-byte unchanged. One row runs a real subprocess whose
file-size limit makes the checkpoint write fail, as a full disk would.
"""

import errno
import gzip
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pnnh.cli import main
from pnnh.models import _registry

REPO = Path(__file__).resolve().parents[2]
GOOD = {"--model": "resnet20", "-k": "width=0.25", "--train-subset": "128", "--test-subset": "64",
        "--batch-size": "32", "--steps": "4", "--checkpoint-every": "2", "--threads": "1"}


def argv(data_dir: Path, out: Path, *extra: str, drop: tuple[str, ...] = (), resume: bool = True) -> list[str]:
    args = ["train", "--no-progress", "--data-dir", str(data_dir), "--out", str(out)]
    for k, v in GOOD.items():
        if k not in drop:
            args += [k, v]
    return args + (["--resume"] if resume else []) + list(extra)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def data(fmnist_small, tmp_path_factory) -> dict[str, Path]:
    """The real small Fashion-MNIST copy plus broken variants of it."""
    root = tmp_path_factory.mktemp("bad-data")
    dirs = {"good": fmnist_small}
    for name in ("missing", "truncated", "magic", "badgz"):
        dirs[name] = shutil.copytree(fmnist_small, root / name)
    (dirs["missing"] / "t10k-labels-idx1-ubyte").unlink()
    img = dirs["truncated"] / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-1000])
    img = dirs["magic"] / "train-images-idx3-ubyte"
    img.write_bytes(b"\x00\x00\x08\x01" + img.read_bytes()[4:])  # the labels' magic on the images file
    (dirs["badgz"] / "train-images-idx3-ubyte").unlink()
    (dirs["badgz"] / "train-images-idx3-ubyte.gz").write_bytes(b"<html>404 not found</html>")  # a failed download
    from PIL import Image

    for name, sizes in (("bomb", (15000, 8)), ("mixed", (28, 32))):  # ImageFolders: a 225-megapixel PNG; two sizes
        for split in ("train", "test"):
            for i, size in enumerate(sizes):
                (root / name / split / f"c{i}").mkdir(parents=True)
                Image.new("1" if size > 1000 else "L", (size, size)).save(root / name / split / f"c{i}" / "a.png")
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A finished run (4 steps, checkpoints at step 2 and 4) that no bad command may touch."""
    out = tmp_path_factory.mktemp("finished") / "run"
    try:
        main(argv(data["good"], out, resume=False))
    except SystemExit as e:
        assert e.code == 0
    assert (out / "summary.json").exists()
    return out


class Needs32px(nn.Module):
    """A model that only takes 32x32 inputs (a flatten + linear classifier)."""

    def __init__(self, num_classes=10, in_chans=1, img_size=None):
        super().__init__()
        self.fc = nn.Linear(in_chans * 32 * 32, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _config(tmp_path: Path, text: str | bytes) -> str:
    p = tmp_path / "config.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


# (id, extra arguments (a function of tmp_path and the data dirs), message regex, exit code[, flags to drop])
CASES = [
    ("unknown model", lambda t, d: ["--model", "resnet99"], r"unknown model 'resnet99'\. Did you mean: resnet", 2),
    ("unknown model option", lambda t, d: ["-k", "widht=2"], r"model 'resnet20' does not take that option.*widht", 2),
    ("bad model option value", lambda t, d: ["-k", "width=-1"], r"width must be positive, got -1", 2),
    ("unknown dataset (flag)", lambda t, d: ["--data", "mnist"], r"Invalid value for '--data': 'mnist' is not one of", 2),
    ("unknown dataset (config)", lambda t, d: ["--config", _config(t, "data: mnist\n")],
     r"unknown dataset 'mnist'; valid names: fashion-mnist", 2),
    ("data dir missing", lambda t, d: ["--data-dir", str(t / "nowhere")], r"Fashion-MNIST not found \(looked in: ", 2),
    ("data file missing", lambda t, d: ["--data-dir", str(d["missing"])],
     r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) missing from", 2),
    ("data file truncated", lambda t, d: ["--data-dir", str(d["truncated"])],
     r"train-images-idx3-ubyte is truncated: header dims \[1024, 28, 28\] need 802832 bytes, file has 801832", 2),
    ("data file wrong magic", lambda t, d: ["--data-dir", str(d["magic"])],
     r"not an IDX file of the expected kind: magic number 2049, expected 2051", 2),
    ("data file not gzip", lambda t, d: ["--data-dir", str(d["badgz"])], r"train-images-idx3-ubyte.gz is not a valid gzip", 2),
    ("image size the model cannot take", lambda t, d: ["--model", "needs32px"],
     r"model needs32px cannot take fashion-mnist images of size \(1, 28, 28\): mat1 and mat2 shapes", 2, ["-k"]),
    ("config unknown key", lambda t, d: ["--config", _config(t, "batchsize: 64\n")],
     r"unknown config key\(s\): batchsize \(did you mean batch_size\?\)", 2),
    ("config wrong type", lambda t, d: ["--config", _config(t, "momentum: fast\n")],
     r"momentum must be of type float, got str 'fast'", 2),
    ("config not YAML", lambda t, d: ["--config", _config(t, "lr: [0.1\n")], r"is not valid YAML at line 2, column 1", 2),
    ("config not a mapping", lambda t, d: ["--config", _config(t, "- lr\n")], r"must hold a mapping of option: value", 2),
    ("config file missing", lambda t, d: ["--config", str(t / "none.yaml")], r"config file not found", 2),
    ("config model_kwargs not a mapping", lambda t, d: ["--config", _config(t, "model_kwargs: 3\n")],
     r"model_kwargs must be a mapping of option: value, got int 3", 2),
    ("zero epochs", lambda t, d: ["--epochs", "0"], r"epochs must be a positive integer, got 0", 2, ["--steps"]),
    ("negative epochs", lambda t, d: ["--epochs", "-1"], r"epochs must be a positive integer, got -1", 2, ["--steps"]),
    ("zero steps", lambda t, d: ["--steps", "0"], r"steps must be a positive integer, got 0", 2),
    ("negative steps", lambda t, d: ["--steps", "-5"], r"steps must be a positive integer, got -5", 2),
    ("both epochs and steps", lambda t, d: ["--epochs", "1"], r"give exactly one of epochs or steps", 2),
    ("zero batch size", lambda t, d: ["--batch-size", "0"], r"batch_size must be a positive integer, got 0", 2),
    ("negative batch size", lambda t, d: ["--batch-size", "-3"], r"batch_size must be a positive integer, got -3", 2),
    ("batch larger than the data", lambda t, d: ["--batch-size", "4096"],
     r"has 128 samples, fewer than one global batch \(batch_size 4096", 2),
    ("zero train subset", lambda t, d: ["--train-subset", "0"], r"train_subset must be a positive integer, got 0", 2),
    ("zero threads", lambda t, d: ["--threads", "0"], r"threads must be a positive integer, got 0", 2),
    ("NaN learning rate", lambda t, d: ["--lr", "nan"], r"lr must be a finite number >= 0, got nan", 2),
    ("infinite learning rate", lambda t, d: ["--lr", "inf"], r"lr must be a finite number >= 0, got inf", 2),
    ("zero learning rate", lambda t, d: ["--lr", "0"], r"lr must be > 0", 2),
    ("warmup out of range", lambda t, d: ["--warmup", "1.5"], r"warmup is a fraction of the run in \[0, 1\), got 1.5", 2),
    ("learning rate that diverges", lambda t, d: ["--lr", "1e12", "--schedule", "constant", "--out", str(t / "div")],
     r"training diverged: .* (at|by) step \d+ .* last finite loss", 3),
    ("output dir not writable", lambda t, d: ["--out", str(_file(t) / "run")],
     r"output directory .*/a-file/run is not writable: (Not a directory|File exists)", 2),
    ("output dir is a file", lambda t, d: ["--out", str(_file(t))], r"Directory '.*a-file' is a file", 2),
    ("weights file where the checkpoint belongs",
     lambda t, d: _with_checkpoint(t, d, lambda r, c: shutil.copy(r / "model.safetensors", c)),
     r"checkpoint.safetensors holds weights only, not a resumable training checkpoint", 2),
    ("checkpoint without run state", lambda t, d: _with_checkpoint(t, d, _rewrite(drop_meta=("state",))),
     r"checkpoint .* is incomplete: it has no run state", 2),
    ("checkpoint without step", lambda t, d: _with_checkpoint(t, d, _rewrite(drop_state=("step",))),
     r"checkpoint .* is incomplete: its run state lacks or mangles step", 2),
    ("checkpoint without RNG state", lambda t, d: _with_checkpoint(t, d, _rewrite(drop_tensors=("rng.torch",))),
     r"checkpoint .* is incomplete: no rng.torch", 2),
    ("checkpoint without optimizer groups",
     lambda t, d: _with_checkpoint(t, d, _rewrite(drop_meta=("optim_param_groups",))),
     r"checkpoint .* is incomplete: no optim_param_groups", 2),
    ("option fixed by the name: plain", lambda t, d: ["-k", "plain=true"], r"resnet20 fixes plain in its name", 2),
    ("option fixed by the name: depth", lambda t, d: ["-k", "d=56"], r"resnet20 fixes d in its name", 2),
    ("option removing the shortcut", lambda t, d: ["-k", "shortcut=null"],
     r"shortcut=None removes the residual connection: use the plain twin", 2),
    ("num_classes as a model option", lambda t, d: ["-k", "num_classes=5"],
     r"model_kwargs: num_classes come from the dataset", 2),
    ("in_chans as a model option", lambda t, d: ["-k", "in_chans=3"], r"model_kwargs: in_chans come from the dataset", 2),
    ("model option of the wrong type", lambda t, d: ["-k", "width=abc"],
     r"model 'resnet20' cannot be built with width='abc'", 2),
    ("model option not YAML", lambda t, d: ["-k", "width=[1"], r"--model-kwarg 'width=\[1': the value is not valid YAML", 2),
    ("model too large for memory", lambda t, d: ["-k", "width=100000"],
     r"model 'resnet20' with width=100000.* does not fit in memory: .*can't allocate memory", 2),
    ("ViT dropout out of range", lambda t, d: ["--model", "vit_mini_d6", "-k", "drop_rate=-1"],
     r"drop_rate must be in \[0, 1\), got -1", 2, ["-k"]),
    ("config list where a number belongs", lambda t, d: ["--config", _config(t, "model_kwargs: {width: [1, 2]}\n")],
     r"model 'resnet20' cannot be built with width=\[1, 2\]", 2, ["-k"]),
    ("config not UTF-8", lambda t, d: ["--config", _config(t, b"lr: 0.1\nmodel: \xff\n")],
     r"config\.yaml is not UTF-8 text \(byte 0xff at offset 15\)", 2),
    ("config YAML anchor bomb", lambda t, d: ["--config", _config(t, BOMB)],
     r"expands to more than 100,000 values through YAML aliases", 2),
    ("config option name not text", lambda t, d: ["--config", _config(t, "1: 2\n")], r"option names must be text, got 1", 2),
    ("config AdamW betas of one number", lambda t, d: ["--config", _config(t, "optimizer: adamw\nbetas: [0.9]\n")],
     r"betas must be two numbers in \[0, 1\) .* got \[0.9\]", 2),
    ("config negative grad_clip", lambda t, d: ["--config", _config(t, "grad_clip: -1\n")],
     r"grad_clip is a maximum gradient norm: a finite number > 0 \(or unset\), got -1", 2),
    ("config momentum of 1 or more", lambda t, d: ["--config", _config(t, "momentum: 1.5\n")],
     r"momentum must be < 1, got 1.5", 2),
    ("seed beyond 64 bits", lambda t, d: ["--seed", "18446744073709551616"],
     r"seed must be an integer in \[0, 2\*\*63\), got 18446744073709551616", 2),
    ("negative seed", lambda t, d: ["--seed", "-1"], r"seed must be an integer in \[0, 2\*\*63\), got -1", 2),
    ("zero image size", lambda t, d: ["--img-size", "0"], r"img_size must be a positive integer, got 0", 2),
    ("ImageFolder decompression bomb", lambda t, d: ["--data", "imagefolder", "--data-dir", str(d["bomb"])],
     r"c0/a.png is too large to decode \(Image size \(225000000 pixels\) exceeds limit", 2),
    ("ImageFolder of mixed sizes", lambda t, d: ["--data", "imagefolder", "--data-dir", str(d["mixed"])],
     r"images differ in size: .* pass img_size=\.\.\. \(--img-size\)", 2),
]


def _with_checkpoint(t: Path, d: dict, make) -> list[str]:
    """A copy of the finished run whose checkpoint.safetensors is replaced by ``make(finished run)``."""
    run = shutil.copytree(d["finished"], t / "damaged")
    make(run, run / "checkpoint.safetensors")
    return ["--out", str(run)]


def _rewrite(drop_state=(), drop_tensors=(), drop_meta=()):
    """Rewrite a real checkpoint without some run-state entries, tensors or metadata entries."""

    def make(run: Path, ckpt: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(ckpt), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop_tensors}
        state = {k: v for k, v in json.loads(meta["state"]).items() if k not in drop_state}
        meta = {k: v for k, v in {**meta, "state": json.dumps(state)}.items() if k not in drop_meta}
        save_file(tensors, str(ckpt), metadata=meta)

    return make


BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", *"abcde"], "abcdef")) + f"lr: [{', '.join(['*f'] * 9)}]\n"  # 9**7 values in 300 bytes


def _file(t: Path) -> Path:
    f = t / "a-file"
    f.write_text("not a directory")
    return f


@pytest.mark.parametrize("extra,match,code,drop", [(*c[1:4], tuple(c[4]) if len(c) > 4 else ()) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_one_clear_error(extra, match, code, drop, data, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(_registry._MODELS, "needs32px",
                        _registry.ModelInfo("needs32px", "test", fn=lambda **kw: Needs32px(**kw)))
    before = snapshot(finished)
    exit_code, err = run_cli(argv(data["good"], finished, *extra(tmp_path, {**data, "finished": finished}), drop=drop),
                             capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert exit_code == code, err
    assert "Traceback" not in err
    assert sum(l.startswith(("error:", "Error:")) for l in lines) == 1, err
    assert len(lines) <= 3, err  # click's usage errors add a usage and a hint line
    assert max(len(l) for l in lines) < 600, err  # a line a person reads, whatever the input
    assert re.search(match, err), err
    assert snapshot(finished) == before  # the finished run on disk is untouched


def test_existing_run_and_resume_mismatches(data, finished, capsys):
    before = snapshot(finished)
    code, err = run_cli(argv(data["good"], finished, resume=False), capsys)
    assert code == 2 and "already holds a run; pass --resume" in err
    code, err = run_cli(argv(data["good"], finished, "--lr", "0.2"), capsys)
    assert code == 2 and "was configured differently (lr: checkpoint 0.1 vs now 0.2)" in err
    code, err = run_cli(argv(data["good"], finished, "--model", "resnet32"), capsys)
    assert code == 2 and "model: checkpoint 'resnet20' vs now 'resnet32'" in err
    code, err = run_cli(argv(data["good"], finished, "-k", "width=0.5"), capsys)
    assert code == 2 and "model_kwargs: checkpoint {'width': 0.25} vs now {'width': 0.5}" in err
    assert "Traceback" not in err and snapshot(finished) == before


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(p.read_bytes()[:5000]), r"is truncated or not a safetensors file"),
    (lambda p: torch.save({"model": {}}, p), r"refusing to load .* it is a pickle \(torch.save\) file"),
    (lambda p: p.write_bytes(b""), r"is empty or truncated"),
])
def test_damaged_checkpoint_is_refused_and_kept(damage, match, data, finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    damage(run / "checkpoint.safetensors")
    before = snapshot(run)
    code, err = run_cli(argv(data["good"], run), capsys)
    assert code == 2 and "Traceback" not in err
    assert re.search(match, err), err
    assert snapshot(run) == before  # the damaged file is left for inspection, nothing else written


def test_disk_full_during_checkpoint_keeps_last_good_one_and_resume_finishes(data, finished, tmp_path, capsys,
                                                                              monkeypatch):
    import pnnh.train.checkpoint as ck

    real_save, calls = ck.save_file, []

    def save_file(tensors, filename, metadata=None):  # the second checkpoint hits a full disk half-way
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", save_file)
    out = tmp_path / "run"
    code, err = run_cli(argv(data["good"], out), capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "error: could not write checkpoint" in err and "No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.safetensors", "metrics.jsonl"]  # no temp file
    assert ck.read_metadata(out / "checkpoint.safetensors")["state"]["step"] == 2  # the last good one

    monkeypatch.setattr(ck, "save_file", real_save)  # space freed: the same command resumes and finishes
    code, err = run_cli(argv(data["good"], out), capsys)
    assert code == 0, err
    assert "resuming" in err and "at step 2" in err
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((finished / "summary.json").read_text())
    assert (a["test_acc"], a["test_loss"]) == (b["test_acc"], b["test_loss"])


def test_real_write_failure_in_a_subprocess(data, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse the checkpoint write (EFBIG), as a full disk would."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "pnnh", *argv(data["good"], out)], cwd=REPO, preexec_fn=limit,
                       # no .pyc writes: the size limit would truncate them for every later import
                       env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: could not write checkpoint"), p.stderr
    assert "File too large" in p.stderr
    assert not list(out.glob(".*.tmp*")) and not (out / "checkpoint.safetensors").exists()


def test_resume_needs_only_the_run_directory(data, finished, tmp_path, capsys):
    """`pnnh train --out RUN --resume` continues with the configuration stored in RUN's checkpoint."""
    from pnnh.train import TrainConfig, train
    from pnnh.train.checkpoint import read_state

    cfg = TrainConfig.from_dict({**read_state(finished / "checkpoint.safetensors")["config"],
                                 "out": str(tmp_path / "run"), "resume": False})

    def stop(step):
        if step == 3:  # after the step-2 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop)
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming" in err and "at step 2 of 4" in err
    a = json.loads((tmp_path / "run" / "summary.json").read_text())
    b = json.loads((finished / "summary.json").read_text())
    assert (a["test_acc"], a["test_loss"], a["steps"]) == (b["test_acc"], b["test_loss"], b["steps"])
    code, err = run_cli(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.3"], capsys)
    assert code == 2 and "configured differently (lr: checkpoint 0.1 vs now 0.3)" in err  # a flag given still counts


# other commands: (id, argv (a function of tmp_path), message regex)
OTHER_CASES = [
    ("compare with no model name", lambda t: ["compare", "--models", ",", "--steps", "3", "--out", str(t / "cmp")],
     r"--models names no model \(','\)"),
    ("compare with an unknown second model",
     lambda t: ["compare", "--models", "resnet8,resnet99", "--steps", "3", "--out", str(t / "cmp")],
     r"unknown model 'resnet99'"),
    ("compare with an option fixed by a name",
     lambda t: ["compare", "--models", "resnet8,plain8", "-k", "plain=true", "--steps", "3", "--out", str(t / "cmp")],
     r"resnet8 fixes plain in its name"),
    ("compare with a negative learning rate",
     lambda t: ["compare", "--models", "resnet8", "--lr", "-1", "--steps", "3", "--out", str(t / "cmp")],
     r"lr must be a finite number >= 0, got -1"),
    ("compare naming a model twice",
     lambda t: ["compare", "--models", "resnet8,resnet8", "--steps", "3", "--out", str(t / "cmp")],
     r"--models names a model twice"),
    ("export at an opset torch cannot write",
     lambda t: ["export", "--model", "resnet8", "--onnx", str(t / "cmp" / "m.onnx"), "--opset", "1"],
     r"opset 1 is not one this torch can write \(7 to \d+\)"),
    ("models of an unknown family", lambda t: ["models", "--family", "foo"], r"unknown family 'foo'; families: .*pnnh"),
    ("models matching nothing", lambda t: ["models", "zzz*", "--family", "plain"],
     r"no model matches 'zzz\*' in family 'plain'"),
]


@pytest.mark.parametrize("args,match", [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_other_commands_bad_input_one_clear_error(args, match, tmp_path, capsys):
    code, err = run_cli(args(tmp_path), capsys)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert re.search(match, err), err
    assert not (tmp_path / "cmp").exists()  # refused before anything was trained or written


def test_bad_input_table_size():
    assert len(CASES) + len(OTHER_CASES) >= 40


def test_img_size_loads_an_imagefolder_of_mixed_sizes(data, tmp_path, capsys):
    """The option the mixed-size error names exists and works: images are resized at load time."""
    code, err = run_cli(["train", "--no-progress", "--data", "imagefolder", "--data-dir", str(data["mixed"]),
                         "--img-size", "24", "--model", "resnet8", "-k", "width=0.25", "--batch-size", "2",
                         "--steps", "1", "--threads", "1", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "complete"
    from pnnh.train.checkpoint import read_metadata

    assert read_metadata(tmp_path / "run" / "model.safetensors")["input_size"] == [1, 24, 24]


def test_model_option_in_exponent_form_is_a_number():
    from pnnh.utils import parse_kv

    assert parse_kv(["width=1e-9", "init=dirac", "drop_rate=.5", "tag=1e-9x"], "-k") == \
        {"width": 1e-9, "init": "dirac", "drop_rate": 0.5, "tag": "1e-9x"}  # YAML 1.1 alone reads 1e-9 as text
