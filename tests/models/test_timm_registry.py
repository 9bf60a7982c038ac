"""PNNH families in timm's registry: with timm installed, timm.create_model builds them."""

import importlib.util

import pytest
import torch

import pnnh
from pnnh.errors import ConfigError
from pnnh.models.timm_registry import register_timm_models, timm_entry_point

HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_entry_points_take_timms_call_convention():
    fn = timm_entry_point("pnnh20")
    assert fn.__name__ == "pnnh20" and fn.__doc__ == pnnh.model_info("pnnh20").doc
    torch.manual_seed(0)
    model = fn(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, num_classes=7, in_chans=3)
    torch.manual_seed(0)
    ref = pnnh.create_model("pnnh20", num_classes=7, in_chans=3)
    assert model.pnnh_name == "pnnh20" and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                                 ref.state_dict().values()))
    with pytest.raises(ConfigError, match="no pretrained weights"):
        fn(pretrained=True)


@pytest.mark.skipif(HAS_TIMM, reason="timm is installed: the registration itself is tested below")
def test_without_timm_registering_is_a_clear_error():
    with pytest.raises(ConfigError, match="timm is not installed: pip install timm"):
        register_timm_models()


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed here (pip install timm to run this test)")
def test_timm_create_model_builds_registered_pnnh_families():
    import timm

    names = register_timm_models()
    assert {"pnnh56", "llplain20", "pnnh_vit_mini_d6"} <= set(names)
    assert not {n for n in names if pnnh.model_info(n).family not in ("pnnh", "looks_linear", "pnnh_vit")}
    assert "pnnh56" in timm.list_models("pnnh*") and register_timm_models() == []  # once is enough
    model = timm.create_model("pnnh20", num_classes=5, in_chans=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 5)
