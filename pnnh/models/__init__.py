"""Model families. Importing this package registers every model."""

from ._registry import (ModelInfo, create_model, is_factory_spec, is_model, list_models, load_factory, model_info,
                        model_label, model_slug, register_model)
from . import resnet  # noqa: F401  (registers resnet*/plain*/preact_resnet*)
from . import catalogue  # noqa: F401  (registers the residual catalogue: wrn*, resnext*, highway*, se_resnet* ...)
from . import memory  # noqa: F401  (registers rmn_resnet*: residual memory networks)
from . import pnnh_cnn  # noqa: F401  (registers pnnh*/llplain*)
from . import inception  # noqa: F401  (registers inception_resnet_*/inception_*)
from . import dilated  # noqa: F401  (registers dilated_pair_*/mixed_dilated_*)
from . import vit  # noqa: F401  (registers vit_*/plain_vit_*/pnnh_vit_*)
from .resnet import ResNet
from .timm_registry import register_timm_models

__all__ = ["create_model", "list_models", "register_model", "model_info", "is_model", "ModelInfo", "ResNet",
           "register_timm_models", "is_factory_spec", "load_factory", "model_label", "model_slug",
           "upgrade_state_dict", "upgrade_model_kwargs"]


def upgrade_state_dict(state_dict: dict) -> dict:
    """``state_dict`` with every key of an older pnnh layout renamed or split to the present one.

    The families' own upgrades, in one place for loaders that compare keys before loading: PNNH
    layers' DiracNet entries (:func:`pnnh.models.pnnh_cnn.upgrade_state_dict`) and the block-coder
    PNNH-ViT's joint ``in_proj`` (:func:`pnnh.models.vit.split_joint_in_proj`). The modules apply
    the same upgrades in their ``load_state_dict`` hooks.
    """
    return vit.split_joint_in_proj(pnnh_cnn.upgrade_state_dict(state_dict))


def upgrade_model_kwargs(name: str, kwargs: dict, keys) -> dict:
    """The options that rebuild model ``name`` for a saved state dict with keys ``keys``.

    A file records the options its model was built with, not the defaults it relied on. A PNNH ViT
    saved without a ``coder`` or ``path_param`` option gets the ones its weights hold
    (:func:`pnnh.models.vit.saved_coder`, :func:`pnnh.models.vit.saved_path_param`), so a file
    saved when other defaults held loads as what it is.
    """
    if not (is_model(name) and model_info(name).family == "pnnh_vit"):
        return kwargs
    saved = {"coder": vit.saved_coder(keys), "path_param": vit.saved_path_param(keys)}
    return {**{k: v for k, v in saved.items() if v is not None}, **kwargs}
