"""Checkpoints as single safetensors files, written atomically, loaded without executing code.

One file holds everything needed to continue a run exactly:

- ``model.<name>``: the model's state dict (weights and buffers);
- ``optim.<param index>.<key>``: the optimizer's per-parameter tensors;
- ``rng.torch`` (and ``rng.cuda.<i>``): random generator states;
- metadata (strings): ``format``, the model name and kwargs, the run config, the position
  (epoch, step, batch within epoch), the optimizer's param groups and scalar state, the
  training curve so far, and what the model was trained on (:data:`DATA_KEYS`: dataset, class
  names, input normalisation and size), all as JSON.

safetensors is a flat tensor format with a JSON header: loading it cannot run code, unlike a
pickle. A pickled file (``torch.save`` output) handed to :func:`load_checkpoint` is refused.
Writing goes to a temporary file in the same directory, is fsync'ed, then ``os.replace``'d over
the target, so the checkpoint on disk is always the last *complete* one. Reading goes through one
open file handle, so a reader racing a writer sees one whole version, never a mix of two.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes, save_file

from ..errors import CheckpointError
from ..models import create_model, upgrade_model_kwargs, upgrade_state_dict
from ..models.vit import saved_coder, saved_path_param
from ..utils import atomic_write_text

__all__ = ["save_checkpoint", "load_checkpoint", "read_metadata", "load_weights", "save_weights", "atomic_write_text",
           "read_state", "load_model", "data_cfg", "FORMAT", "DATA_KEYS"]

FORMAT = "pnnh-checkpoint-v1"
#: What a run's files record about its data: the dataset name, class names by output index, the
#: per-channel mean/std that normalise [0, 1] pixels, and the input size (C, H, W).
DATA_KEYS = ("data", "classes", "mean", "std", "input_size")


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write (disk full) as SafetensorError
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("I/O error: ")[-1]
        raise CheckpointError(f"could not write checkpoint {path}: {why}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _plain_tensors(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, make contiguous, and un-share storage (safetensors refuses shared tensors)."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        elif key is not None:
            seen.add(key)
        out[prefix + k] = t
    return out


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, Any] | None = None) -> None:
    """Save only the model state dict (deployable weights) with model name/kwargs metadata."""
    meta = {"format": FORMAT, "kind": "weights", **_model_meta(model), **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    _atomic_save_tensors(_plain_tensors("model.", model.state_dict()), Path(path), meta)


def _model_meta(model: nn.Module) -> dict[str, str]:
    return {"model": json.dumps(getattr(model, "pnnh_name", type(model).__name__)),
            "model_kwargs": json.dumps(getattr(model, "pnnh_kwargs", {}))}


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
    """Atomically write a full training checkpoint. ``state`` is JSON-serialisable run state;
    ``metadata`` adds JSON-serialisable entries (such as :data:`DATA_KEYS`)."""
    tensors = _plain_tensors("model.", model.state_dict())
    meta: dict[str, str] = {"format": FORMAT, "kind": "checkpoint", **_model_meta(model),
                            **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    if optimizer is not None:
        osd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in osd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(idx), {})[key] = val
        meta["optim_param_groups"] = json.dumps(osd["param_groups"])
        meta["optim_scalars"] = json.dumps(scalars)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta["state"] = json.dumps(state)
    _atomic_save_tensors(tensors, Path(path), meta)


def _check_not_pickle(path: Path, head: bytes) -> None:
    # A safetensors file is an 8-byte header length then a JSON header ('{'). Check that first: the
    # length's low byte can itself be 0x80 or the pair "PK" (e.g. a 18,304-byte header).
    looks_safetensors = len(head) > 8 and head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle (torch.save) file, which can run arbitrary code when loaded. "
            "pnnh checkpoints are safetensors files; convert trusted weights with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors').")
    if len(head) < 8:
        raise CheckpointError(f"checkpoint {path} is empty or truncated")


def _read(path: Path, header_only: bool) -> tuple[dict[str, Any], bytes | None]:
    """(decoded safetensors header, whole file or None) read through ONE open file handle.

    One handle matters: a run replaces its checkpoint with ``os.replace`` while a reader (a resume,
    a monitor, the crash test) may be looking. Opening the path twice, as ``safe_open`` does for
    PyTorch (header, then ``UntypedStorage.from_file`` by name), can pair one file's header with the
    other file's bytes. An open handle keeps its inode, so what we read is one complete file.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            _check_not_pickle(path, head)
            (n,) = struct.unpack("<Q", head[:8])
            size = os.fstat(f.fileno()).st_size
            if n > 100_000_000 or size < 8 + n:
                raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file")
            f.seek(0)
            data = f.read(8 + n) if header_only else f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: bad header ({e})") from None
    return header, (None if header_only else data)


def _decode_metadata(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    raw = header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a pnnh checkpoint (format {raw.get('format')!r})")
    try:
        return {k: (v if k in ("format", "kind") else json.loads(v)) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: bad metadata ({e})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded JSON metadata of a pnnh safetensors file (cheap: reads the header only)."""
    path = Path(path)
    header, _ = _read(path, header_only=True)
    return _decode_metadata(path, header)


STATE_KEYS = ("config", "step", "curve", "train_seconds", "train_images", "wall_seconds")


def read_state(path: str | Path) -> dict[str, Any]:
    """The run ``state`` of a resumable checkpoint (header only), checked to hold what a resume reads."""
    path = Path(path)
    meta = read_metadata(path)
    _check_resumable_meta(meta, path, STATE_KEYS)
    return meta["state"]


def _check_resumable_meta(meta: dict[str, Any], path: Path, keys: tuple[str, ...] = ()) -> None:
    if meta.get("kind") != "checkpoint":
        raise CheckpointError(f"{path} holds weights only, not a resumable training checkpoint")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no run state")
    if not keys:
        return
    missing = [k for k in keys if k not in state]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["step"], int):
        raise CheckpointError(f"checkpoint {path} is incomplete: its run state lacks or mangles "
                              f"{', '.join(missing) or 'config/step'}")


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of one and the same file version."""
    header, data = _read(path, header_only=False)
    meta = _decode_metadata(path, header)
    try:
        return meta, load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from None


def _load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    sd = upgrade_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    own = model.state_dict()
    saved_name, own_name = meta.get("model"), getattr(model, "pnnh_name", None)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if saved_name and own_name and saved_name != own_name and not (missing or unexpected or shape):
        # e.g. resnet20 and plain20 (option-A shortcuts have no weights): same tensors, another network
        raise CheckpointError(f"checkpoint {path} was saved from model {saved_name!r}, not {own_name!r}: "
                              "the weights have the same names and shapes but the architectures differ")
    if missing or unexpected or shape:
        what = f"checkpoint {path} was saved from model {saved_name!r}"
        if own_name and saved_name != own_name:
            what += f", not {own_name!r}"
        details = []
        if missing:
            details.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        if shape:
            details.append(f"{len(shape)} shape mismatch(es) e.g. {shape[0]}")
        if saved_coder(unexpected) == "sublayer" and own_name and own_name.startswith("pnnh_vit"):
            details.append("the checkpoint holds a sub-layer PNNH ViT: build the model with coder='sublayer'")
        saved_path = saved_path_param(sd)
        if own_name and own_name.startswith("pnnh_vit") and saved_path not in (None, saved_path_param(own)):
            where = "in the parametrisation" if saved_path == "param" else "in the init only"
            details.append(f"the checkpoint's coders keep their path {where}: build the model with "
                           f"path_param={saved_path!r}")
        if missing and all(k.rsplit(".", 1)[-1] in ("path", "alpha", "beta") for k in missing):
            details.append("the checkpoint's PNNH layers keep the internal path in the init only: build the "
                           "model with path_param='init'")
        raise CheckpointError(f"{what}: architectures differ ({'; '.join(details)})")
    model.load_state_dict(sd)


def load_weights(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load model weights from a pnnh checkpoint or weights file into ``model``; returns metadata."""
    path = Path(path)
    meta, tensors = _read_checkpoint(path)
    _load_model_state(model, tensors, meta, path)
    return meta


def data_cfg(meta: dict[str, Any]) -> dict[str, Any]:
    """The :data:`DATA_KEYS` entries of a file's metadata, plus timm's names for the classes:
    ``label_names`` (the class names) and ``num_classes``."""
    cfg = {k: meta[k] for k in DATA_KEYS if k in meta}
    if isinstance(cfg.get("classes"), list):
        cfg["label_names"] = list(cfg["classes"])
        cfg["num_classes"] = len(cfg["classes"])
    return cfg


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a pnnh weights file or checkpoint holds, load its weights, in eval mode.

    The architecture comes from the file's metadata (registered name and options, as
    ``create_model`` stamped them). A run's ``model.safetensors`` and ``checkpoint.safetensors``
    also record what the model expects and predicts (:func:`data_cfg`); it lands in
    ``model.pretrained_cfg`` (the same dict as ``model.default_cfg``, as in timm): ``classes`` and
    ``label_names`` (names, by output index), ``num_classes``, ``mean``/``std`` (per-channel
    normalisation of [0, 1] pixels), ``input_size`` (C, H, W) and ``data`` (the dataset).
    """

    path = Path(path)
    header, _ = _read(path, header_only=True)
    meta = _decode_metadata(path, header)
    name, kwargs = meta.get("model"), meta.get("model_kwargs")
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{path} does not record which model it holds (no model name and options)")
    keys = [k[len("model."):] for k in header if k.startswith("model.")]
    model = create_model(name, **upgrade_model_kwargs(name, kwargs, keys))
    load_weights(path, model)
    cfg = dict(getattr(model, "default_cfg", None) or {})
    cfg.update(data_cfg(meta))
    model.default_cfg = model.pretrained_cfg = cfg
    return model.to(device).eval()


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore model, optimizer and RNG from a checkpoint; return its run ``state``."""
    path = Path(path)
    meta, tensors = _read_checkpoint(path)
    _check_resumable_meta(meta, path)
    missing = [k for k in ("rng.torch",) if k not in tensors]
    missing += [k for k in ("optim_param_groups",) if optimizer is not None and k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {' or '.join(missing)}")
    _load_model_state(model, tensors, meta, path)
    if optimizer is not None:
        groups = meta["optim_param_groups"]
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        for idx, sc in meta.get("optim_scalars", {}).items():
            state.setdefault(int(idx), {}).update(sc)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"optimizer state in {path} does not fit this run: {e}") from None
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    return meta["state"]
