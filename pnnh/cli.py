"""The ``pnnh`` command line.

Every sub-command turns its flags into the same dataclass configs the Python API takes, so
``pnnh train`` and ``pnnh.train.train(TrainConfig(...))`` do the same thing. User errors
(:class:`pnnh.errors.PnnhError`) print one ``error:`` line and exit non-zero, no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import click

from . import __version__
from .errors import ConfigError, PeerError, PnnhError
from .utils import parse_kv

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


def _count_params(name: str) -> int | None:
    """Parameters of ``name`` at its defaults, built on the meta device (shapes only, no memory)."""
    import torch

    from .models import create_model

    try:
        with torch.device("meta"):
            m = create_model(name)
    except Exception:  # some init functions do not run on meta tensors
        try:
            m = create_model(name)
        except Exception:
            return None
    return sum(p.numel() for p in m.parameters())


class _ParamCache:
    """Parameter counts of registered models, kept in ``~/.cache/pnnh/param-counts.json`` (or
    ``$XDG_CACHE_HOME``) under a key made of the model sources and the torch version: building
    every model once takes minutes on a small CPU, reading the cache milliseconds."""

    def __init__(self) -> None:
        import hashlib
        from pathlib import Path

        import torch

        from . import models

        src = sorted(Path(models.__file__).parent.glob("*.py"))
        digest = hashlib.sha256(torch.__version__.encode())
        for p in src:
            digest.update(p.name.encode() + p.read_bytes())
        self.key = digest.hexdigest()[:16]
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = root / "pnnh" / "param-counts.json"
        self.counts: dict[str, int | None] = {}
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("key") == self.key:
                self.counts = dict(saved["counts"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        self.dirty = False

    def get(self, name: str) -> int | None:
        if name not in self.counts:
            self.counts[name] = _count_params(name)
            self.dirty = True
        return self.counts[name]

    def save(self) -> None:
        if not self.dirty:
            return
        from .utils import atomic_write_text

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"key": self.key, "counts": self.counts}))
        except OSError:  # a read-only home: counting again next time is fine
            pass


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="pnnh")
def cli() -> None:
    """pnnh: deep plain (shortcut-free) nets, residual nets, and the PNNH paradigm."""


@cli.command("models")
@click.argument("pattern", required=False)
@click.option("--family", help="Only this family (plain, resnet, preact_resnet, pnnh, vit ...).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(pattern: str | None, family: str | None, as_json: bool) -> None:
    """List registered models matching PATTERN (a glob such as 'plain*').

    Any CIFAR-layout depth builds by name (resnet14, pnnh26, ...), listed or not.
    """
    from .models import list_models, model_info

    if family is not None:
        families = sorted({model_info(n).family for n in list_models()})
        if family not in families:
            raise ConfigError(f"unknown family {family!r}; families: {', '.join(families)}")
    names = list_models(pattern, family=family)
    if not names:
        raise ConfigError(f"no model matches {pattern!r}" + (f" in family {family!r}" if family else ""))
    cache = _ParamCache()
    rows = []
    if not as_json:
        click.echo(f"{'name':<24}{'family':<16}{'depth':>6}  {'layout':<9}{'params (1ch,10cls)':>19}")
    try:
        for name in names:  # rows appear as they are counted: a first, uncached listing takes a while
            info = model_info(name)
            r = {"name": name, "family": info.family, "depth": info.depth, "layout": info.layout,
                 "params": cache.get(name), "doc": info.doc}
            rows.append(r)
            if not as_json:
                params = f"{r['params'] / 1e6:.3f}M" if r["params"] is not None else "?"
                click.echo(f"{r['name']:<24}{r['family']:<16}{r['depth'] or '':>6}  {r['layout'] or '':<9}{params:>19}")
    finally:
        cache.save()
    if as_json:
        click.echo(json.dumps(rows, indent=2))


_TRAIN_FLAGS = {  # flag -> TrainConfig field, only applied when given
    "model": "model", "data": "data", "data_dir": "data_dir", "epochs": "epochs", "steps": "steps",
    "batch_size": "batch_size", "lr": "lr", "seed": "seed", "out": "out", "optimizer": "optimizer",
    "schedule": "schedule", "weight_decay": "weight_decay", "label_smoothing": "label_smoothing",
    "warmup": "warmup", "train_subset": "train_subset", "test_subset": "test_subset", "threads": "threads",
    "device": "device", "amp": "amp", "checkpoint_every": "checkpoint_every", "eval_batch_size": "eval_batch_size",
    "img_size": "img_size", "precise_bn": "precise_bn",
}


@cli.command("train")
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
    from .train import TrainConfig, load_config_file, train
    from .train import distributed

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
        raise
    finally:
        distributed.shutdown()
    if is_main:
        click.echo(f"{summary['model']}: test acc {summary['test_acc']:.4f}, {summary['params'] / 1e6:.3f}M params, "
                   f"{summary['train_img_per_s']:.0f} train img/s, {summary['wall_s']:.1f} s -> {cfg.out}/summary.json")


_USER_ERROR = ".user-error.json"


def _note_user_error(out: str, e: PnnhError) -> None:
    """Under torchrun with --max-restarts, record a user error: the restarted workers repeat it at
    once instead of running the same failing job again (torchrun restarts on any failure)."""
    from pathlib import Path

    from .train import distributed
    from .utils import atomic_write_text

    run_id = distributed.elastic_run_id()
    if not run_id or not int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) or getattr(e, "quiet", False):
        return
    try:
        atomic_write_text(Path(out) / _USER_ERROR, json.dumps({"run_id": run_id, "error": str(e), "exit_code": e.exit_code}))
    except OSError:
        pass


def _user_error_of_earlier_attempt(out: str, is_main: bool) -> None:
    """In a worker torchrun restarted: raise the user error its job already hit (see _note_user_error)."""
    from pathlib import Path

    from .train import distributed

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
        e = PnnhError(note.get("error", "")) if is_main else PeerError("")
        e.exit_code = int(note.get("exit_code", 2))
        raise e


def _stored_config(out: str) -> dict[str, Any]:
    """The TrainConfig fields a run in ``out`` was started with (from its checkpoint), or {} for a
    directory without one: ``--resume`` continues a run without retyping its flags."""
    from pathlib import Path

    from .train.checkpoint import read_state
    from .train.engine import CKPT_NAME

    ckpt = Path(out) / CKPT_NAME
    if not ckpt.exists():
        return {}
    return {k: v for k, v in read_state(ckpt)["config"].items() if k not in ("out", "resume", "progress")}


@cli.command("compare")
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
    from pathlib import Path

    from .models import model_slug
    from .train import TrainConfig, train

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
    import torch

    from .errors import PnnhError
    from .models import create_model, is_factory_spec, model_info

    if not is_factory_spec(name):
        model_info(name)  # a registered name: unknown ones fail with the closest names
    try:
        with torch.device("meta"):
            create_model(name, **kwargs)
    except PnnhError:
        raise
    except Exception:  # an init that cannot run on meta tensors: the real build checks it
        pass


# --- sub-commands defined in their own modules: one import + add_command each ---------------------
# (keep imports of heavy modules inside the command functions; this section runs at every start)
from .analysis.command import diagnose_cmd  # noqa: E402

cli.add_command(diagnose_cmd)
from .bench.cli import bench_cmd, export_cmd  # noqa: E402

cli.add_command(bench_cmd)
cli.add_command(export_cmd)
from .report.ablate import ablate_cmd  # noqa: E402
cli.add_command(ablate_cmd)
from .report.cli import study_cmd  # noqa: E402

cli.add_command(study_cmd)
# --- end of sub-commands ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user errors into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="pnnh", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; continue a training run with --resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except PnnhError as e:
        if not getattr(e, "quiet", False):
            click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; continue a training run with --resume", err=True)
        sys.exit(130)
    except OSError as e:  # the environment failed us (disk full, permissions): say what, without a traceback
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
