"""``pnnh diagnose``: run :func:`pnnh.analysis.run_diagnostics` on a model (registered, or the user's own
``file.py:factory``) and write JSON + PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from ..errors import ConfigError
from ..models import create_model, model_slug
from ..train.checkpoint import load_weights, read_metadata
from ..train.device import resolve_device
from ..utils import atomic_write_text, parse_kv

__all__ = ["diagnose_cmd"]


@click.command("diagnose")
@click.option("--model", "model_names", help="Registered model name, or your own as path/to/file.py:factory or "
              "package.module:factory; several, comma-separated, are also overlaid in comparison.png. Optional "
              "with --checkpoint (its metadata names the model).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="pnnh weights or checkpoint (.safetensors) to diagnose instead of a freshly initialised model; "
              "repeat it to diagnose several trained models side by side (comparison.png).")
@click.option("--model-kwarg", "-k", "model_kwarg", multiple=True, metavar="KEY=VALUE",
              help="Model option for a fresh model, repeatable: -k width=2 -k init=dirac.")
@click.option("--data", default="fashion-mnist", show_default=True,
              type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "imagefolder"]))
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the dataset files are.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--images", default=512, show_default=True, type=int, help="Random images from the split.")
@click.option("--probes", default="auto", show_default=True, type=click.Choice(["auto", "blocks", "layers"]),
              help="Block outputs, or every activation (auto: layers for plain nets, blocks otherwise).")
@click.option("--norm-stats", default="auto", show_default=True, type=click.Choice(["auto", "batch", "running"]),
              help="BatchNorm statistics: of the diagnostic batch (auto at init) or the stored running ones.")
@click.option("--lesion/--no-lesion", default=None, help="Lesion study [default: with --checkpoint, or for a model whose BatchNorm statistics show training].")
@click.option("--lesion-images", type=int, help="Lesion study on the first N images only (it costs ~2 forwards per block).")
@click.option("--gradients/--no-gradients", default=True, show_default=True, help="Shattered-gradients measurement.")
@click.option("--dists-vgg", type=click.Path(dir_okay=False), help="Local VGG16 weights, enables DISTS.")
@click.option("--dists-weights", type=click.Path(dir_okay=False), help="Local DISTS alpha/beta weights.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the image sample, model init and shuffles.")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--no-plots", is_flag=True, help="Only diagnostics.json.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
def diagnose_cmd(model_names, checkpoints, model_kwarg, data, data_dir, split, images, probes, norm_stats, lesion,
                 lesion_images, gradients, dists_vgg, dists_weights, seed, threads, device, no_plots, out) -> None:
    """Dissipating inputs, surviving neurons, shattered gradients, signal propagation and lesions.

    Writes OUT/diagnostics.json and PNG plots (one model), or OUT/<model>/... and OUT/comparison.png
    (several models or checkpoints). Without --checkpoint the model is freshly initialised (seeded
    by --seed).
    """
    from ..analysis.diagnose import DiagnoseConfig, load_images, run_diagnostics, summarize
    from ..analysis.plots import plot_comparison, plot_diagnostics

    if threads:
        torch.set_num_threads(threads)
    names = [m.strip() for m in (model_names or "").split(",") if m.strip()]
    # (model name, checkpoint or None, its metadata or None), one per model to diagnose
    if checkpoints:
        if names and (len(names) > 1 or len(checkpoints) > 1):
            raise ConfigError("each --checkpoint names its model; give --model only with a single --checkpoint")
        metas = [read_metadata(c) for c in checkpoints]
        items = [(names[0] if names else m["model"], c, m) for c, m in zip(checkpoints, metas)]
    else:
        items = [(n, None, None) for n in names]
    if not items:
        raise ConfigError("give --model NAME (or --checkpoint PATH)")
    labels = [name for name, _, _ in items]
    if checkpoints and len(set(labels)) < len(labels):  # the same model twice: label by the checkpoint's folder
        labels = [f"{name}:{Path(c).parent.name or Path(c).stem}" for name, c, _ in items]
    if len(set(labels)) < len(labels):
        labels = [f"{label}:{i}" for i, label in enumerate(labels)]
    dists = None
    if dists_vgg or dists_weights:
        from ..analysis.dists import load_dists

        dists = load_dists(dists_vgg, dists_weights)

    dev = resolve_device(device)
    x, y, ds = load_images(data, images, data_dir, split=split, seed=seed)
    x, y = x.to(dev), y.to(dev)
    kwargs = parse_kv(model_kwarg, "--model-kwarg")
    if lesion is None and checkpoints:
        lesion = True  # a checkpoint holds trained weights, with or without BatchNorm to show it
    config = DiagnoseConfig(probes=probes, norm_stats=norm_stats, lesion=lesion, lesion_images=lesion_images,
                            gradients=gradients, seed=seed)
    results = {}
    out_dir = Path(out)
    for label, (name, checkpoint, meta) in zip(labels, items):
        torch.manual_seed(seed)
        if meta is not None:
            mk = {**meta.get("model_kwargs", {}), **kwargs}
            model = create_model(name, **mk)
            load_weights(checkpoint, model)
        else:
            model = create_model(name, num_classes=ds.num_classes, in_chans=ds.in_chans, **kwargs)
        want = getattr(model, "in_chans", None)
        if want is not None and want != x.shape[1]:
            raise ConfigError(f"{name} takes {want}-channel images but {data} has {x.shape[1]} channels")
        click.echo(f"[{label}] {'checkpoint ' + checkpoint if checkpoint else 'at init'}, {x.shape[0]} {data} {split} images")
        model = model.to(dev)
        res = run_diagnostics(model, x, y, config, dists=dists, log=lambda s: click.echo(f"  {s}"))
        res["data"] = {"name": data, "split": split, "images": int(x.shape[0]), "seed": seed}
        if checkpoint:
            res["checkpoint"] = str(checkpoint)
        target = out_dir if len(items) == 1 else out_dir / model_slug(label)
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target / "diagnostics.json", json.dumps(res, indent=1))
        written = [] if no_plots else plot_diagnostics(res, target)
        click.echo(summarize(res))
        click.echo(f"  -> {target / 'diagnostics.json'}" + (f" and {len(written)} plots" if written else ""))
        results[label] = res
    if len(results) > 1 and not no_plots:
        for p in plot_comparison(results, out_dir):
            click.echo(f"comparison -> {p}")
