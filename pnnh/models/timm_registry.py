"""pnnh's PNNH families in timm's model registry, when timm is installed.

    import pnnh, timm
    pnnh.models.register_timm_models()     # pnnh*, llplain*, pnnh_vit_* (the PNNH and looks-linear families)
    model = timm.create_model("pnnh56", num_classes=10, in_chans=3)

timm then builds them as it builds its own models (``timm.create_model``, ``timm.list_models("pnnh*")``).
The models keep pnnh's defaults (``num_classes=10``, ``in_chans=1``) unless given, and have no
pretrained weights. A name timm already has is left to timm.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import ConfigError
from ._registry import create_model, list_models, model_info

__all__ = ["register_timm_models", "timm_entry_point"]

PNNH_FAMILIES = ("pnnh", "looks_linear", "pnnh_vit")


def timm_entry_point(name: str) -> Callable[..., nn.Module]:
    """A timm-style entry point for pnnh model ``name``: ``fn(pretrained=False, **kwargs)``.

    timm calls entry points with ``pretrained``, ``pretrained_cfg`` and ``pretrained_cfg_overlay``
    besides the model options; the last two are ignored, ``pretrained=True`` is refused.
    """
    def fn(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> nn.Module:
        if pretrained:
            raise ConfigError(f"{name}: pnnh publishes no pretrained weights; build it with pretrained=False")
        return create_model(name, **kwargs)

    fn.__name__ = fn.__qualname__ = name  # timm registers an entry point under its function name
    fn.__doc__ = model_info(name).doc
    return fn


def register_timm_models(pattern: str = "*", families: tuple[str, ...] = PNNH_FAMILIES) -> list[str]:
    """Register the pnnh models of ``families`` matching ``pattern`` in timm; return the names registered.

    Raises:
        ConfigError: timm is not installed.
    """
    try:
        from timm.models import is_model, register_model
    except ImportError:
        raise ConfigError("timm is not installed: pip install timm") from None
    names = []
    for name in list_models(pattern):
        if model_info(name).family in families and not is_model(name):
            fn = globals()[name] = timm_entry_point(name)  # a module-level entry point, as timm's own are
            register_model(fn)
            names.append(name)
    return names
