"""Deployment fusion: fold BatchNorm into convs and turn plain nets into a pure conv-ReLU chain.

:func:`deploy` is a generic ``torch.fx`` graph pass, so it works for any fx-traceable model,
not only the families it was written against:

1. **Trace** the model in eval mode. Modules that implement the *plain-conv protocol* (below)
   are kept as leaves, so their insides need not be traceable.
2. **Plain-conv protocol.** A module with a method ``as_plain_conv()`` is replaced by what that
   method returns: an ``nn.Conv2d``, or an ``nn.Sequential`` of ``Conv2d`` / ``BatchNorm2d`` /
   ``ReLU`` layers, that computes exactly the module's eval-mode output. A PNNH layer whose
   coder shares the learner's input (a conv with tied, mirrored rows ``[W_l; W_c; -W_c]``) thus
   becomes one ordinary conv; the folding below then sees a plain ``conv -> BN -> ReLU``.
3. **Drop no-ops**: ``nn.Identity`` and dropout modules (eval mode) are removed from the graph.
4. **Fold BatchNorm** into the conv that feeds it when that conv has no other user:
   ``W' = W * g / sqrt(v + eps)`` per output channel and ``b' = beta + (b - m) * g / sqrt(v + eps)``
   with ``g, beta`` the affine parameters and ``m, v`` the running statistics.
5. **Fuse ReLU** (``fuse_relu=True``) into the conv that feeds it when nothing else reads the
   conv's output: a :class:`ConvReLU2d` runs both as one oneDNN kernel on CPU (the ReLU is the
   convolution's post-op, so the activation tensor is written once instead of written, read and
   written again); elsewhere, or while exporting/tracing, it runs ``relu(conv(x))``.
6. **Fold constants**: every value computed from parameters and buffers alone (a PNNH coder's
   gain-scaled, concatenated output weight, a DiracNet linear's ``alpha I + beta V / |V|``, a
   ViT's position embedding plus class token) is computed once and stored as a buffer, so the
   deployed forward does only the work that depends on the input.
7. **Chain**: if what is left is a straight line of modules (every node feeds only the next,
   as in a plain net), return it as an ``nn.Sequential`` (``torch.flatten(x, 1)`` becomes
   ``nn.Flatten``); otherwise (residual nets keep their adds) return the ``fx.GraphModule``.
8. **Memory format** (``channels_last=True``): conv weights in NHWC order, so every activation
   after the first conv is NHWC, the layout oneDNN computes in without reordering.

Steps 5 and 8 are what make the deployed form fast on CPU (docs/benchmarks.md measures each);
:func:`pnnh.bench.export.export_onnx` deploys with both off, for a portable graph.

The result is an inference artefact: its outputs equal the eval-mode model's to float rounding
(tests check 1e-4), it must not be trained (the BatchNorm statistics are baked in) and it keeps
the source model's ``pnnh_name``, ``pnnh_kwargs`` and ``default_cfg``.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..models.layers import fold_batchnorm

__all__ = ["deploy", "fold_conv_bn", "ConvReLU2d", "unfused_kernels"]

_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _DeployTracer(fx.Tracer):
    """fx tracer that keeps modules implementing ``as_plain_conv()`` as single leaf calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return callable(getattr(m, "as_plain_conv", None)) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv computing ``bn(conv(x))`` with ``bn`` in eval mode (weights copied, never shared)."""
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)  # float64, rounded once
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(w, requires_grad=False)
    fused.bias = nn.Parameter(b, requires_grad=False)
    return fused


def _probe_fused_kernel() -> bool:
    """Whether this torch build has oneDNN's conv+ReLU kernel (a private op: probed, never assumed)."""
    try:
        x, w = torch.ones(1, 1, 3, 3), -torch.ones(1, 1, 1, 1)
        y = torch.ops.mkldnn._convolution_pointwise(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
        return bool(torch.equal(y, torch.zeros(1, 1, 3, 3)))
    except Exception:  # op missing, or built without oneDNN
        return False


_FUSED_KERNEL: bool | None = None
_USE_FUSED = True


@contextlib.contextmanager
def unfused_kernels():
    """Within this block :class:`ConvReLU2d` runs conv then ReLU (e.g. for FLOP counters, which
    do not know oneDNN's fused op)."""
    global _USE_FUSED
    prev, _USE_FUSED = _USE_FUSED, False
    try:
        yield
    finally:
        _USE_FUSED = prev


class ConvReLU2d(nn.Conv2d):
    """``relu(conv2d(x))``: one oneDNN kernel with ReLU as post-op on CPU, two ops elsewhere.

    The fused kernel (which has no backward) is used for float32/bfloat16 CPU inputs when no
    gradient is recorded, outside autocast, tracing (jit or fx) and ONNX export; every other case
    takes the plain path, with the same result.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _FUSED_KERNEL
        if (_USE_FUSED and not fx._symbolic_trace.is_fx_symbolic_tracing() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == self.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and not torch.is_autocast_enabled("cpu")
                and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export()):
            if _FUSED_KERNEL is None:
                _FUSED_KERNEL = _probe_fused_kernel()
            if _FUSED_KERNEL:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    "relu", [], "")
        return F.relu(super().forward(x))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConvReLU2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                  dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _unique_name(gm: fx.GraphModule, base: str) -> str:
    names, i = dict(gm.named_modules()), 0
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def _replace_plain_conv_layers(gm: fx.GraphModule) -> None:
    """Apply the plain-conv protocol: ``m.as_plain_conv()`` replaces ``m`` in the graph."""
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if mod is None or not callable(getattr(mod, "as_plain_conv", None)):
            continue
        repl = copy.deepcopy(mod.as_plain_conv())  # never share modules with the layer it replaces
        layers = list(repl) if isinstance(repl, nn.Sequential) else [repl]
        if not layers or not all(isinstance(l, (*_CONV, *_BN, nn.ReLU, nn.Identity)) for l in layers):
            raise ConfigError(f"{type(mod).__name__}.as_plain_conv() must return an nn.Conv2d or an nn.Sequential "
                              f"of Conv2d/BatchNorm2d/ReLU, got {type(repl).__name__}")
        if len(node.args) != 1 or node.kwargs:
            raise ConfigError(f"{type(mod).__name__} implements as_plain_conv() but is called with more than one input")
        if len(layers) == 1:
            _set_module(gm, node.target, layers[0].eval())
            continue
        prev = node.args[0]
        with gm.graph.inserting_before(node):
            for i, layer in enumerate(layers):
                target = f"{node.target}_plain{i}"
                gm.add_submodule(target, layer.eval())
                prev = gm.graph.call_module(target, (prev,))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)  # the original layer, no longer called, is dropped at the end


def _drop_noops(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if isinstance(_module(gm, node), _NOOP_MODULES) and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _fold_batchnorms(gm: fx.GraphModule) -> int:
    """Fold every ``conv -> BN`` pair whose conv output feeds nothing but the BN; return how many."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, _BN) or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv = _module(gm, src)
        if not isinstance(conv, _CONV) or len(src.users) != 1 or conv.out_channels != bn.num_features:
            continue
        fused = fold_conv_bn(conv, bn)
        if calls[src.target] == 1:  # the conv module is called once: replace it where it is
            _set_module(gm, src.target, fused)
        else:  # a weight-shared conv called elsewhere too: give this call its own fused copy
            target = _unique_name(gm, src.target.replace(".", "_") + "_fused")
            gm.add_submodule(target, fused)
            src.target = target
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    return folded


_RANDOM = ("rand", "bernoulli", "dropout", "normal", "multinomial", "poisson", "uniform", "exponential",
           "geometric", "cauchy")


def _foldable(node: fx.Node) -> bool:
    """A pure, deterministic function or method call (no in-place update, no sampling)."""
    if node.op not in ("call_function", "call_method") or node.kwargs.get("inplace"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__")
    return bool(name) and not in_place and not any(word in name.lower() for word in _RANDOM)


@torch.no_grad()
def _fold_constants(gm: fx.GraphModule) -> int:
    """Replace every tensor computed from parameters and buffers alone by a stored one; return how many.

    A value computed from at least one parameter is stored as a (frozen) parameter, one computed
    from buffers alone as a buffer: the structure check (``find_residual_connections``) counts a
    layer reading a parameter as weighted and one reading only buffers as a fixed map that can
    carry its input, and the deployed graph keeps that distinction.
    """
    const: dict[fx.Node, object] = {}
    learned: set[fx.Node] = set()  # constants computed from at least one parameter
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const[node] = gm
            for atom in node.target.split("."):
                const[node] = getattr(const[node], atom)
            if node.target in params:
                learned.add(node)
        elif _foldable(node) and all(n in const for n in node.all_input_nodes):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), const.__getitem__)
            if node.op == "call_function":
                const[node] = node.target(*args, **kwargs)
            else:
                const[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            if any(n in learned for n in node.all_input_nodes):
                learned.add(node)
    folded = 0
    for node, value in const.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor) or all(u in const for u in node.users):
            continue  # a stored tensor already, not a tensor, or read only by other constants
        name = _unique_name(gm, f"folded_{node.name}")
        if node in learned:
            gm.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
        else:
            gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(name))
        folded += 1
    gm.graph.eliminate_dead_code()
    _drop_unread_tensors(gm)
    return folded


def _drop_unread_tensors(gm: fx.GraphModule) -> None:
    """Delete the parameters and buffers that no ``get_attr`` and no called module reads any more."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target + "." for n in gm.graph.nodes if n.op == "call_module"]
    names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name not in read and not any(name.startswith(prefix) for prefix in called):
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if hasattr(module, leaf):
                delattr(module, leaf)


def _cat_dim(node: fx.Node):
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _flatten_cats(gm: fx.GraphModule) -> int:
    """``cat([cat([a, b]), c])`` becomes ``cat([a, b, c])`` (same dim, inner read once); return how many."""
    flattened = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.cat or not isinstance(node.args[0], (list, tuple)):
            continue
        parts = []
        for part in node.args[0]:
            inner = part.target is torch.cat and part.op == "call_function" if isinstance(part, fx.Node) else False
            if inner and len(part.users) == 1 and _cat_dim(part) == _cat_dim(node) \
                    and isinstance(part.args[0], (list, tuple)):
                parts.extend(part.args[0])
                flattened += 1
            else:
                parts.append(part)
        node.args = (parts,) + tuple(node.args[1:])
    gm.graph.eliminate_dead_code()
    return flattened


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op == "call_function" and node.target in (torch.relu, F.relu)


def _fuse_relus(gm: fx.GraphModule) -> None:
    """``conv -> ReLU`` pairs whose conv output feeds only the ReLU become one :class:`ConvReLU2d`."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if not _is_relu(gm, node) or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        conv = _module(gm, src)
        if type(conv) is not nn.Conv2d or len(src.users) != 1 or calls[src.target] != 1:
            continue
        _set_module(gm, src.target, ConvReLU2d.from_conv(conv))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)


def _chain_module(node: fx.Node, gm: fx.GraphModule) -> tuple[str, nn.Module] | None:
    """The module that computes ``node`` from its single input, or None if there is none."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return node.target.replace(".", "_"), gm.get_submodule(node.target)
    if node.op == "call_function" and node.target is torch.flatten and len(node.args) <= 3:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return f"flatten_{node.name}", nn.Flatten(start, end)
    if node.op == "call_function" and node.target in (torch.relu, F.relu) and len(node.args) == 1:
        return f"relu_{node.name}", nn.ReLU()
    return None


def _as_sequential(gm: fx.GraphModule) -> nn.Sequential | None:
    """``gm`` as an ``nn.Sequential`` if its graph is one straight line of single-input modules."""
    nodes = list(gm.graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    prev = nodes[0]
    for node in nodes[1:-1]:
        if len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not prev or len(prev.users) != 1:
            return None
        if node.args[0] is not prev:
            return None
        item = _chain_module(node, gm)
        if item is None:
            return None
        layers[item[0]] = item[1]
        prev = node
    if nodes[-1].args[0] is not prev or len(prev.users) != 1:
        return None
    return nn.Sequential(layers)


@torch.no_grad()
def _bake_parametrized_convs(model: nn.Module) -> None:
    """Replace every parametrised conv (``DiracWeight`` ...) by a plain ``nn.Conv2d`` holding its weight.

    Not ``parametrize.remove_parametrizations``: it edits the module's generated class, which a
    ``deepcopy`` shares with the original model, so the caller's model would lose its ``weight``.
    """
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.groups, m.bias is not None, m.padding_mode,
                                 device=m.weight.device, dtype=m.weight.dtype)
                conv.weight.copy_(m.weight)
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
                setattr(parent, name, conv)


def deploy(model: nn.Module, *, chain: bool = True, fuse_relu: bool = True, channels_last: bool = True) -> nn.Module:
    """An inference-only copy of ``model`` with BatchNorm folded away (see the module docstring).

    Args:
        model: any fx-traceable model (plain, residual, PNNH ...). Not modified.
        chain: return an ``nn.Sequential`` when the folded graph is a straight line (plain nets).
        fuse_relu: turn ``conv -> ReLU`` into :class:`ConvReLU2d` (one oneDNN kernel on CPU).
        channels_last: store conv weights NHWC so activations flow in the layout oneDNN uses.

    Returns:
        an eval-mode ``nn.Sequential`` (pure chain) or ``torch.fx.GraphModule`` whose outputs
        equal ``model.eval()(x)`` up to float rounding.

    Raises:
        ConfigError: the model cannot be traced by ``torch.fx`` (data-dependent control flow).
    """
    src = copy.deepcopy(model).eval()
    _bake_parametrized_convs(src)
    try:
        graph = _DeployTracer().trace(src)
    except Exception as e:  # fx raises many types for untraceable code; report it as one clear error
        raise ConfigError(f"cannot deploy {type(model).__name__}: torch.fx could not trace it "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    gm = fx.GraphModule(src, graph, class_name=f"Deployed{type(model).__name__}")
    _replace_plain_conv_layers(gm)
    _drop_noops(gm)
    _fold_batchnorms(gm)
    if fuse_relu:
        _fuse_relus(gm)
    _fold_constants(gm)
    _flatten_cats(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    out: nn.Module = (_as_sequential(gm) if chain else None) or gm
    out.eval()
    if channels_last:
        out.to(memory_format=torch.channels_last)
    for p in out.parameters():
        p.requires_grad_(False)
    for attr in ("pnnh_name", "pnnh_kwargs", "default_cfg", "num_classes", "in_chans"):
        if hasattr(model, attr):
            setattr(out, attr, copy.deepcopy(getattr(model, attr)))
    out.pnnh_deployed = True
    return out

