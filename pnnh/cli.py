"""The ``pnnh`` command line.

Every sub-command turns its flags into the same dataclass configs the Python API takes, so
``pnnh train`` and ``pnnh.train.train(TrainConfig(...))`` do the same thing. User errors
(:class:`pnnh.errors.PnnhError`) print one ``error:`` line and exit non-zero, no traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import ConfigError, PnnhError
from .utils import parse_kv

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


def _count_params(name: str) -> int | None:
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


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="pnnh")
def cli() -> None:
    """pnnh: deep plain (shortcut-free) nets, residual nets, and the PNNH paradigm."""


@cli.command("models")
@click.argument("pattern", required=False)
@click.option("--family", help="Only this family (plain, resnet, preact_resnet, pnnh, vit ...).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(pattern: str | None, family: str | None, as_json: bool) -> None:
    """List registered models matching PATTERN (a glob such as 'plain*')."""
    from .models import list_models, model_info

    rows = []
    for name in list_models(pattern, family=family):
        info = model_info(name)
        rows.append({"name": name, "family": info.family, "depth": info.depth, "layout": info.layout,
                     "params": _count_params(name), "doc": info.doc})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        raise ConfigError(f"no model matches {pattern!r}")
    click.echo(f"{'name':<24}{'family':<16}{'depth':>6}  {'layout':<9}{'params (1ch,10cls)':>19}")
    for r in rows:
        params = f"{r['params'] / 1e6:.3f}M" if r["params"] is not None else "?"
        click.echo(f"{r['name']:<24}{r['family']:<16}{r['depth'] or '':>6}  {r['layout'] or '':<9}{params:>19}")


_TRAIN_FLAGS = {  # flag -> TrainConfig field, only applied when given
    "model": "model", "data": "data", "data_dir": "data_dir", "epochs": "epochs", "steps": "steps",
    "batch_size": "batch_size", "lr": "lr", "seed": "seed", "out": "out", "optimizer": "optimizer",
    "schedule": "schedule", "weight_decay": "weight_decay", "label_smoothing": "label_smoothing",
    "warmup": "warmup", "train_subset": "train_subset", "test_subset": "test_subset", "threads": "threads",
    "device": "device", "amp": "amp", "checkpoint_every": "checkpoint_every", "eval_batch_size": "eval_batch_size",
}


@cli.command("train")
@click.option("--model", help="Registered model name (see `pnnh models`).")
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
@click.option("--eval-batch-size", type=int, help="Evaluation batch size [1000].")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--device", help="cpu, cuda or auto [cpu].")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), help="Mixed precision.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC memory format [on: 1.3x faster CPU training, docs/benchmarks.md].")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--sync-bn", is_flag=True, default=None, help="Under DDP on CUDA: SyncBatchNorm over the global batch.")
@click.option("--checkpoint-every", type=int, help="Also checkpoint every N steps (default: each epoch).")
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
    if "epochs" in values and "steps" in values and flags.get("steps") is not None and flags.get("epochs") is None:
        values.pop("epochs")  # a --steps flag overrides epochs from a config file
    if not values.get("out"):
        raise ConfigError("--out DIR is required (the run directory)")
    cfg = TrainConfig.from_dict(values).validate()
    distributed.init_from_env(cfg.device)
    is_main = distributed.rank() == 0  # read before shutdown, after which every process says rank 0
    try:
        summary = train(cfg)
    finally:
        distributed.shutdown()
    if is_main:
        click.echo(f"{summary['model']}: test acc {summary['test_acc']:.4f}, {summary['params'] / 1e6:.3f}M params, "
                   f"{summary['train_img_per_s']:.0f} train img/s, {summary['wall_s']:.1f} s -> {cfg.out}/summary.json")


@cli.command("compare")
@click.option("--models", "model_list", required=True, help="Comma-separated model names, e.g. plain56,resnet56.")
@click.option("--data", default="fashion-mnist", show_default=True, help="Dataset.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the dataset files are.")
@click.option("--epochs", type=int, help="Epochs per model.")
@click.option("--steps", type=int, help="Steps per model (instead of --epochs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory; one run per model inside.")
def compare_cmd(model_list, data, data_dir, epochs, steps, seed, out) -> None:
    """Train several models with the same recipe and print a side-by-side table.

    Finished runs are reused; an interrupted one resumes from its checkpoint.
    """
    from pathlib import Path

    from .train import TrainConfig, train

    if epochs is None and steps is None:
        raise ConfigError("give --epochs or --steps")
    rows = []
    for name in [m.strip() for m in model_list.split(",") if m.strip()]:
        run_dir = Path(out) / name
        click.echo(f"[{len(rows) + 1}] {name} -> {run_dir}")
        cfg = TrainConfig(model=name, data=data, data_dir=data_dir, epochs=epochs, steps=steps, seed=seed,
                          out=str(run_dir), resume=True)
        rows.append(train(cfg))
    click.echo(f"\n{'model':<14}{'params':>10}{'test acc':>10}{'train img/s':>13}{'wall s':>9}")
    for r in rows:
        click.echo(f"{r['model']:<14}{r['params'] / 1e6:>9.3f}M{r['test_acc'] * 100:>9.1f}%"
                   f"{r['train_img_per_s']:>13.0f}{r['wall_s']:>9.1f}")


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
