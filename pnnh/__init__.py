"""pnnh: deep plain (shortcut-free) neural nets and the residual-connection family.

    >>> import pnnh
    >>> model = pnnh.create_model("plain56", num_classes=10, in_chans=1)
    >>> pnnh.list_models("resnet*")[:3]
    ['resnet8', 'resnet18', 'resnet20']
    >>> sum(p.numel() for p in model.parameters())
    852730
"""

from .version import __version__

from .errors import CheckpointError, ConfigError, DataError, DivergenceError, ModelNotFoundError, PnnhError
from .models import create_model, list_models, model_info, register_model
from .bench.fuse import deploy
from .models.convert import convert
from .train.checkpoint import load_model
from . import layers

__all__ = [
    "create_model", "list_models", "model_info", "register_model", "deploy", "convert", "load_model", "layers",
    "PnnhError", "ConfigError", "ModelNotFoundError", "DataError", "CheckpointError", "DivergenceError",
]
