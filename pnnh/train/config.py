"""Training configuration: one dataclass, loadable from YAML, validated with clear errors."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Union

import torch.nn as nn
import yaml

from ..errors import ConfigError

__all__ = ["TrainConfig", "load_config_file", "RESUME_KEYS"]


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
        if (self.epochs is None) == (self.steps is None):
            raise ConfigError("give exactly one of epochs or steps")
        for name in ("epochs", "steps", "batch_size", "eval_batch_size", "log_every", "eval_every", "train_subset",
                     "test_subset", "threads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v}")
        for name in ("lr", "weight_decay", "momentum", "label_smoothing"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")
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
        from ..models import model_label

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
            import difflib

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
RESUME_KEYS = ("model", "model_kwargs", "data", "train_subset", "epochs", "steps", "batch_size", "optimizer",
               "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup", "label_smoothing", "augment",
               "seed", "grad_clip")


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
                          f"got {type(value).__name__} {value!r}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of TrainConfig fields."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as e:  # one line: the problem and where, not YAML's multi-line excerpt
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}
