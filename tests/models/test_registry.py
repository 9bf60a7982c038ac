import pytest
import torch.nn as nn

import pnnh
from pnnh.errors import ConfigError, ModelNotFoundError


def test_list_models_glob_and_natural_sort():
    names = pnnh.list_models("resnet*")
    assert names.index("resnet20") < names.index("resnet110") < names.index("resnet1202")
    assert all(n.startswith("resnet") for n in names)
    assert "plain56" in pnnh.list_models("plain*") and "resnet56" not in pnnh.list_models("plain*")
    assert pnnh.list_models("no_such_thing*") == []


def test_unknown_name_suggests_closest():
    with pytest.raises(ModelNotFoundError) as e:
        pnnh.create_model("resnet57")
    msg = str(e.value)
    assert "resnet57" in msg and "resnet56" in msg and "pnnh models" in msg


def test_unknown_kwarg_is_config_error():
    with pytest.raises(ConfigError, match="does not take"):
        pnnh.create_model("resnet20", not_an_option=3)


def test_register_model_decorator_roundtrip():
    from pnnh.models._registry import _MODELS

    @pnnh.register_model(family="test", depth=1)
    def _tiny_test_model(num_classes=10, in_chans=1, **kw):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        m = pnnh.create_model("_tiny_test_model", num_classes=3)
        assert m.pnnh_name == "_tiny_test_model" and m.pnnh_kwargs["num_classes"] == 3
        assert pnnh.model_info("_tiny_test_model").family == "test"
        with pytest.raises(RuntimeError, match="twice"):
            pnnh.register_model(_tiny_test_model)
    finally:
        _MODELS.pop("_tiny_test_model")
