"""Where to look inside a model, and hooks that read every probe in one forward pass.

A *probe* is a point of the forward pass whose activation the diagnostics measure. Two kinds:

- ``"blocks"``: the input of the first block (named ``"stem"``) and the output of every block of
  ``model.blocks()``. Works for any model with that method (every pnnh CNN) and for an
  ``nn.Sequential`` whose children are the blocks.
- ``"layers"``: the output of every activation module (``nn.ReLU`` and friends, or a module whose
  class name ends in ``ReLU`` such as a CReLU) outside shortcut paths. For a plain net this is
  every layer. For a residual or PNNH block it would also read mid-branch activations, which are
  not the state of the network (the input also travels along the shortcut / coder), so
  ``"auto"`` picks ``"layers"`` for the ``plain`` family and for models without blocks, and
  ``"blocks"`` otherwise.

Each probe records the number of weight layers executed before it, its ``depth``: calls of
modules that directly own a weight of two or more dimensions (``Conv``, ``Linear``, or a custom
layer holding its own conv weight, as PNNH layers do), outside shortcut modules. So nets so nets probed at different granularity share one
depth axis: plain56's layer probes sit at depths 1..55, resnet56's block outputs at 1, 3, ..., 55.
A module called several times in one forward (weight sharing) gives one probe per call.

Norm layers: an untrained net's BatchNorm running statistics (mean 0, variance 1) describe no
data, so diagnostics at init normalise with the statistics of the diagnostic batch itself (what
training would see); see :func:`calibrate_batch_norm`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError
from ..models import is_model, model_info
from ..models.pnnh_cnn import PNNHLayer

__all__ = ["get_blocks", "adopt_blocks", "activation_modules", "branch_end", "is_weight_layer", "resolve_probe_mode", "resolve_norm_stats", "calibrate_batch_norm",
           "ProbeTap", "Probe", "PROBE_MODES", "learner_activity"]

PROBE_MODES = ("auto", "blocks", "layers")

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Hardswish, nn.Tanh, nn.Softplus)


def get_blocks(model: nn.Module, required: bool = True) -> list[nn.Module]:
    """``model.blocks()``, or the children of an ``nn.Sequential``; ``[]`` for another model unless ``required``.

    Every block must be a module the forward pass calls (hooks on it fire); a ``blocks()`` that
    builds new containers, such as slices of an ``nn.Sequential``, is made so by :func:`adopt_blocks`.
    """
    fn = getattr(model, "blocks", None)
    if callable(fn):
        blocks = list(fn())
    elif isinstance(model, nn.Sequential):
        blocks = list(model)
    elif required:
        raise ConfigError(f"{type(model).__name__} has no blocks() method; block probes need the model's blocks "
                          "in forward order (every pnnh CNN has them, or pass an nn.Sequential of blocks); "
                          "probes='layers' reads every activation instead")
    else:
        return []
    if not blocks and required:
        raise ConfigError(f"{type(model).__name__}.blocks() is empty")
    own = {id(m) for m in model.modules()}
    foreign = [i for i, b in enumerate(blocks) if id(b) not in own]
    if foreign:
        raise ConfigError(f"{type(model).__name__}.blocks() returns modules the forward pass never calls (block "
                          f"{foreign[0]}: {type(blocks[foreign[0]]).__name__}); adopt_blocks(model) puts slices of "
                          "an nn.Sequential in place (run_diagnostics does it on its copy)")
    return blocks


def adopt_blocks(model: nn.Module) -> nn.Module:
    """Make every block that ``model.blocks()`` returns a module the forward pass calls; returns ``model``.

    A ``blocks()`` may build new containers, e.g. slices of an ``nn.Sequential``
    (``[self.features[0:3], self.features[3:6]]``): hooks on a slice never fire, because the forward
    calls the sliced children directly. Each slice is put inside its parent ``nn.Sequential`` in
    place of the children it holds (the same computation), and ``model.blocks`` is pinned to the
    adopted list, since slicing the rewritten parent again would cut elsewhere. Modifies ``model``:
    use it on a copy. A new block that is not a slice of consecutive children raises ConfigError.
    """
    fn = getattr(model, "blocks", None)
    if not callable(fn):
        return model
    blocks = list(fn())
    own = {id(m) for m in model.modules()}
    if all(id(b) in own for b in blocks):
        return model
    parent_of = {id(c): (m, k) for m in model.modules() if isinstance(m, nn.Sequential) for k, c in m._modules.items()}
    for i, b in enumerate(blocks):
        if id(b) in own:
            continue
        where = [parent_of.get(id(c)) for c in b.children()] if isinstance(b, nn.Sequential) else []
        parents = {id(w[0]) for w in where if w is not None}
        keys = list(where[0][0]._modules) if where and where[0] is not None else []
        idx = [keys.index(w[1]) for w in where] if len(parents) == 1 and None not in where else []
        if not idx or idx != list(range(idx[0], idx[0] + len(idx))):
            raise ConfigError(f"{type(model).__name__}.blocks()[{i}] is a new {type(b).__name__} that the forward "
                              "pass never calls and not a slice of consecutive children of an nn.Sequential of "
                              "the model; return the model's own modules")
        parent = where[0][0]
        items = list(parent._modules.items())
        parent._modules.clear()
        for k, m in items[:idx[0]] + [(keys[idx[0]], b)] + items[idx[-1] + 1:]:
            parent._modules[k] = m
        parent_of[id(b)] = (parent, keys[idx[0]])
        own.add(id(b))
    model.blocks = lambda: list(blocks)  # an instance attribute: this copy's blocks, fixed
    return model


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, _ACTIVATIONS) or type(m).__name__.lower().endswith("relu")


def is_weight_layer(m: nn.Module) -> bool:
    """A module that directly owns a parameter of 2+ dimensions (a conv / linear weight), so one call = one layer."""
    return any(p.dim() >= 2 for p in m.parameters(recurse=False))


def _shortcut_ids(model: nn.Module) -> set[int]:
    """ids of every module inside a block's ``shortcut``."""
    ids: set[int] = set()
    for b in get_blocks(model, required=False):
        sc = getattr(b, "shortcut", None)
        if isinstance(sc, nn.Module):
            ids.update(id(m) for m in sc.modules())
    return ids


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost activation modules outside shortcuts, in registration order.

    An activation nested in another (an ``nn.ReLU`` inside a CReLU module) is not listed twice.
    """
    skip = _shortcut_ids(model)
    out: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside or id(m) in skip or not _is_activation(m):
            continue
        out.append((name, m))
        inside.update(id(c) for c in m.modules())
    return out


def resolve_probe_mode(model: nn.Module, mode: str) -> str:
    """``"auto"`` -> ``"layers"`` for the registered ``plain`` family and for models without blocks
    (no ``blocks()``, not an ``nn.Sequential``), else ``"blocks"``."""
    if mode not in PROBE_MODES:
        raise ConfigError(f"unknown probe mode {mode!r}; choose one of {', '.join(PROBE_MODES)}")
    if mode != "auto":
        return mode
    if not get_blocks(model, required=False):
        return "layers"
    name = getattr(model, "pnnh_name", None)
    if name is not None:
        if is_model(name) and model_info(name).family == "plain" and activation_modules(model):
            return "layers"
    return "blocks"


def resolve_norm_stats(model: nn.Module, norm_stats: str = "auto") -> str:
    """``"batch"``, ``"running"`` or ``"none"`` (no BatchNorm).

    ``"auto"`` is ``"batch"`` when every BatchNorm still has its initial running statistics
    (mean 0, variance 1, no batches tracked: an untrained model) and ``"running"`` otherwise.
    """
    if norm_stats not in ("auto", "batch", "running"):
        raise ConfigError(f"norm_stats must be auto, batch or running, got {norm_stats!r}")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return "none"
    if norm_stats != "auto":
        return norm_stats
    pristine = all(int(m.num_batches_tracked) == 0 and bool((m.running_mean == 0).all())
                   and bool((m.running_var == 1).all()) for m in bns)
    return "batch" if pristine else "running"


@contextlib.contextmanager
def calibrate_batch_norm(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: BatchNorm layers normalise with batch statistics and store them as running stats.

    The running statistics are reset and accumulated as a cumulative average (``momentum=None``),
    so after one forward of a batch they *are* that batch's statistics, and the model (left in
    eval mode) normalises every later input with them: per-sample forward passes (gradients,
    lesions) then match the batch forward, with no coupling between samples. Everything else
    (dropout ...) is in eval mode throughout.
    """
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)] if enabled else []
    saved = [m.momentum for m in bns]
    for m in bns:
        if m.track_running_stats:
            m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


@dataclass
class Probe:
    """One probe firing: where (module name, call number), how deep, and what the reducer returned."""

    index: int
    name: str
    kind: str  # "stem" | "block" | "act"
    depth: int
    shape: tuple[int, ...]
    value: Any = field(default=None, repr=False)

    def meta(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "kind": self.kind, "depth": self.depth,
                "shape": list(self.shape)}


def branch_end(block: nn.Module) -> nn.Module | None:
    """The module whose output ends a residual block's branch (before the add), or ``None`` for plain blocks.

    ``block.branch_out`` where a block has that hook point (catalogue blocks: the branch as merged,
    after squeeze-excitation, scaling and drop-path), else ``block.residual_branch_norm()`` where a
    block defines it and it returns a module (post-activation blocks: the last BatchNorm), else the
    last conv registered in the block outside its shortcut (pre-activation blocks end with a conv).
    """
    sc = getattr(block, "shortcut", None)
    if not isinstance(sc, nn.Module):
        return None
    if isinstance(getattr(block, "branch_out", None), nn.Module):
        return block.branch_out
    fn = getattr(block, "residual_branch_norm", None)
    m = fn() if callable(fn) else None
    if isinstance(m, nn.Module):
        return m
    skip = {id(x) for x in sc.modules()}
    convs = [c for c in block.modules() if isinstance(c, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and id(c) not in skip]
    return convs[-1] if convs else None


class ProbeTap:
    """Hooks that hand activations to reducer functions during one forward pass.

    Every reducer runs inside its hook, on the tensor as the module produced (or received) it,
    before any later in-place op, and its return value is kept as ``Probe.value``; activations
    themselves are not kept, so memory stays that of a plain forward. Lists hold the firings of the
    last forward in execution order. Use as a context manager.

    Args:
        model: the model (needs :func:`get_blocks` to work).
        mode: ``"blocks"`` or ``"layers"`` (resolve ``"auto"`` with :func:`resolve_probe_mode`);
            ``reduce(tensor, probe)`` is called on each probe -> :attr:`probes`.
        preact: optional ``fn(tensor, probe)`` called on the *input* of every activation module
            (its pre-activation) -> :attr:`preacts`.
        block_fn: optional ``fn(tensor, probe)`` called on every block output -> :attr:`block_outs`
            and on every residual branch end (:func:`branch_end`) -> :attr:`branches` (the probe's
            ``name`` is the block's name).
    """

    def __init__(self, model: nn.Module, mode: str, reduce: Callable[[torch.Tensor, Probe], Any] | None,
                 *, preact: Callable[[torch.Tensor, Probe], Any] | None = None,
                 block_fn: Callable[[torch.Tensor, Probe], Any] | None = None):
        self.model, self.mode, self.reduce = model, mode, reduce
        self.preact, self.block_fn = preact, block_fn
        self.probes: list[Probe] = []
        self.preacts: list[Probe] = []
        self.block_outs: list[Probe] = []
        self.branches: list[Probe] = []
        self._handles: list[Any] = []
        self._depth = 0
        self._calls: dict[tuple[int, str], int] = {}

    def _count(self, module, inputs, output) -> None:
        self._depth += 1

    def _fire(self, out: list[Probe], fn, module: nn.Module, name: str, kind: str, t: Any) -> None:
        if not torch.is_tensor(t):
            return
        key = (id(module), kind)
        k = self._calls.get(key, 0)
        self._calls[key] = k + 1
        p = Probe(len(out), name if k == 0 else f"{name}#{k}", kind, self._depth, tuple(t.shape))
        p.value = fn(t, p)
        out.append(p)

    def __enter__(self) -> "ProbeTap":
        names = {id(m): n for n, m in self.model.named_modules()}
        skip = _shortcut_ids(self.model)
        blocks = get_blocks(self.model, required=self.mode == "blocks" and self.reduce is not None)
        blocks = list({id(b): b for b in blocks}.values())  # a shared block is hooked once
        hooks = self._handles
        for m in self.model.modules():
            if is_weight_layer(m) and id(m) not in skip:
                hooks.append(m.register_forward_hook(self._count))
        if self.reduce is not None:
            if self.mode == "blocks":
                first, fn, out = blocks[0], self.reduce, self.probes
                hooks.append(first.register_forward_pre_hook(
                    lambda m, args: None if self._calls.get((id(m), "stem")) else self._fire(out, fn, m, "stem", "stem", args[0])))
                for b in blocks:
                    hooks.append(b.register_forward_hook(
                        lambda m, args, o, name=names.get(id(b), type(b).__name__): self._fire(out, fn, m, name, "block", o)))
            elif self.mode == "layers":
                acts = activation_modules(self.model)
                if not acts:
                    raise ConfigError(f"{type(self.model).__name__} has no activation modules to probe "
                                      "(functional activations cannot be hooked); use probes='blocks'")
                for name, a in acts:
                    hooks.append(a.register_forward_hook(
                        lambda m, args, o, name=name: self._fire(self.probes, self.reduce, m, name, "act", o)))
            else:
                raise ConfigError(f"probe mode must be 'blocks' or 'layers' here, got {self.mode!r}")
        if self.preact is not None:
            for name, a in activation_modules(self.model):
                hooks.append(a.register_forward_pre_hook(
                    lambda m, args, name=name: self._fire(self.preacts, self.preact, m, name, "preact", args[0])))
        if self.block_fn is not None:
            for b in blocks:
                name = names.get(id(b), type(b).__name__)
                hooks.append(b.register_forward_hook(
                    lambda m, args, o, name=name: self._fire(self.block_outs, self.block_fn, m, name, "block_out", o)))
                end = branch_end(b)
                if end is not None:
                    hooks.append(end.register_forward_hook(
                        lambda m, args, o, name=name: self._fire(self.branches, self.block_fn, m, name, "branch", o)))
        return self

    def reset(self) -> None:
        self.probes, self.preacts, self.block_outs, self.branches = [], [], [], []
        self._depth, self._calls = 0, {}

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def learner_activity(model: nn.Module, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Share of active (> 0) *learner* units in each PNNH layer of ``model``, in forward order, and its output.

    One forward pass in the model's current mode (train: batch statistics, as a training step sees
    them); the output is returned so a caller can also take gradients. The learner channels come
    first in a PNNH layer's output (``[learner | relu(e) | relu(-e)]``).
    """

    layers = [m for m in model.modules() if isinstance(m, PNNHLayer)]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no PNNH layers")
    active = [float("nan")] * len(layers)

    def tap(i: int):
        return lambda mod, inp, out: active.__setitem__(i, (out[:, : mod.n_learn] > 0).float().mean().item())

    handles = [layer.register_forward_hook(tap(i)) for i, layer in enumerate(layers)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return active, out
