"""Structural check: does a model contain a residual (shortcut) connection?

:func:`find_residual_connections` traces the model's forward pass with ``torch.fx`` and returns
every merge (addition, subtraction, concatenation, stacking) where one operand is a tensor passed
on *without parameters* — unchanged or through parameter-free ops (identity, slicing and
subsampling, padding, pooling, dropout, reshaping, activations, scaling by a constant) — while
another operand is computed *from that same tensor through parameterised layers*. That is the
shape of a shortcut: ``F(x) + x``, ``F(x) + pad(x[:, :, ::2, ::2])``, a pre-activation block's
``F(relu(bn(x))) + x``, a highway gate's ``T(x) H(x) + (1 - T(x)) x``, a DenseNet-style
``cat([x, F(x)])``. A merge of operands that are all parameter-free views of one tensor (a
CReLU's ``cat([a, -a])``) is not a shortcut: nothing is skipped.

A parameterised node is a call of a module that owns parameters (conv, linear, norm with affine)
or a functional op taking a parameter (``F.conv2d(x, self.weight)``). A projection shortcut
(``F(x) + BN(conv1x1(x))``) has parameters on both sides and is not reported; every ResNet still
fails the check through its identity shortcuts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["ResidualConnection", "find_residual_connections", "is_plain"]

_MERGE_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.cat,
                torch.concat, torch.stack, torch.hstack, torch.vstack}
_MERGE_METHODS = {"add", "add_", "sub", "sub_"}
_LIST_MERGES = {torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack}


@dataclass(frozen=True)
class ResidualConnection:
    """One shortcut: the merge node, the tensor it carries unchanged, the operands it joins."""

    merge: str  # fx node name of the add / cat
    op: str  # "add", "cat", ...
    source: str  # node whose value reaches the merge without passing through parameters
    shortcut_operand: str
    branch_operand: str  # an operand computed from ``source`` through parameterised layers
    shape: tuple | None = None  # of the merge output, when an example input was given

    def __str__(self) -> str:
        return (f"{self.op} at {self.merge}: {self.shortcut_operand} carries {self.source} past the "
                f"parameters of {self.branch_operand}")


def _op_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _is_merge(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _MERGE_FUNCS
    return n.op == "call_method" and n.target in _MERGE_METHODS


def _operands(n: fx.Node) -> list[fx.Node]:
    args = n.args
    if n.op == "call_function" and n.target in _LIST_MERGES:
        seq = args[0] if args else n.kwargs.get("tensors", ())
        return [a for a in seq if isinstance(a, fx.Node)]
    return [a for a in list(args[:2]) + [n.kwargs.get("other")] if isinstance(a, fx.Node)]


class _Graph:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        # weight expressions: nodes computed from parameters/constants only, never from the input
        # (``self.weight``, ``torch.cat([w_l, w_c])``, ``self.enc.transpose(0, 1)``)
        self.weights: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "get_attr" or (n.op in ("call_function", "call_method") and n.all_input_nodes
                                      and all(a in self.weights for a in n.all_input_nodes)):
                self.weights.add(n)
        self.parametric = {n for n in self.nodes if n not in self.weights and self._has_params(n)}

    def _has_params(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return any(True for _ in self.gm.get_submodule(n.target).parameters())
        if n.op in ("call_function", "call_method"):  # F.conv2d(x, w): a weight among the inputs
            return any(a in self.weights for a in n.all_input_nodes)
        return False

    def param_free_sources(self, start: fx.Node) -> set[fx.Node]:
        """Nodes whose value reaches ``start`` through parameter-free nodes only (incl. ``start``).

        The walk stops at (and includes) parameterised nodes and graph inputs; a parameter's
        ``get_attr`` is not a tensor that flows, so it is skipped.
        """
        seen, stack = set(), [start]
        while stack:
            n = stack.pop()
            if n in seen or n in self.weights:
                continue
            seen.add(n)
            if n in self.parametric or n.op == "placeholder":
                continue
            stack.extend(n.all_input_nodes)
        return seen

    def reaches_through_params(self, src: fx.Node, dst: fx.Node) -> bool:
        """Is there a path ``src -> ... -> dst`` that passes through a parameterised node
        other than ``src`` itself? (A forward search bounded by ``dst``'s position.)"""
        limit = self.index[dst]
        seen, stack = set(), [(u, u in self.parametric) for u in src.users if self.index[u] <= limit]
        while stack:
            n, through = stack.pop()
            if n is dst:
                if through:
                    return True
                continue
            if (n, through) in seen:
                continue
            seen.add((n, through))
            for u in n.users:
                if self.index[u] <= limit:
                    stack.append((u, through or u in self.parametric))
        return False


def find_residual_connections(model: nn.Module, example_input: torch.Tensor | None = None,
                              leaf_modules: tuple[type, ...] = ()) -> list[ResidualConnection]:
    """Every residual connection in ``model`` (an empty list means the net is plain).

    Args:
        model: any ``torch.fx``-traceable module.
        example_input: optional; when given, shapes are propagated and recorded on each finding.
        leaf_modules: module types to keep opaque while tracing (their inside is not inspected).

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
    for n in g.nodes:
        if not _is_merge(n) or n in g.weights:
            continue
        ops = _operands(n)
        hit = None
        for i, a in enumerate(ops):
            for src in g.param_free_sources(a):
                for j, b in enumerate(ops):
                    if i != j and g.reaches_through_params(src, b):
                        hit = (src, a, b)
                        break
                if hit:
                    break
            if hit:
                break
        if hit:
            meta = n.meta.get("tensor_meta")
            shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            found.append(ResidualConnection(n.name, _op_name(n), hit[0].name, hit[1].name, hit[2].name, shape))
    return found


def is_plain(model: nn.Module, example_input: torch.Tensor | None = None) -> bool:
    """True when :func:`find_residual_connections` finds nothing."""
    return not find_residual_connections(model, example_input)
