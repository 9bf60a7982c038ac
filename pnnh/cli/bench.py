"""``pnnh bench`` and ``pnnh export``: :func:`pnnh.bench.run_bench` and :func:`pnnh.bench.export.export_onnx`."""

from __future__ import annotations

import json

import click

from ..errors import ConfigError
from ..models import create_model
from ..train.checkpoint import data_cfg, load_weights, read_metadata
from ..utils import atomic_write_text, parse_kv

__all__ = ["bench_cmd", "export_cmd"]


def _parse_kv(items):
    return parse_kv(items, "--model-kwarg")


@click.command("bench")
@click.option("--models", "model_list", required=True,
              help="Comma-separated NAME[:fused][:channels_last][:compile][:bf16|:fp16][:key=value...]; options "
                   "after a name apply to that model only (fused = pnnh.deploy, inference; key=value = a model "
                   "option), e.g. plain56,plain56:fused or pnnh56,pnnh56:path_param=init. NAME is a registered "
                   "model, your own as path/to/file.py:factory, or timm:ARCH / torchvision:ARCH (those "
                   "libraries' models, e.g. resnet50,timm:resnet50).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--input-size", type=int, help="Image height = width [the first model's default_cfg].")
@click.option("--in-chans", type=int, default=1, show_default=True, help="Input channels (3 for CIFAR/ImageNet).")
@click.option("--num-classes", type=int, default=10, show_default=True)
@click.option("--mode", type=click.Choice(["train", "infer", "both"]), default="train", show_default=True,
              help="train: forward+backward+SGD step; infer: eval-mode forward under inference_mode.")
@click.option("--channels-last", is_flag=True, help="NHWC memory format for model and input.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile every model (compiled during warm-up).")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), help="Mixed precision (autocast).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Alternating rounds (A B, B A, ...).")
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps per model per round.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed steps per model first.")
@click.option("--threads", type=int, help="torch intra-op threads [torch's default].")
@click.option("--model-kwarg", "-k", "model_kwarg", multiple=True, metavar="KEY=VALUE",
              help="Option for every model, repeatable: -k width=2 -k init=dirac.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement.")
@click.option("--no-peak", is_flag=True, help="Skip the dense matmul peak measurement.")
@click.option("--peak-size", type=int, default=2048, show_default=True, help="Matrix size of the matmul peak.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON result to this file.")
def bench_cmd(model_list, model_kwarg, no_memory, no_peak, as_json, out, compile_, **opts) -> None:
    """Throughput, latency, memory and FLOPs of models, measured side by side in alternating rounds.

    The ratio column is each model's throughput over the first model's, the median of per-round
    paired ratios. %peak is achieved FLOP/s over a dense matmul measured in every round.
    """
    from ..bench import BenchConfig, format_table, run_bench

    models = [m.strip() for m in model_list.split(",") if m.strip()]
    if not models:
        raise ConfigError("--models needs at least one model name")
    cfg = BenchConfig(models=models, compile=compile_, memory=not no_memory, peak=not no_peak,
                      model_kwargs=_parse_kv(model_kwarg), **opts)
    result = run_bench(cfg, log=lambda s: click.echo(s, err=True))
    text = json.dumps(result, indent=2)
    if out:
        atomic_write_text(out, text + "\n")
    click.echo(text if as_json else format_table(result))


@click.command("export")
@click.option("--model", "model_name", help="Registered model name, or your own as path/to/file.py:factory "
              "[from the checkpoint's metadata].")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="A pnnh checkpoint or weights file (safetensors) to load.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--input-size", type=int, help="Image height = width [the model's default_cfg].")
@click.option("--in-chans", type=int, help="Input channels [checkpoint metadata, else 1].")
@click.option("--num-classes", type=int, help="Classifier outputs [checkpoint metadata, else 10].")
@click.option("--model-kwarg", "-k", "model_kwarg", multiple=True, metavar="KEY=VALUE", help="Model option, repeatable.")
@click.option("--no-fuse", is_flag=True, help="Export the model as is, without folding BatchNorm (pnnh.deploy).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime parity check.")
def export_cmd(model_name, checkpoint, onnx_path, input_size, in_chans, num_classes, model_kwarg, no_fuse, opset,
               no_check) -> None:
    """Export a model (deployed: BatchNorm folded) to ONNX and check it against PyTorch in onnxruntime."""
    from ..bench.export import export_onnx

    kwargs = {}
    if checkpoint:
        meta = read_metadata(checkpoint)
        saved = meta.get("model")
        if model_name and saved and model_name != saved:
            raise ConfigError(f"--model {model_name} but {checkpoint} holds {saved}; drop --model or fix it")
        model_name = model_name or saved
        kwargs = dict(meta.get("model_kwargs") or {})
    if not model_name:
        raise ConfigError("give --model NAME (or a --checkpoint that records its model)")
    kwargs.update(_parse_kv(model_kwarg))
    for key, val in (("in_chans", in_chans), ("num_classes", num_classes)):
        if val is not None:
            kwargs[key] = val
    if input_size is not None:
        kwargs["img_size"] = input_size
    model = create_model(model_name, **kwargs)
    if checkpoint:  # the weights, and what they were trained on (recorded in the ONNX file)
        load_weights(checkpoint, model)
        model.default_cfg = {**getattr(model, "default_cfg", {}), **data_cfg(meta)}
    info = export_onnx(model, onnx_path, input_size=input_size, fused=not no_fuse, opset=opset, check=not no_check)
    check = (f"onnxruntime parity ok (max |diff| {info['max_abs_diff']:.2e})" if info["checked"]
             else "not checked")
    click.echo(f"{model_name} -> {info['path']} ({info['bytes'] / 1e6:.2f} MB, input 1x{'x'.join(map(str, info['input_shape']))}"
               f" dynamic batch, {'fused' if info['fused'] else 'unfused'}, opset {opset}); {check}")
    props = info["metadata"]
    if "classes" in props:
        click.echo(f"metadata_props: model, {len(props['classes'])} class names, mean/std of {props.get('data')}")
