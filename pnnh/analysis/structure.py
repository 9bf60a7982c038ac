"""Structural check: does a model contain a residual (shortcut) connection?

:func:`find_residual_connections` traces the model's forward pass with ``torch.fx`` and counts,
for every merge of two tensors that both derive from one earlier tensor, the *weighted layers* on
each path from that tensor to the merge. A weighted layer mixes its input through learned
weights: a call of a module holding a weight matrix or kernel (conv, linear, embedding) or a
non-elementwise function reading a parameter (``F.conv2d(x, self.weight)``, ``F.linear``,
``x @ self.w``). Everything else passes a tensor on without weights: identity, slicing and
subsampling, padding, pooling, dropout, reshaping, activations, norms and their per-channel affine,
scaling by a constant or a learned gain (``alpha * x``), and any op whose other operand is
data-independent — a registered *buffer* (``x * self.scale``,
``F.conv2d(x, self.identity_kernel)``), a tensor built inside ``forward`` (``torch.eye``), a
random mask. Buffers are fixed, so an op that only reads buffers can carry the input unchanged.

Two kinds of merge are inspected:

- **additive merges** — ``+``, ``-``, ``torch.add/sub``, ``lerp``, ``addcmul``, ``addcdiv``,
  ``where``, a product with a sum that holds a constant term (``x * (1 + f(x))`` is
  ``x + x f(x)``), and a concatenation or stack that is summed or whose parts are added later
  (``torch.stack([x, f(x)]).sum(0)``). One is a shortcut when its operands are reached from one
  tensor through *different* numbers of weighted layers; the operand with fewer is the shortcut.
  That covers the identity shortcut ``F(x) + x`` (0 layers), He et al.'s option A
  ``F(x) + pad(x[:, :, ::2, ::2])`` (0), the projection shortcut ``F(x) + BN(conv1x1(x))`` (1 against
  2: torchvision's ``downsample``), a learned-gain shortcut ``alpha x + F(x)``, pre-activation
  blocks, highway gates
  ``T(x) H(x) + (1 - T(x)) x``. Two parallel branches of equal depth (Inception style) are not a
  shortcut: neither skips anything.
- **concatenations** (``cat``, ``stack``): one is a shortcut when a part is the tensor itself, passed
  on with no weighted layer, beside a part computed from it through weighted layers (DenseNet's
  ``cat([x, F(x)])``). The parts of a concatenation stay apart until the next weighted layer reads
  each through its own weights, so learned parts of different depths side by side are not a
  shortcut: the PNNH coder ``[learner(x); relu(E x); relu(-E x)]`` is that shape. A merge of parts
  that are all weight-free views of one tensor (a CReLU's ``cat([a, -a])``) skips nothing either.

Every plain, PNNH and looks-linear net of the registry passes; every ResNet fails at each block,
projection blocks included (``tests/analysis/test_structure.py``).
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResidualConnection", "find_residual_connections", "is_plain"]

_ADD_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.rsub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack, torch.dstack}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_REDUCE = {torch.sum, torch.mean}
_REDUCE_METHODS = {"sum", "mean"}
# per-element ops: a parameter they read scales or shifts values, it mixes nothing (not a weighted layer)
_ELEMENTWISE_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                      operator.truediv, operator.itruediv, operator.neg, torch.add, torch.sub, torch.rsub, torch.mul,
                      torch.div, torch.addcmul, torch.addcdiv, torch.lerp, torch.where, torch.clamp, torch.sigmoid,
                      torch.tanh, torch.relu, F.relu, F.gelu, F.silu, F.prelu, F.layer_norm, F.batch_norm,
                      F.group_norm, F.instance_norm}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "addcmul_", "addcdiv",
                        "addcdiv_", "lerp", "lerp_", "where", "clamp", "neg", "sigmoid", "tanh", "relu"}
# ops whose value does not depend on the data of their tensor operand (shapes, fresh tensors)
_META_METHODS = {"size", "dim", "new_empty", "new_zeros", "new_ones", "new_full"}
_META_FUNCS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
               torch.randn_like, len}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


@dataclass(frozen=True)
class ResidualConnection:
    """One shortcut: the merge node, the tensor it carries, the operands it joins."""

    merge: str  # fx node name of the add / cat
    op: str  # "add", "cat", ...
    source: str  # the tensor both operands are computed from
    shortcut_operand: str  # the operand reached from ``source`` through fewer weighted layers
    branch_operand: str  # the operand reached through more
    shape: tuple | None = None  # of the merge output, when an example input was given
    shortcut_layers: int = 0  # weighted layers from ``source`` to the shortcut operand
    branch_layers: int = 0  # ... and to the branch operand

    def __str__(self) -> str:
        return (f"{self.op} at {self.merge}: {self.shortcut_operand} carries {self.source} through "
                f"{self.shortcut_layers} weighted layer(s) past the {self.branch_layers} of {self.branch_operand}")


def _op_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _is_fn(n: fx.Node, funcs: set, methods: set = frozenset()) -> bool:
    return (n.op == "call_function" and n.target in funcs) or (n.op == "call_method" and n.target in methods)


def _is_meta(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in _META_ATTRS
    return _is_fn(n, _META_FUNCS, _META_METHODS)


class _Graph:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        # constants: nodes whose value does not depend on the input (``self.weight``, a buffer,
        # ``torch.cat([w_l, w_c])``, ``x.new_empty(...)``); ``learned`` ones read a parameter
        self.const: set[fx.Node] = set()
        self.learned: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "get_attr":
                self.const.add(n)
                if isinstance(self._attr(n.target), nn.Parameter):
                    self.learned.add(n)
            elif n.op in ("call_function", "call_method", "call_module") and (
                    _is_meta(n) or all(a in self.const for a in n.all_input_nodes)):
                self.const.add(n)
                if any(a in self.learned for a in n.all_input_nodes) or (
                        n.op == "call_module" and self._owns_params(n)):
                    self.learned.add(n)
        self.weighted = {n for n in self.nodes if n not in self.const and self._weighted(n)}

    def _attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _owns_params(self, n: fx.Node) -> bool:
        return any(True for _ in self.gm.get_submodule(n.target).parameters())

    def _weighted(self, n: fx.Node) -> bool:
        """A layer that mixes its input through learned weights: a module holding a weight matrix or
        kernel (conv, linear, embedding; not a norm's per-channel affine), or a non-elementwise op
        reading a parameter (``F.conv2d(x, self.weight)``, ``F.linear``, ``x @ self.w``)."""
        if n.op == "call_module":
            return any(p.dim() >= 2 for p in self.gm.get_submodule(n.target).parameters())
        if n.op in ("call_function", "call_method") and not _is_fn(n, _ELEMENTWISE_FUNCS, _ELEMENTWISE_METHODS):
            return any(a in self.learned for a in n.all_input_nodes)
        return False

    def layers_from(self, start: fx.Node) -> dict[fx.Node, int]:
        """For every tensor ``s`` that ``start`` is computed from (``start`` included): the least
        number of weighted layers on a path ``s -> ... -> start``, ``s`` itself not counted."""
        dist, queue = {start: 0}, deque([start])
        while queue:  # 0-1 breadth-first search backwards through the graph
            n = queue.popleft()
            step = dist[n] + (n in self.weighted)
            for a in n.all_input_nodes:
                if a in self.const or dist.get(a, step + 1) <= step:
                    continue
                dist[a] = step
                (queue.appendleft if step == dist[n] else queue.append)(a)
        return dist

    # --- merges -----------------------------------------------------------------------------------
    def _data(self, args) -> list[fx.Node]:
        return [a for a in args if isinstance(a, fx.Node) and a not in self.const]

    def _cat_parts(self, n: fx.Node) -> list[fx.Node]:
        seq = n.args[0] if n.args else n.kwargs.get("tensors", ())
        return self._data(seq)

    def _summed_later(self, n: fx.Node) -> bool:
        """Is this concatenation summed, or are parts of it added together, before any weighted layer?

        An addition counts when two of its operands come from the concatenation with no weighted
        layer between (``y[:, :C] + y[:, C:]``); the concatenation added as a whole to something
        computed from it through weights (the next block's ``y + F(y)``) adds no part to another.
        """
        reach, stack = {n}, list(n.users)  # computed from n through no weighted layer
        while stack:
            u = stack.pop()
            if u in reach or u in self.weighted:
                continue
            reach.add(u)
            stack.extend(u.users)
        return any(_is_fn(u, _REDUCE, _REDUCE_METHODS) or sum(o in reach for o in self.additive_operands(u)) >= 2
                   for u in reach if u is not n)

    def additive_operands(self, n: fx.Node) -> list[fx.Node]:
        """The data operands ``n`` adds together (empty when ``n`` is no additive merge)."""
        a, kw = n.args, n.kwargs
        if _is_fn(n, _ADD_FUNCS, _ADD_METHODS):
            return self._data([*a[:2], kw.get("other")])
        name = _op_name(n)
        if name in ("lerp", "lerp_"):  # input + w (end - input)
            return self._data([*a[:2], kw.get("end")])
        if name in ("addcmul", "addcmul_", "addcdiv", "addcdiv_"):  # input + v t1 t2
            return self._data([*a[:3], kw.get("tensor1"), kw.get("tensor2")])
        if name == "where":
            return self._data(a[1:3] if n.op == "call_function" else [a[0], *a[2:3], kw.get("other")])
        if _is_fn(n, _MUL_FUNCS, _MUL_METHODS) and len(a) >= 2:  # x * (c + f): x c + x f
            for x, s in ((a[0], a[1]), (a[1], a[0])):
                if isinstance(x, fx.Node) and isinstance(s, fx.Node) and _is_fn(s, _ADD_FUNCS, _ADD_METHODS):
                    terms = [*s.args[:2], s.kwargs.get("other")]
                    if any(t is not None and not (isinstance(t, fx.Node) and t not in self.const) for t in terms):
                        return self._data([x, *terms])
        return []

    def merges(self):
        """(node, kind, operands) for every merge: kind ``"additive"`` or ``"concat"``."""
        for n in self.nodes:
            if n in self.const:
                continue
            if _is_fn(n, _CAT_FUNCS):
                yield n, ("additive" if self._summed_later(n) else "concat"), self._cat_parts(n)
            elif ops := self.additive_operands(n):
                yield n, "additive", ops


def _shortcut(g: _Graph, kind: str, operands: list[fx.Node]):
    """(source, i, j, layers_i, layers_j) of the nearest source that operand ``i`` reaches through
    fewer weighted layers than operand ``j`` does (for a concatenation: through none), else None."""
    dists = [g.layers_from(o) for o in dict.fromkeys(operands)]
    best = None
    for i, di in enumerate(dists):
        for j, dj in enumerate(dists):
            if i == j:
                continue
            for s, li in di.items():
                lj = dj.get(s)
                if lj is None or li >= lj or (kind == "concat" and li > 0):
                    continue
                if best is None or g.index[s] > g.index[best[0]]:
                    best = (s, i, j, li, lj)
    return best, list(dict.fromkeys(operands))


def find_residual_connections(model: nn.Module, example_input: torch.Tensor | None = None,
                              leaf_modules: tuple[type, ...] = ()) -> list[ResidualConnection]:
    """Every residual connection in ``model`` (an empty list means the net is plain).

    Args:
        model: any ``torch.fx``-traceable module.
        example_input: optional; when given, shapes are propagated and recorded on each finding.
        leaf_modules: module types to keep opaque while tracing (their inside is not inspected;
            one counts as a weighted layer when it owns parameters).

    Raises whatever ``torch.fx.symbolic_trace`` raises for an untraceable model.
    """

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_modules) or super().is_leaf_module(m, qualname)

    was_training = model.training
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    model.train(was_training)
    g = _Graph(gm)
    found = []
    for n, kind, operands in g.merges():
        if len(operands) < 2:
            continue
        hit, ops = _shortcut(g, kind, operands)
        if hit is None:
            continue
        src, i, j, li, lj = hit
        meta = n.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        found.append(ResidualConnection(n.name, _op_name(n), src.name, ops[i].name, ops[j].name, shape, li, lj))
    return found


def is_plain(model: nn.Module, example_input: torch.Tensor | None = None) -> bool:
    """True when :func:`find_residual_connections` finds nothing."""
    return not find_residual_connections(model, example_input)
