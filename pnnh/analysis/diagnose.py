"""All diagnostics of one model on one batch of images: :func:`run_diagnostics`.

One forward pass with hooks measures, at every probe (:mod:`pnnh.analysis.probes`), how much of
the input survives (:mod:`~pnnh.analysis.similarity`), the pre-activation statistics of every
activation (:mod:`~pnnh.analysis.theory`) and the signal-propagation statistics of every block
(Brock et al. 2021). Then the input-gradient correlation along lines of inputs
(:mod:`~pnnh.analysis.gradients`), the He-normal theory simulated on the same images, (for
trained models) the lesion study (:mod:`~pnnh.analysis.lesion`), and (for residual models) the
path-length distribution with each branch weighted by its BN scale and by its measured size against
its shortcut, the dynamic ensemble of Littwin & Wolf (:mod:`~pnnh.analysis.ensemble`).

The model is deep-copied: its weights and BatchNorm statistics are never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import InMemoryLoader, load_dataset
from ..data.datasets import ArrayDataset
from ..errors import ConfigError
from .dists import to_gray_image
from .gradients import gradient_correlation
from .ensemble import effective_path_lengths
from .lesion import lesion_study, path_length_distribution, shortcut_path
from .probes import ProbeTap, adopt_blocks, calibrate_batch_norm, get_blocks, resolve_norm_stats, resolve_probe_mode
from .similarity import (cka_with_floor, dissipation_depth, features_for_gram, gram, noise_band, ridge_r2_with_floor,
                         shuffles)
from .theory import PAPER_FORM, channel_moments, preactivation_stats, simulate_he_layers

__all__ = ["DiagnoseConfig", "diagnose", "run_diagnostics", "channel_stats", "load_images", "summarize"]


@dataclass
class DiagnoseConfig:
    """What :func:`run_diagnostics` measures and how finely. ``pnnh diagnose`` flags fill this in."""

    probes: str = "auto"  # auto | blocks | layers (pnnh.analysis.probes)
    norm_stats: str = "auto"  # auto (batch statistics at init, running ones once trained) | batch | running
    max_dim: int | None = 4096  # activations with more values per image are average-pooled before the Gram matrix
    target_size: int = 7  # the ridge readout reconstructs the input average-pooled to this side
    n_shuffles: int = 8  # shuffled image-input pairings for the noise floor
    z: float = 3.0  # half-width of the noise band, in standard deviations
    gradients: bool = True  # shattered-gradients measurement
    grad_lines: int = 4
    grad_points: int = 8
    grad_span: float = 0.25
    grad_max_probes: int = 10
    lesion: bool | None = None  # None: when labels are given and the model is trained
    lesion_images: int | None = None  # lesion study on the first N images only (None: all)
    stats_images: int | None = 128  # pre-activation / signal statistics on the first N images (None: all)
    theory: bool = True  # simulate He-normal plain / residual layers on the images
    theory_depth: int = 12
    theory_images: int = 256
    dists_images: int = 32  # DISTS settings, used when a DISTS module is given
    dists_size: int = 48
    dists_max_probes: int = 10
    seed: int = 0  # seeds the shuffles, readouts and simulations

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiagnoseConfig":
        """A config from keyword settings; an unknown key is a ConfigError naming the closest field."""
        known = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in known:
                close = difflib.get_close_matches(k, known, 1)
                raise ConfigError(f"unknown diagnose setting {k!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        return cls(**d)

def channel_stats(t: torch.Tensor) -> dict[str, float]:
    """Brock et al.'s signal-propagation statistics of one activation (channel = dim 1, or last for tokens).

    ``avg_sq_mean``: mean over channels of the squared channel mean; ``avg_var``: mean over
    channels of the channel variance (over batch and positions); ``mean_sq``: ``E[x²]``, their sum.
    """
    m, v = channel_moments(t)
    sq, var = float((m ** 2).mean()), float(v.mean())
    return {"avg_sq_mean": sq, "avg_var": var, "mean_sq": sq + var}


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def _metric_block(values: torch.Tensor, floor: torch.Tensor, z: float, probes: list[dict]) -> dict[str, Any]:
    mean, std, upper = noise_band(floor, z)
    d = dissipation_depth(values, upper)
    within = (values <= upper)
    return {
        "value": values.tolist(), "floor_mean": mean.tolist(), "floor_std": std.tolist(), "floor_upper": upper.tolist(),
        "dissipation": None if d is None else {"index": d, "name": probes[d]["name"], "depth": probes[d]["depth"]},
        "within_band": int(within.sum()), "above_floor_at_last": bool(values[-1] > upper[-1]),
    }


def diagnose(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *,
             dists: nn.Module | None = None, log: Callable[[str], None] | None = None, **settings: Any) -> dict[str, Any]:
    """:func:`run_diagnostics` with :class:`DiagnoseConfig` fields as keywords:
    ``diagnose(model, x, y, probes="layers", gradients=False)``. Any ``nn.Module`` works."""
    return run_diagnostics(model, images, labels, DiagnoseConfig.from_dict(settings), dists=dists, log=log)


def run_diagnostics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                    config: DiagnoseConfig | None = None, *, dists: nn.Module | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure how a model carries its input through depth; returns a JSON-serialisable dict.

    Args:
        model: any ``nn.Module``; not modified. Block probes read the outputs of ``model.blocks()``
            (or of an ``nn.Sequential``'s children; slices of a Sequential are fine); a model
            without blocks is probed at every activation module.
        images: N×C×H×W normalised images (the model's input), ideally a random sample.
        labels: their labels (enables accuracy and the lesion study).
        config: what to measure (:class:`DiagnoseConfig`; its defaults when ``None``). The lesion
            study (``lesion=None``: when labels are given and the model's BatchNorm statistics
            are no longer the initial ones; pass ``True`` for a model without BatchNorm) costs
            about two forward passes per block and needs blocks.
        dists: a :class:`pnnh.analysis.dists.DISTS` module (from local weight files) or ``None``.
        log: optional ``print``-like callback for progress lines.
    """
    c = config or DiagnoseConfig()
    probes, norm_stats, max_dim, target_size, n_shuffles, z = (c.probes, c.norm_stats, c.max_dim, c.target_size,
                                                                c.n_shuffles, c.z)
    lesion, lesion_images, stats_images, seed = c.lesion, c.lesion_images, c.stats_images, c.seed
    if images.dim() < 3:
        raise ConfigError(f"images must be N×C×H×W (or N×T×C), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if n < 16:
        raise ConfigError(f"need at least 16 images for the diagnostics, got {n}")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    work = adopt_blocks(copy.deepcopy(model).float().eval().to(images.device))
    mode = resolve_probe_mode(work, probes)
    stats_mode = resolve_norm_stats(work, norm_stats)
    trained = resolve_norm_stats(work, "auto") == "running"  # BatchNorm statistics moved: trained
    images = images.float()
    blocks = get_blocks(work, required=mode == "blocks")  # fail early with a clear message

    # ---- one forward: probes (Gram matrices), pre-activations, block statistics -------------------
    k_dists = min(c.dists_images, n) if dists is not None else 0

    def reduce(t: torch.Tensor, p) -> dict[str, torch.Tensor]:
        out = {"gram": gram(features_for_gram(t, max_dim))}
        if k_dists and t.dim() == 4:
            out["map"] = t[:k_dists].detach().float().mean(1, keepdim=True)
        return out

    with torch.no_grad(), calibrate_batch_norm(work, enabled=stats_mode == "batch"), \
            ProbeTap(work, mode, reduce, preact=lambda t, p: preactivation_stats(t[:stats_images]),
                     block_fn=lambda t, p: channel_stats(t[:stats_images])) as tap:
        logits = work(images)
    timing["forward"] = time.perf_counter() - t0
    probe_meta = [p.meta() for p in tap.probes]
    if not probe_meta:
        raise ConfigError("no probe fired during the forward pass; check the model's blocks()")
    _log(log, f"forward with hooks: {len(probe_meta)} probes ({mode}), {timing['forward']:.1f}s")

    result: dict[str, Any] = {
        "model": getattr(model, "pnnh_name", type(model).__name__),
        "model_kwargs": getattr(model, "pnnh_kwargs", {}),
        "params": sum(p.numel() for p in model.parameters()),
        "images": n, "probe_mode": mode, "norm_stats": stats_mode,
        "settings": {"max_dim": max_dim, "target_size": target_size, "n_shuffles": n_shuffles, "z": z, "seed": seed,
                     "stats_images": min(n, stats_images or n)},
    }
    if labels is not None and logits.dim() == 2:
        result["accuracy"] = float((logits.argmax(1) == labels.to(logits.device)).float().mean())

    # ---- dissipating inputs ---------------------------------------------------------------------
    t = time.perf_counter()
    grams = torch.stack([p.value["gram"] for p in tap.probes])
    l_in = gram(features_for_gram(images, max_dim))
    perms = shuffles(n, n_shuffles, seed)
    target = F.adaptive_avg_pool2d(images, target_size).reshape(n, -1) if images.dim() == 4 else images.reshape(n, -1)
    metrics = {}
    for name, (vals, floor) in (("cka", cka_with_floor(grams, l_in, perms)),
                                ("cka_debiased", cka_with_floor(grams, l_in, perms, debiased=True)),
                                ("ridge_r2", ridge_r2_with_floor(grams, target, perms))):
        metrics[name] = _metric_block(vals, floor, z, probe_meta)
    del grams
    timing["dissipation"] = time.perf_counter() - t
    if dists is not None:
        t = time.perf_counter()
        metrics["dists_similarity"] = _dists_metric(dists, tap.probes, images[:k_dists], n_shuffles, z, c.dists_size,
                                                    c.dists_max_probes, seed)
        timing["dists"] = time.perf_counter() - t
    result["dissipation"] = {"probes": probe_meta, "metrics": metrics}
    _log(log, f"dissipation metrics: {timing['dissipation']:.1f}s")

    # ---- surviving neurons, signal propagation ----------------------------------------------------
    result["surviving"] = {
        "layers": [{"name": p.name, "depth": p.depth, **p.value} for p in tap.preacts],
        "paper_form": PAPER_FORM,
    }
    if c.theory:
        t = time.perf_counter()
        flat = images[:c.theory_images].reshape(min(n, c.theory_images), -1)
        result["surviving"]["theory"] = {
            "input": f"the first {flat.shape[0]} diagnostic images, flattened", "width": flat.shape[1],
            "depth": c.theory_depth,
            "plain": simulate_he_layers(flat, c.theory_depth, residual=False, seed=seed, dtype=torch.float32),
            "residual": simulate_he_layers(flat, c.theory_depth, residual=True, seed=seed, dtype=torch.float32),
        }
        timing["theory"] = time.perf_counter() - t
    branches = {p.name: p.value for p in tap.branches}
    result["signal"] = {"blocks": [{"name": p.name, "depth": p.depth, **p.value,
                                    "branch_var": branches[p.name]["avg_var"] if p.name in branches else None}
                                   for p in tap.block_outs]}
    tap.reset()

    # ---- shattered gradients ---------------------------------------------------------------------
    if c.gradients:
        t = time.perf_counter()
        result["gradients"] = gradient_correlation(work, images, mode, n_lines=min(c.grad_lines, n // 2),
                                                   points=c.grad_points, span=c.grad_span,
                                                   max_probes=c.grad_max_probes, seed=seed)
        timing["gradients"] = time.perf_counter() - t
        _log(log, f"gradient correlation: {timing['gradients']:.1f}s")

    # ---- lesions ---------------------------------------------------------------------------------
    blocks = get_blocks(work, required=False)
    n_res = sum(shortcut_path(b) is not None for b in blocks)
    if lesion is None:
        lesion = labels is not None and trained and bool(blocks)
    if lesion:
        if labels is None:
            raise ConfigError("the lesion study needs labels")
        if not blocks:
            raise ConfigError(f"the lesion study deletes blocks; {type(model).__name__} has no blocks()")
        t = time.perf_counter()
        result["lesion"] = lesion_study(work, images[:lesion_images], labels[:lesion_images])
        timing["lesion"] = time.perf_counter() - t
        _log(log, f"lesion study: {timing['lesion']:.1f}s")
    else:
        why = ("no labels" if labels is None else "the model has no blocks" if not blocks else
               "not requested (lesion=False)" if c.lesion is False else
               "untrained model (BatchNorm statistics at their initial values); pass lesion=True / --lesion to force"
               if stats_mode != "none" else
               "no BatchNorm statistics show whether the model is trained; pass lesion=True / --lesion to run it")
        result["lesion"] = {"skipped": why}
    result["path_lengths"] = path_length_distribution(n_res)
    if n_res:  # the paths weighted by each branch's BN scale and measured size (Littwin & Wolf)
        t = time.perf_counter()
        result["effective_path_lengths"] = effective_path_lengths(work, images[:stats_images], norm_stats=stats_mode)
        timing["effective_path_lengths"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t0
    result["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    return result


def _dists_metric(dists: nn.Module, probes, images: torch.Tensor, n_shuffles: int, z: float, size: int,
                  max_probes: int, seed: int) -> dict[str, Any]:
    """1 - DISTS between each selected probe's channel-mean map and the input, with a shuffled floor."""

    k = images.shape[0]
    with_map = [p for p in probes if "map" in p.value]
    if not with_map or k < 4:
        return {"skipped": "needs 4-D activations and at least 4 images"}
    m = min(len(with_map), max_probes)
    chosen = [with_map[round(i * (len(with_map) - 1) / max(1, m - 1))] for i in range(m)]
    perms = shuffles(k, n_shuffles, seed + 1)
    dists = dists.to(images.device).eval()
    with torch.no_grad():
        f_in = dists.features(to_gray_image(images, size))
        vals, floors = [], []
        for p in chosen:
            f_p = dists.features(to_gray_image(p.value["map"], size))
            vals.append(1 - dists.distance(f_p, f_in).mean())
            floors.append(torch.stack([1 - dists.distance(f_p, [f[perm.to(f.device)] for f in f_in]).mean()
                                       for perm in perms]))
    meta = [p.meta() for p in chosen]
    out = _metric_block(torch.stack(vals).double(), torch.stack(floors).double(), z, meta)
    out["probes"] = meta
    out["images"], out["size"] = k, size
    return out


def load_images(data: str = "fashion-mnist", n: int = 512, data_dir: str | None = None, split: str = "test",
                seed: int = 0, img_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A reproducible random sample of ``n`` normalised images and labels from a dataset split."""

    ds = load_dataset(data, split, data_dir, img_size=img_size)
    if n < 1:
        raise ConfigError(f"--images must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n]
    sub = ArrayDataset(ds.images[idx], ds.labels[idx], ds.classes, ds.name, ds.mean, ds.std, ds.split)
    x, y = next(iter(InMemoryLoader(sub, batch_size=len(sub), train=False)))
    return x, y, ds


def summarize(result: dict[str, Any]) -> str:
    """A few lines for people: dissipation depths per metric, gradient correlation, timings."""
    lines = [f"{result['model']}: {result['images']} images, probes={result['probe_mode']}, "
             f"norm statistics={result['norm_stats']}"
             + (f", accuracy {result['accuracy'] * 100:.1f}%" if "accuracy" in result else "")]
    probes = result["dissipation"]["probes"]
    last = probes[-1]
    for name, m in result["dissipation"]["metrics"].items():
        if "value" not in m:
            continue
        d = m["dissipation"]
        where = (f"dissipated at depth {d['depth']} ({d['name']})" if d else
                 f"above the noise floor through the last probe (depth {last['depth']})")
        lines.append(f"  {name:<16} first {m['value'][0]:+.3f}  last {m['value'][-1]:+.3f} "
                     f"(floor ≤ {m['floor_upper'][-1]:+.3f}): {where}; {m['within_band']}/{len(m['value'])} probes in band")
    if "gradients" in result:
        g = result["gradients"]
        lines.append(f"  gradient correlation (lag 1): first {g['lag1'][0]:.3f}, last {g['lag1'][-1]:.3f} "
                     f"(depth {g['probes'][-1]['depth']})")
    if "skipped" not in result["lesion"]:
        les = result["lesion"]
        accs = [d["acc"] for d in les["delete"] if d["acc"] is not None]
        if accs:
            lines.append(f"  lesion: baseline {les['baseline'] * 100:.1f}%, single deletions "
                         f"{min(accs) * 100:.1f}-{max(accs) * 100:.1f}% (median {statistics.median(accs) * 100:.1f}%)")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timing_s"].items()))
    return "\n".join(lines)
