"""Training: configuration, the engine loop, checkpoints, distributed helpers."""

from .checkpoint import load_checkpoint, load_weights, read_metadata, save_checkpoint, save_weights
from .config import TrainConfig, load_config_file
from .engine import evaluate, train

__all__ = ["TrainConfig", "load_config_file", "train", "evaluate", "save_checkpoint", "load_checkpoint",
           "load_weights", "save_weights", "read_metadata"]
