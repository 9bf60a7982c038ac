"""``pnnh train`` and ``pnnh compare``: flags -> :class:`pnnh.train.TrainConfig` -> :func:`pnnh.train.train`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import click
import torch

from ..errors import ConfigError, PeerError, PnnhError
from ..models import create_model, is_factory_spec, model_info, model_slug
from ..train import TrainConfig, distributed, load_config_file, train
from ..train.checkpoint import read_state
from ..train.engine import CKPT_NAME
from ..utils import atomic_write_text, parse_kv

__all__ = ["train_cmd", "compare_cmd"]


_TRAIN_FLAGS = {  # flag -> TrainConfig field, only applied when given
    "model": "model", "data": "data", "data_dir": "data_dir", "epochs": "epochs", "steps": "steps",
    "batch_size": "batch_size", "lr": "lr", "seed": "seed", "out": "out", "optimizer": "optimizer",
    "schedule": "schedule", "weight_decay": "weight_decay", "label_smoothing": "label_smoothing",
    "warmup": "warmup", "train_subset": "train_subset", "test_subset": "test_subset", "threads": "threads",
    "device": "device", "amp": "amp", "checkpoint_every": "checkpoint_every", "eval_batch_size": "eval_batch_size",
    "img_size": "img_size", "precise_bn": "precise_bn",
}


@click.command("train")
@click.option("--model", help="Registered model name (see `pnnh models`), or your own as path/to/file.py:factory "
              "or package.module:factory.")
@click.option("--data", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "imagefolder"]), help="Dataset.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the dataset files are.")
@click.option("--epochs", type=int, help="Training length in epochs.")
@click.option("--steps", type=int, help="Training length in optimizer steps (instead of --epochs).")
@click.option("--batch-size", type=int, help="Per-process batch size [128].")
@click.option("--lr", type=float, help="Peak learning rate [0.1].")
@click.option("--seed", type=int, help="Random seed [0].")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="SGD with Nesterov momentum, or AdamW [sgd].")
@click.option("--schedule", type=click.Choice(["onecycle", "cosine", "constant"]), help="LR schedule [onecycle].")
@click.option("--warmup", type=float, help="Warmup as a fraction of the run.")
@click.option("--weight-decay", type=float, help="Weight decay on conv/linear weights [5e-4].")
@click.option("--label-smoothing", type=float, help="Label smoothing [0].")
@click.option("--model-kwarg", "-k", "model_kwarg", multiple=True, metavar="KEY=VALUE",
              help="Model option, repeatable: -k width=2 -k init=dirac.")
@click.option("--augment/--no-augment", default=None,
              help="Random crop + flip on training batches [auto: on for runs of >= 10 epochs].")
@click.option("--train-subset", type=int, help="Train on the first N images only.")
@click.option("--test-subset", type=int, help="Evaluate on the first N test images only.")
@click.option("--img-size", type=int, help="Resize images to N x N when loading (bilinear), e.g. an ImageFolder of mixed sizes.")
@click.option("--eval-batch-size", type=int, help="Evaluation batch size [1000].")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--device", help="cpu, cuda or auto [cpu].")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), help="Mixed precision.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC memory format [on: 1.3x faster CPU training, docs/benchmarks.md].")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--sync-bn", is_flag=True, default=None, help="Under DDP on CUDA: SyncBatchNorm over the global batch.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N steps (default: each epoch).")
@click.option("--precise-bn", type=int, metavar="N",
              help="Re-estimate BatchNorm statistics on N training images at the end; 0: off [2048].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of TrainConfig fields.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (metrics, checkpoints, summary).")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its last checkpoint.")
@click.option("--no-progress", is_flag=True, default=None, help="No progress bar.")
def train_cmd(config_file, model_kwarg, augment, channels_last, compile_, sync_bn, resume, no_progress,
              **flags) -> None:
    """Train one model; writes metrics.jsonl, checkpoint.safetensors and summary.json to --out."""
    values: dict[str, Any] = load_config_file(config_file) if config_file else {}
    for flag, field in _TRAIN_FLAGS.items():
        if flags.get(flag) is not None:
            values[field] = flags[flag]
    if model_kwarg:
        base = values.get("model_kwargs") or {}
        if not isinstance(base, dict):
            raise ConfigError(f"model_kwargs must be a mapping of option: value, got {type(base).__name__} {base!r}")
        values["model_kwargs"] = {**base, **parse_kv(model_kwarg, "--model-kwarg")}
    if augment is not None:
        values["augment"] = augment
    if no_progress:
        values["progress"] = False
    if channels_last is not None:
        values["channels_last"] = channels_last
    for field, flag in (("compile", compile_), ("sync_bn", sync_bn), ("resume", resume)):
        if flag:
            values[field] = True
    if values.get("resume") and values.get("out"):  # the stored config fills in what is not given
        stored = _stored_config(values["out"])
        for given, belong in (("model", ("model_kwargs",)), ("epochs", ("steps",)), ("steps", ("epochs",))):
            if given in values:  # options of another model, the other way to give the length: not mixed in
                for k in belong:
                    stored.pop(k, None)
        values = {**stored, **values}
    if "epochs" in values and "steps" in values and flags.get("steps") is not None and flags.get("epochs") is None:
        values.pop("epochs")  # a --steps flag overrides epochs from a config file
    if not values.get("out"):
        raise ConfigError("--out DIR is required (the run directory)")
    cfg = TrainConfig.from_dict(values).validate()
    distributed.init_from_env(cfg.device)
    is_main = distributed.rank() == 0  # read before shutdown, after which every process says rank 0
    try:
        _user_error_of_earlier_attempt(cfg.out, is_main)
        summary = train(cfg)
    except PnnhError as e:
        if is_main:
            _note_user_error(cfg.out, e)
        if getattr(e, "collective", False):
            _say_before_peers_leave(e, is_main)
        raise
    finally:
        distributed.shutdown()
    if is_main:
        click.echo(f"{summary['model']}: test acc {summary['test_acc']:.4f}, {summary['params'] / 1e6:.3f}M params, "
                   f"{summary['train_img_per_s']:.0f} train img/s, {summary['wall_s']:.1f} s -> {cfg.out}/summary.json")


_USER_ERROR = ".user-error.json"


def _say_before_peers_leave(e: PnnhError, is_main: bool) -> None:
    """An error every rank raised together: rank 0 prints its one line, then every rank waits for
    the others. torchrun stops the remaining workers as soon as one exits, so a peer leaving first
    could cut rank 0 off before it has said (and noted) what is wrong."""
    if is_main and not getattr(e, "quiet", False):
        click.echo(f"error: {e}", err=True)
        sys.stderr.flush()
        e.quiet = True  # said: the entry point does not print it again
    distributed.barrier()


def _note_user_error(out: str, e: PnnhError) -> None:
    """Under torchrun with --max-restarts, record a user error: the restarted workers repeat it at
    once instead of running the same failing job again (torchrun restarts on any failure). The
    job's last attempt records nothing (no worker would read it)."""
    run_id = distributed.elastic_run_id()
    if not run_id or not distributed.elastic_attempts_left() or getattr(e, "quiet", False):
        return
    try:
        atomic_write_text(Path(out) / _USER_ERROR, json.dumps({"run_id": run_id, "error": str(e), "exit_code": e.exit_code}))
    except OSError:
        pass


def _user_error_of_earlier_attempt(out: str, is_main: bool) -> None:
    """In a worker torchrun restarted: raise the user error its job already hit (see _note_user_error).
    In the job's last attempt rank 0 removes the note once every rank has read it."""
    path = Path(out) / _USER_ERROR
    if not distributed.elastic_restart():
        if is_main:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        return
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(note, dict) and note.get("run_id") == distributed.elastic_run_id():
        if not distributed.elastic_attempts_left():
            distributed.barrier()
            if is_main:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        e = PnnhError(note.get("error", "")) if is_main else PeerError("")
        e.exit_code = int(note.get("exit_code", 2))
        e.collective = distributed.is_distributed()
        raise e


def _stored_config(out: str) -> dict[str, Any]:
    """The TrainConfig fields a run in ``out`` was started with (from its checkpoint), or {} for a
    directory without one: ``--resume`` continues a run without retyping its flags."""
    ckpt = Path(out) / CKPT_NAME
    if not ckpt.exists():
        return {}
    return {k: v for k, v in read_state(ckpt)["config"].items() if k not in ("out", "resume", "progress")}


@click.command("compare")
@click.option("--models", "model_list", required=True, help="Comma-separated model names, e.g. plain56,resnet56, "
              "or your own as path/to/file.py:factory.")
@click.option("--data", default="fashion-mnist", show_default=True, help="Dataset.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the dataset files are.")
@click.option("--epochs", type=int, help="Epochs per model.")
@click.option("--steps", type=int, help="Steps per model (instead of --epochs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lr", type=float, help="Peak learning rate [0.1].")
@click.option("--batch-size", type=int, help="Per-process batch size [128].")
@click.option("--model-kwarg", "-k", "model_kwarg", multiple=True, metavar="KEY=VALUE",
              help="Model option for every model, repeatable: -k width=0.5.")
@click.option("--train-subset", type=int, help="Train on the first N images only.")
@click.option("--test-subset", type=int, help="Evaluate on the first N test images only.")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory; one run per model inside.")
def compare_cmd(model_list, data, data_dir, epochs, steps, seed, lr, batch_size, model_kwarg, train_subset,
                test_subset, threads, out) -> None:
    """Train several models with the same recipe and print a side-by-side table.

    Every name and option is checked before the first run starts. Finished runs are reused; an
    interrupted one resumes from its checkpoint.
    """
    if epochs is None and steps is None:
        raise ConfigError("give --epochs or --steps")
    names = [m.strip() for m in model_list.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--models names no model ({model_list!r}); give comma-separated names, e.g. plain56,resnet56")
    if len(set(names)) < len(names):
        raise ConfigError(f"--models names a model twice ({model_list!r})")
    recipe = {k: v for k, v in dict(lr=lr, batch_size=batch_size, train_subset=train_subset, test_subset=test_subset,
                                     threads=threads).items() if v is not None}
    kwargs = parse_kv(model_kwarg, "--model-kwarg")
    cfgs = [TrainConfig(model=name, model_kwargs=kwargs, data=data, data_dir=data_dir, epochs=epochs, steps=steps,
                        seed=seed, out=str(Path(out) / model_slug(name)), resume=True, **recipe).validate() for name in names]
    for cfg in cfgs:  # unknown names and options fail here, before any training
        _check_model_options(cfg.model, cfg.model_kwargs)
    rows = []
    for cfg in cfgs:
        click.echo(f"[{len(rows) + 1}] {cfg.model_name} -> {cfg.out}")
        rows.append(train(cfg))
    click.echo(f"\n{'model':<14}{'params':>10}{'test acc':>10}{'train img/s':>13}{'wall s':>9}")
    for r in rows:
        click.echo(f"{r['model']:<14}{r['params'] / 1e6:>9.3f}M{r['test_acc'] * 100:>9.1f}%"
                   f"{r['train_img_per_s']:>13.0f}{r['wall_s']:>9.1f}")


def _check_model_options(name: str, kwargs: dict[str, Any]) -> None:
    """Build ``name`` with ``kwargs`` on the meta device (no memory, no init maths): raises the
    ConfigError a bad name or option would raise at training time."""
    if not is_factory_spec(name):
        model_info(name)  # a registered name: unknown ones fail with the closest names
    try:
        with torch.device("meta"):
            create_model(name, **kwargs)
    except PnnhError:
        raise
    except Exception:  # an init that cannot run on meta tensors: the real build checks it
        pass
