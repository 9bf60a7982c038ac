"""ONNX export with an onnxruntime parity check.

:func:`export_onnx` writes a model (by default its :func:`~pnnh.bench.fuse.deploy`-ed form:
BatchNorm folded, a plain net as a pure conv-ReLU chain) to an ONNX file with a dynamic batch
dimension, then runs the file in onnxruntime on a random batch and compares the logits with the
*unfused* PyTorch model in eval mode. A mismatch larger than ``atol + rtol * |reference|`` raises
:class:`ExportError`, so a file that is written has been checked.

The file's ``metadata_props`` record the model (registered name and options) and, for a model
loaded from a run (:func:`pnnh.load_model`), what it was trained on: the dataset, the class names
by output index, the per-channel mean/std that normalise [0, 1] pixels, and the input size
(:func:`onnx_metadata`; every value is JSON text, read back by :func:`read_onnx_metadata`).

``onnx`` and ``onnxruntime`` are the optional extra ``pnnh[export]``; without onnxruntime the
export fails with an install hint unless ``check=False``, without onnx the file carries no metadata.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, PnnhError
from ..train.checkpoint import DATA_KEYS
from .fuse import deploy

__all__ = ["export_onnx", "ExportError", "onnxruntime_available", "onnx_metadata", "read_onnx_metadata"]

INSTALL_HINT = "install the export extra: pip install 'pnnh[export]' (onnx, onnxruntime)"


class ExportError(PnnhError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _input_shape(model: nn.Module, input_size: int | None) -> tuple[int, int, int]:
    """(C, H, W) from ``default_cfg``; for another module, its first conv's input channels and ``input_size``."""
    shape = getattr(model, "default_cfg", {}).get("input_size")
    if shape is None:
        if input_size is None:
            raise ConfigError(f"{type(model).__name__} records no default_cfg['input_size']: give the input size "
                              "(--input-size)")
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        shape = (getattr(model, "in_chans", None) or (conv.in_channels if conv is not None else 3), input_size, input_size)
    c, h, w = shape
    if input_size is not None:
        h = w = input_size
    return int(c), int(h), int(w)


def export_onnx(model: nn.Module, path: str | Path, *, input_size: int | None = None, fused: bool = True,
                opset: int = 17, check: bool = True, batch_size: int = 4, atol: float = 1e-4,
                rtol: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` and (``check``) verify it in onnxruntime.

    Args:
        model: a pnnh model (any ``nn.Module`` with ``default_cfg["input_size"]``, or give ``input_size``).
        path: the ``.onnx`` file to write (parent directories are created).
        input_size: image height/width; default from ``model.default_cfg``.
        fused: export :func:`deploy(model) <pnnh.bench.fuse.deploy>` (BatchNorm folded) instead of the model.
        opset: ONNX opset version.
        check: run the file in onnxruntime and compare with the unfused eval-mode model.
        batch_size: batch of the parity check (the exported batch dimension is dynamic).

    Returns:
        ``{"path", "fused", "opset", "input_shape", "max_abs_diff", "checked", "bytes", "metadata"}``
        (``metadata``: what the file's ``metadata_props`` hold, decoded; empty without ``onnx``).
    """
    if check and not onnxruntime_available():
        raise ExportError(f"the onnxruntime parity check needs onnxruntime: {INSTALL_HINT}, or pass check=False")
    lo, hi = opset_range()
    if not lo <= opset <= hi:
        raise ExportError(f"opset {opset} is not one this torch can write ({lo} to {hi}); the default is 17")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        shape = _input_shape(model, input_size)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, *shape, generator=g)
        # portable graph: BN folded, but plain Conv/Relu nodes (onnxruntime fuses those itself)
        target = deploy(model, fuse_relu=False, channels_last=False) if fused else model
        with torch.no_grad():
            reference = model(x)
        _export(target, x[:1], path, opset)
    finally:
        model.train(was_training)
    metadata = onnx_metadata(model, shape)
    if importlib.util.find_spec("onnx") is not None:
        _write_metadata(path, metadata)
    else:
        metadata = {}
    out = {"path": str(path), "fused": fused, "opset": opset, "input_shape": list(shape), "checked": False,
           "max_abs_diff": None, "bytes": path.stat().st_size, "metadata": metadata}
    if check:
        got = torch.from_numpy(run_onnx(path, x.numpy()))
        if got.shape != reference.shape:
            raise ExportError(f"onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(reference.shape)}")
        diff = (got - reference).abs()
        out["max_abs_diff"] = float(diff.max())
        bad = diff > atol + rtol * reference.abs()
        if bad.any():
            raise ExportError(f"onnxruntime disagrees with PyTorch: max |diff| {out['max_abs_diff']:.3g} "
                              f"(tolerance {atol:g} + {rtol:g}*|y|) on {int(bad.sum())} of {bad.numel()} outputs")
        out["checked"] = True
    return out


def onnx_metadata(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """What an exported file records: ``model`` and ``model_kwargs`` (as ``create_model`` stamped
    them), ``input_size`` (the exported C, H, W), and the model's ``default_cfg`` entries of
    :data:`~pnnh.train.checkpoint.DATA_KEYS` (``data``, ``classes``, ``mean``, ``std``) where it has them."""
    cfg = getattr(model, "default_cfg", None) or {}
    meta: dict[str, Any] = {"model": getattr(model, "pnnh_name", type(model).__name__),
                            "model_kwargs": getattr(model, "pnnh_kwargs", {})}
    meta.update({k: cfg[k] for k in DATA_KEYS if k in cfg and k != "input_size"})
    meta["input_size"] = list(input_shape)
    return json.loads(json.dumps(meta))  # plain JSON types, as read back


def _write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, each value decoded from JSON (text that is not JSON as is)."""
    import onnx

    out: dict[str, Any] = {}
    for entry in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except ValueError:
            out[entry.key] = entry.value
    return out


def opset_range() -> tuple[int, int]:
    """The ONNX opsets this torch's exporter can write (inclusive)."""
    try:
        from torch.onnx import _constants

        return _constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET
    except (ImportError, AttributeError):
        return 7, 23


def _failed(e: Exception) -> ExportError:
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
    first = first if len(first) <= 200 else first[:200] + "..."
    return ExportError(f"ONNX export failed: {type(e).__name__}: {first}")


@contextlib.contextmanager
def _output_kept_on_success():
    """Hold what the exporter writes to file descriptors 1 and 2 (its C++ side dumps a whole graph
    when an op has no ONNX form): replayed after a success, dropped after a failure, whose error
    says why in one line."""

    streams = ((1, sys.stdout), (2, sys.stderr))
    held = [tempfile.TemporaryFile() for _ in streams]
    saved = []
    for (fd, stream), tmp in zip(streams, held):
        stream.flush()
        saved.append(os.dup(fd))
        os.dup2(tmp.fileno(), fd)
    ok = False
    try:
        yield
        ok = True
    finally:
        for (fd, stream), tmp, old in zip(streams, held, saved):
            stream.flush()
            os.dup2(old, fd)
            os.close(old)
            if ok:
                tmp.seek(0)
                stream.write(tmp.read().decode(errors="replace"))
            tmp.close()


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with _output_kept_on_success():
        _export_quiet(model, example, path, opset)


def _export_quiet(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and constant-folding chatter of the exporters
        try:
            # The TorchScript-based exporter: fast (well under a second for our nets) and needs no
            # extra package. Newer torch may drop it; then use the torch.export-based one.
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
            return
        except TypeError:  # a torch without the dynamo= switch
            pass
        except Exception as e:
            raise _failed(e) from None
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **kwargs)
        except Exception as e:
            raise _failed(e) from None


def run_onnx(path: str | Path, x) -> Any:
    """Run an exported file in onnxruntime (CPU) on the numpy array ``x``; return the first output."""
    if not onnxruntime_available():
        raise ExportError(INSTALL_HINT)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
