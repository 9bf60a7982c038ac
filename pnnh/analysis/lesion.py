"""Lesion study (Veit, Wilber & Belongie 2016): residual nets behave like ensembles of paths.

At test time, with the weights fixed:

- **delete** one block at a time: a residual block is replaced by its shortcut (the identity, or
  the parameter-free / projection shortcut where the shape changes); a plain block has no
  shortcut, so it is replaced by the identity, and only where its input and output shapes agree;
- **swap** two neighbouring blocks whose input and output shapes all agree.

Veit et al. found that deleting a single block barely hurts a ResNet but destroys a plain net
(VGG), which they explain by the path view: a net of ``n`` residual blocks is a collection of
``2^n`` paths, ``C(n, k)`` of them through exactly ``k`` residual branches
(:func:`path_length_distribution`, a Binomial(n, 1/2)). A plain net is one path.

Blocks are patched by overriding ``forward`` on the block instance for the duration of a
measurement, so the study needs nothing from the model but :func:`~pnnh.analysis.probes.get_blocks`;
swapping assumes block ``i + 1`` consumes block ``i``'s output (true for sequential stages).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .probes import get_blocks

__all__ = ["lesion_study", "path_length_distribution", "block_shapes", "accuracy", "shortcut_path"]


def path_length_distribution(n: int) -> dict[str, Any]:
    """Paths through ``n`` residual blocks by length k: counts ``C(n, k)``, their fraction ``C(n, k)/2^n``."""
    counts = [math.comb(n, k) for k in range(n + 1)]
    return {"n_blocks": n, "length": list(range(n + 1)), "fraction": [c / 2 ** n for c in counts],
            "log10_count": [math.log10(c) for c in counts], "mean": n / 2, "std": math.sqrt(n) / 2}


@torch.no_grad()
def block_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of each block, per sample, from one forward of ``x``."""
    blocks = get_blocks(model)
    shapes: dict[int, tuple] = {}

    def record(i: int, args, out) -> None:  # a forward hook must return None (else it replaces the output)
        shapes.setdefault(i, (tuple(args[0].shape[1:]), tuple(out.shape[1:])))

    hooks = [b.register_forward_hook(lambda m, args, out, i=i: record(i, args, out)) for i, b in enumerate(blocks)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [shapes.get(i, ((), ())) for i in range(len(blocks))]


def shortcut_path(block: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What is left of a residual block when its branch is deleted, or ``None`` for a plain block.

    pnnh's pre-activation blocks that change shape take their shortcut from the pre-activated input
    (``shortcut_from_preact``), so the lesion applies ``act1(bn1(x))`` first, as the block does.
    """
    sc = getattr(block, "shortcut", None)
    if not isinstance(sc, nn.Module):
        return None
    if getattr(block, "shortcut_from_preact", False) and hasattr(block, "bn1") and hasattr(block, "act1"):
        return lambda x: sc(block.act1(block.bn1(x)))
    return lambda x: sc(x)


@contextlib.contextmanager
def _patched(patches: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    saved = [(b, b.__dict__.get("forward")) for b, _ in patches]
    for b, fn in patches:
        b.__dict__["forward"] = fn  # bypasses nn.Module.__setattr__: fn may itself be a module's method
    try:
        yield
    finally:
        for b, old in saved:
            if old is None:
                b.__dict__.pop("forward", None)
            else:
                b.__dict__["forward"] = old


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, images.shape[0])


@torch.no_grad()
def lesion_study(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, swaps: bool = True,
                 batch_size: int = 512) -> dict[str, Any]:
    """Accuracy of ``model`` (as is: eval mode, fixed norm statistics) with each block deleted / each neighbour pair swapped.

    Returns ``{"baseline", "delete": [{block, name, kind, acc}], "swap": [{blocks, names, acc}],
    "path_lengths"}``; ``kind`` is ``"shortcut"``, ``"identity"`` or ``"none"`` (a plain block that
    changes shape cannot be deleted: ``acc`` is ``None``).
    """
    blocks = get_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    shapes = block_shapes(model, images[:2])
    same = [i == o for i, o in shapes]
    base = accuracy(model, images, labels, batch_size)
    deletes = []
    for i, b in enumerate(blocks):
        fn = shortcut_path(b)
        kind = "shortcut" if fn is not None else ("identity" if same[i] else "none")
        if fn is None and same[i]:
            fn = lambda x: x  # noqa: E731
        acc = None
        if fn is not None:
            with _patched([(b, fn)]):
                acc = accuracy(model, images, labels, batch_size)
        deletes.append({"block": i, "name": names.get(id(b), str(i)), "kind": kind, "acc": acc})
    swapped = []
    if swaps:
        for i in range(len(blocks) - 1):
            if not (same[i] and same[i + 1] and shapes[i] == shapes[i + 1]):
                continue
            a, b = blocks[i], blocks[i + 1]
            with _patched([(a, b.forward), (b, a.forward)]):
                acc = accuracy(model, images, labels, batch_size)
            swapped.append({"blocks": [i, i + 1], "names": [names.get(id(a), str(i)), names.get(id(b), str(i + 1))],
                            "acc": acc})
    n_res = sum(shortcut_path(b) is not None for b in blocks)
    return {"baseline": base, "delete": deletes, "swap": swapped, "path_lengths": path_length_distribution(n_res),
            "images": int(images.shape[0])}
