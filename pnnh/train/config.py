"""Training configuration: one dataclass, loadable from YAML, validated with clear errors."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union

import torch.nn as nn
import yaml

from ..errors import ConfigError
from ..models import model_label
from ..utils import load_yaml

__all__ = ["TrainConfig", "load_config_file", "RESUME_KEYS"]


PRECISE_BN_IMAGES = 2048


@dataclass
class TrainConfig:
    """Everything that defines a training run. CLI flags and YAML files fill this in."""

    # what: a registered name, "path/to/file.py:factory", "package.module:factory", a factory
    # (called as create_model calls it) or an nn.Module (trained in place)
    model: Union[str, nn.Module, Callable[..., nn.Module]] = "resnet20"
    model_kwargs: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = None  # use the first N training images (quick runs, tests)
    test_subset: int | None = None
    img_size: int | None = None  # resize images to img_size x img_size at load time (ImageFolder of mixed sizes)
    # how long: exactly one of epochs / steps
    epochs: int | None = None
    steps: int | None = None
    # optimisation
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup: float | None = None  # fraction of steps; None: 0.25 for onecycle, 0.05 for cosine, 0 for constant
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    # precise BN: at the end, re-estimate BatchNorm running statistics as the average over this many
    # training images (un-augmented, in order) with the final weights; 0 turns it off. The running
    # averages lag behind weights that still move fast, which short runs evaluate (docs/design.md).
    precise_bn: int = PRECISE_BN_IMAGES
    # random crop with padding + horizontal flip, on tensors. None = auto: on for runs of at least
    # AUTO_AUGMENT_EPOCHS epochs. Short runs underfit, and augmentation (a regulariser) then costs
    # accuracy: resnet20, 1 epoch of Fashion-MNIST: 87.4% with, 89.7% without (docs/design.md).
    augment: bool | None = None
    # reproducibility and I/O
    seed: int = 0
    out: str | None = None
    resume: bool = False
    checkpoint_every: int = 0  # extra checkpoints every N steps (0: at each epoch end only)
    eval_every: int = 1  # evaluate every N epochs (and always at the end)
    log_every: int = 20
    progress: bool = True
    # speed
    device: str = "cpu"  # cpu | cuda | auto
    threads: int | None = None
    channels_last: bool = True  # NHWC: the same maths, ~1.3x faster CPU training (docs/benchmarks.md)
    compile: bool = False
    amp: str | None = None  # None | bf16 | fp16
    sync_bn: bool = False  # under DDP on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)

    def validate(self) -> "TrainConfig":
        """Check types and ranges; raise ConfigError naming the field."""
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            if f.name != "model":
                _check_type(f.name, getattr(self, f.name), hints[f.name])
        if not (isinstance(self.model, (str, nn.Module)) or callable(self.model)):
            raise ConfigError("model must be a registered name, 'path/to/file.py:factory', an nn.Module or a "
                              f"factory returning one, got {type(self.model).__name__}")
        if isinstance(self.model, nn.Module) and self.model_kwargs:
            raise ConfigError("model_kwargs apply when the engine builds the model; an nn.Module is already built")
        bad_keys = [k for k in self.model_kwargs if not isinstance(k, str) or not k.isidentifier()]
        if bad_keys:
            raise ConfigError(f"model_kwargs: option names are identifiers, got {_short(bad_keys[0])}")
        from_data = sorted({"num_classes", "in_chans"} & set(self.model_kwargs))
        if from_data:
            raise ConfigError(f"model_kwargs: {' and '.join(from_data)} come from the dataset; drop "
                              f"{'them' if len(from_data) > 1 else 'it'} (to use fewer classes, choose another dataset)")
        if (self.epochs is None) == (self.steps is None):
            raise ConfigError("give exactly one of epochs or steps")
        for name in ("epochs", "steps", "batch_size", "eval_batch_size", "log_every", "eval_every", "train_subset",
                     "test_subset", "threads", "img_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v}")
        for name in ("lr", "weight_decay", "momentum", "label_smoothing"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be < 1, got {self.momentum}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip is a maximum gradient norm: a finite number > 0 (or unset), got {self.grad_clip}")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {_short(list(self.betas))}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(f"schedule must be onecycle, cosine or constant, got {self.schedule!r}")
        if self.warmup is not None and not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of the run in [0, 1), got {self.warmup}")
        if self.label_smoothing >= 1:
            raise ConfigError("label_smoothing must be < 1")
        if self.amp not in (None, "bf16", "fp16"):
            raise ConfigError(f"amp must be bf16, fp16 or unset, got {self.amp!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every must be >= 0")
        if self.precise_bn < 0:
            raise ConfigError(f"precise_bn is a number of training images (0: off), got {self.precise_bn}")
        return self

    def augment_for(self, epochs: float) -> bool:
        """Whether a run of ``epochs`` epochs augments its training batches."""
        return self.augment if self.augment is not None else epochs >= AUTO_AUGMENT_EPOCHS

    @property
    def warmup_frac(self) -> float:
        if self.warmup is not None:
            return self.warmup
        return {"onecycle": 0.25, "cosine": 0.05, "constant": 0.0}[self.schedule]

    @property
    def model_name(self) -> str:
        """The model as a string: the name or spec given, or a label for a module or factory."""

        return model_label(self.model)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; a module or factory given as ``model`` appears as :attr:`model_name`."""
        d = asdict(dataclasses.replace(self, model=""))  # asdict would deep-copy a module
        d["model"] = self.model_name
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u for u in unknown]
            raise ConfigError(f"unknown config key(s): {', '.join(hints)}")
        d = dict(d)
        if "betas" in d and isinstance(d["betas"], list):
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


AUTO_AUGMENT_EPOCHS = 10

# Fields that must agree between a checkpoint and the config resuming it.
RESUME_KEYS = ("model", "model_kwargs", "data", "img_size", "train_subset", "epochs", "steps", "batch_size", "optimizer",
               "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup", "label_smoothing", "augment",
               "seed", "grad_clip")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay one readable line."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} characters)"


def _check_type(name: str, value: Any, hint: Any) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        raise ConfigError(f"{name} must not be empty")
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if expected is tuple and isinstance(value, list):
        return
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{name} must be of type {getattr(expected, '__name__', expected)}, "
                          f"got {type(value).__name__} {_short(value)}")


MAX_CONFIG_BYTES = 1_000_000
def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of TrainConfig fields."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} is {len(raw):,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        data = load_yaml(raw.decode("utf-8"), f"config file {p}")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except yaml.YAMLError as e:  # one line: the problem and where, not YAML's multi-line excerpt
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {p}: option names must be text, got {_short(bad[0])}")
    return {k.replace("-", "_"): v for k, v in data.items()}
