"""The code each PNNH layer of a net outputs, read with forward hooks (shared by the PNNH CNN tests)."""

import torch.nn as nn


def layer_codes(model: nn.Module, x) -> list:
    """The code ``e = relu(e) - relu(-e)`` that each PNNH layer outputs, in forward order."""
    out = []
    hooks = [l.register_forward_hook(lambda mod, i, o: out.append(
        o[:, mod.n_learn:mod.n_learn + mod.n_code] - o[:, mod.n_learn + mod.n_code:])) for l in model.pnnh_layers()]
    model(x)
    for h in hooks:
        h.remove()
    return out
