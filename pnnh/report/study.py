"""The depth study: train every (family, depth, seed) of a preset, then write the results and a report.

A study is a directory::

    DIR/study.json          what was asked for (preset, families, depths, seeds, training recipe)
    DIR/runs/<run id>/      one engine run directory per run, e.g. runs/plain56-s0 (see pnnh.train)
    DIR/results.json        one record per finished run (family, model, depth, seed, params, test_acc,
                            train_img_per_s, wall_s, curves, ...), plus the study description
    DIR/results.csv         the same records without the curves
    DIR/report.md, DIR/plots/*.png, DIR/report.html (self-contained: the plots are embedded)

Re-running the same study skips the runs whose ``summary.json`` says they finished (without touching
them) and resumes an interrupted run from its last checkpoint (the engine checkpoints every epoch
and every ``checkpoint_every`` steps), so a killed study loses at most the work since that
checkpoint. A run configured differently from the one on disk is refused before anything trains.

Families are data: :data:`FAMILIES` maps a family name to a registered-model name pattern and the
model options that make the family (``plain_dirac`` is ``plain{depth}`` with ``init="dirac"``).
Presets are data too (:data:`PRESETS`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, ConfigError, DivergenceError
from ..utils import atomic_write_text, remove_stale_temp_files

__all__ = ["Family", "Preset", "FAMILIES", "PRESETS", "StudyRun", "Study", "plan_study", "run_study",
           "collect_results", "write_results", "DIAGNOSTICS_HOOK"]

# Fields of TrainConfig that decide a run's result: a finished run on disk must agree on all of them
# to be reused (the engine's RESUME_KEYS plus the test subset, which changes the reported accuracy).
_RESULT_KEYS = ("test_subset",)

# Optional diagnostics section (issue 5): if ``pnnh.analysis`` defines
# ``study_section(results: dict, study_dir: Path) -> pnnh.report.render.Section | None``,
# the report includes the section it returns. Nothing happens while it does not exist.
DIAGNOSTICS_HOOK = ("pnnh.analysis", "study_section")


# -------------------------------------------------------------------------------------------------
# families and presets (data)
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """A line in the study's plots: a registered-model name pattern plus model options.

    ``pattern.format(depth=d)`` names the model of depth ``d`` (without a pattern: the registered
    model of family ``name`` and depth ``d``, CIFAR layout first); ``model_kwargs`` are passed to it
    on top of the study's own, such as ``width``.
    """

    name: str
    pattern: str | None
    model_kwargs: dict = field(default_factory=dict)
    description: str = ""

    def model_name(self, depth: int) -> str | None:
        """The registered model of this family at ``depth``, or ``None`` if there is none."""
        from .. import models

        if self.pattern is not None:
            name = self.pattern.format(depth=depth)
            return name if models.is_model(name) else None
        found = [n for n in models.list_models(family=self.name) if models.model_info(n).depth == depth]
        found.sort(key=lambda n: models.model_info(n).layout != "cifar")
        return found[0] if found else None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("plain", "plain{depth}", {}, "plain CNN: ResNet's layers without shortcuts, He init"),
    Family("resnet", "resnet{depth}", {}, "ResNet (He et al. 2016), basic blocks, option-A shortcuts"),
    Family("pnnh", "pnnh{depth}", {}, "PNNH plain CNN: learner + weight-sharing coder, no shortcuts (our design)"),
    Family("preact_resnet", "preact_resnet{depth}", {}, "pre-activation ResNet (He et al. 2016b)"),
    Family("plain_dirac", "plain{depth}", {"init": "dirac"}, "plain CNN, identity (Dirac) init of same-shape convs"),
    Family("plain_delta", "plain{depth}", {"init": "delta_orthogonal"}, "plain CNN, delta-orthogonal init"),
)}


@dataclass(frozen=True)
class Preset:
    """A named study: data, families, depths, seeds and the training recipe every run shares.

    ``train`` holds :class:`~pnnh.train.TrainConfig` fields (a budget in ``steps`` or ``epochs``,
    optimiser, subsets, ...); ``model_kwargs`` go to every model (e.g. ``width``).
    """

    name: str
    description: str
    data: str
    families: tuple[str, ...]
    depths: tuple[int, ...]
    seeds: int
    train: dict
    model_kwargs: dict = field(default_factory=dict)
    device: str = "auto"


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "quick",
        "Fashion-MNIST, a short budget (about 0.2 epoch per run) and one seed, sized to finish within "
        "10 minutes on 2 CPU cores.",
        data="fashion-mnist", families=("plain", "resnet", "pnnh"), depths=(8, 20, 56), seeds=1,
        # grad_clip: at lr 0.1 a deep net's loss can spike early (resnet56 to 5.7 by step 20, measured),
        # which a 100-step budget cannot recover from; clipping the gradient norm, the same for every
        # family, removes the spike (resnet56 54% -> 79%; plain56 27% -> 14%; one seed each).
        train=dict(steps=100, batch_size=128, lr=0.1, schedule="onecycle", augment=False, grad_clip=1.0,
                   test_subset=2000, checkpoint_every=25, log_every=5),
    ),
    Preset(
        "standard",
        "Fashion-MNIST, a longer budget (2 epochs per run), 3 seeds, depths up to 110: meant for a GPU "
        "or a long CPU session.",
        data="fashion-mnist", families=("plain", "resnet", "pnnh", "plain_dirac"), depths=(8, 20, 32, 56, 110),
        seeds=3, train=dict(epochs=2, batch_size=128, lr=0.1, schedule="onecycle", augment=True,
                            checkpoint_every=100, log_every=20),
    ),
    Preset(
        "paper",
        "CIFAR-10 (or --data cifar100) with a recipe of the CIFAR ResNet class: 164 epochs, SGD "
        "momentum 0.9, batch 128, lr 0.1, weight decay 1e-4, crop+flip augmentation, cosine schedule "
        "(He et al. 2016 decayed the lr in steps at 32k and 48k iterations; the engine has no step "
        "schedule). For a GPU and the data.",
        data="cifar10", families=("plain", "resnet", "pnnh"), depths=(20, 32, 44, 56, 110), seeds=3,
        train=dict(epochs=164, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                   schedule="cosine", augment=True, log_every=50),
    ),
)}


# -------------------------------------------------------------------------------------------------
# planning
# -------------------------------------------------------------------------------------------------

@dataclass
class StudyRun:
    """One training run of the study."""

    family: str
    depth: int
    seed: int
    model: str
    model_kwargs: dict
    run_id: str  # directory name under DIR/runs, e.g. "plain_dirac56-s0"
    cfg: Any  # TrainConfig

    @property
    def label(self) -> str:
        return f"{self.family}{self.depth}"


@dataclass
class Study:
    """A planned study: what runs, where, and what was left out (with the reason)."""

    out: Path
    preset: str
    description: str
    data: str
    families: list[str]
    depths: list[int]
    seeds: list[int]
    train: dict  # the TrainConfig fields shared by every run
    model_kwargs: dict
    runs: list[StudyRun]
    skipped: list[str]  # one sentence per (family, depth) left out
    overrides: dict = field(default_factory=dict)  # what differs from the preset
    command: str | None = None  # the command line that asked for it, for the report

    def describe(self) -> dict[str, Any]:
        return {"preset": self.preset, "description": self.description, "data": self.data,
                "families": self.families, "family_descriptions": {f: _family(f).description for f in self.families},
                "depths": self.depths, "seeds": self.seeds, "train": self.train, "model_kwargs": self.model_kwargs,
                "runs_planned": len(self.runs), "skipped": self.skipped, "overrides": self.overrides,
                "command": self.command}


def _family(name: str) -> Family:
    """The family called ``name``: from :data:`FAMILIES`, else a registry family of that name."""
    from .. import models

    if name in FAMILIES:
        return FAMILIES[name]
    registered = {models.model_info(n).family for n in models.list_models()}
    if name in registered:  # a family without an entry here: find its models by (family, depth)
        return Family(name, None, {}, f"registered model family {name!r}")
    import difflib

    known = sorted(set(FAMILIES) | registered)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown family {name!r}{hint}; known families: {', '.join(known)}")


def plan_study(preset: str | Preset = "quick", *, out: str | Path, families: list[str] | None = None,
               depths: list[int] | None = None, seeds: int | None = None, data: str | None = None,
               data_dir: str | None = None, device: str | None = None, threads: int | None = None,
               train: dict | None = None, model_kwargs: dict | None = None, progress: bool = False,
               command: str | None = None) -> Study:
    """Resolve a preset plus overrides into the list of runs (nothing is trained).

    ``train`` overrides TrainConfig fields of the preset's recipe (``{"steps": 10}``; giving one of
    ``steps``/``epochs`` replaces the other). Families whose model does not exist at a depth are
    left out with a sentence in ``Study.skipped``; a family unknown altogether is an error.
    """
    from ..train import TrainConfig

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    fams = list(families) if families else list(preset.families)
    dps = sorted(set(depths)) if depths else list(preset.depths)
    n_seeds = preset.seeds if seeds is None else seeds
    if not fams:
        raise ConfigError("no families given")
    if any(d < 1 for d in dps):
        raise ConfigError(f"depths must be positive, got {dps}")
    if n_seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {n_seeds}")
    recipe = dict(preset.train)
    for k, v in (train or {}).items():
        if k in ("steps", "epochs") and v is not None:
            recipe.pop("steps", None)
            recipe.pop("epochs", None)
        if v is not None:
            recipe[k] = v
    mk = {**preset.model_kwargs, **(model_kwargs or {})}
    fam_objs = [_family(f) for f in dict.fromkeys(fams)]
    out = Path(out)
    runs, skipped = [], []
    for fam in fam_objs:
        missing = []
        for d in dps:
            name = fam.model_name(d)
            if name is None:
                missing.append((d, fam.pattern.format(depth=d) if fam.pattern else f"{fam.name} of depth {d}"))
                continue
            kwargs = {**mk, **fam.model_kwargs}
            for seed in range(n_seeds):
                run_id = f"{fam.name}{d}-s{seed}"
                cfg = TrainConfig(model=name, model_kwargs=kwargs, data=data or preset.data, data_dir=data_dir,
                                  seed=seed, out=str(out / "runs" / run_id), resume=True, progress=progress,
                                  device=device or preset.device, threads=threads, **recipe).validate()
                runs.append(StudyRun(fam.name, d, seed, name, kwargs, run_id, cfg))
        if missing:
            names = ", ".join(n for _, n in missing)
            if len(missing) == len(dps):
                skipped.append(f"family {fam.name} left out: no registered model {names} (see `pnnh models`)")
            else:
                skipped.append(f"family {fam.name} left out at depth {', '.join(str(d) for d, _ in missing)}: "
                               f"no registered model {names}")
    if not runs:
        raise ConfigError("nothing to run: " + "; ".join(skipped))
    # order: by depth, then seed, then family, so the first minutes already compare every family
    order = {f.name: i for i, f in enumerate(fam_objs)}
    runs.sort(key=lambda r: (r.depth, r.seed, order[r.family]))
    shared = {k: v for k, v in asdict(runs[0].cfg).items()
              if k not in ("model", "model_kwargs", "seed", "out", "resume", "progress")}
    overrides = {k: v for k, v in recipe.items() if preset.train.get(k) != v}
    for k, v, p in (("families", [f.name for f in fam_objs], list(preset.families)), ("depths", dps, list(preset.depths)),
                    ("seeds", n_seeds, preset.seeds), ("data", runs[0].cfg.data, preset.data),
                    ("model_kwargs", mk, preset.model_kwargs)):
        if v != p:
            overrides[k] = v
    return Study(out, preset.name, preset.description, runs[0].cfg.data, [f.name for f in fam_objs], dps,
                 list(range(n_seeds)), shared, mk, runs, skipped, overrides, command)


# -------------------------------------------------------------------------------------------------
# state of a run on disk
# -------------------------------------------------------------------------------------------------

def _summary(run: StudyRun) -> dict[str, Any] | None:
    path = Path(run.cfg.out) / "summary.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn summary cannot happen (atomic writes) but a hand-edited one can


def _saved_config(run: StudyRun) -> dict[str, Any] | None:
    from ..train.checkpoint import read_metadata
    from ..train.engine import CKPT_NAME

    ckpt = Path(run.cfg.out) / CKPT_NAME
    if not ckpt.exists():
        return None
    try:
        return read_metadata(ckpt).get("state", {}).get("config")
    except CheckpointError:
        return None  # the engine itself reports a corrupt checkpoint when it resumes


def _config_conflicts(run: StudyRun) -> list[str]:
    """How the run on disk was configured differently from ``run`` (empty: compatible or absent)."""
    from ..train.config import RESUME_KEYS

    saved = _saved_config(run)
    now = run.cfg.to_dict()
    if saved is not None:
        return [f"{k}: on disk {saved.get(k)!r}, now {now[k]!r}" for k in RESUME_KEYS + _RESULT_KEYS
                if saved.get(k) != now[k]]
    summary = _summary(run)
    if summary is None:
        return []
    return [f"{k}: on disk {summary.get(k)!r}, now {now[k]!r}" for k in ("model", "model_kwargs", "data", "seed")
            if summary.get(k) != now[k]]


def _finished(run: StudyRun) -> dict[str, Any] | None:
    s = _summary(run)
    return s if s is not None and s.get("status") in ("complete", "diverged") else None


def check_study_dir(study: Study) -> None:
    """Refuse (before training anything) runs on disk that were made with other settings."""
    bad = []
    for run in study.runs:
        diff = _config_conflicts(run)
        if diff:
            bad.append(f"{run.run_id} ({'; '.join(diff)})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(f"{study.out} holds runs made with different settings: {', '.join(bad[:3])}{more}. "
                          f"Use another --out, or delete those run directories to redo them")


# -------------------------------------------------------------------------------------------------
# running
# -------------------------------------------------------------------------------------------------

def _cost(run: StudyRun) -> float:
    """A relative cost estimate for ETAs: images x depth x width^2 (conv FLOPs scale so)."""
    cfg = run.cfg
    width = float(run.model_kwargs.get("width", 1.0))
    steps = cfg.steps if cfg.steps is not None else cfg.epochs * 60000 // cfg.batch_size  # epochs: rough
    test = cfg.test_subset or 10000
    return (steps * cfg.batch_size + test / 3) * (run.depth + 4) * width ** 2


def _fmt_time(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _step_reporter(run: StudyRun, log: Callable[[str], None], every_s: float = 30.0) -> Callable[[int], None]:
    """An ``on_step`` that logs progress inside a long run at most every ``every_s`` seconds."""
    total = run.cfg.steps  # with epochs the engine knows the step count; we show steps only
    t0 = time.time()
    last = [t0]

    def on_step(step: int) -> None:
        now = time.time()
        if now - last[0] >= every_s:
            last[0] = now
            of = f"/{total}" if total else ""
            log(f"      {run.label} seed {run.seed}: step {step}{of}, {_fmt_time(now - t0)} in this session")

    return on_step


def run_study(study: Study, *, log: Callable[[str], None] = print, render: bool = True,
              step_log_every_s: float | None = 30.0) -> dict[str, Any]:
    """Run (or continue) every run of ``study``, then write results and the report.

    Returns the results dict written to ``results.json``. ``log`` receives one line per event
    (run i of n, accuracy, ETA). A run whose loss diverges is recorded as diverged and the study
    goes on; any other error stops the study (re-running continues where it stopped).
    """
    from ..data.datasets import find_data_dir
    from ..train import train

    find_data_dir(study.data, study.train.get("data_dir"))  # missing data: fail before anything is written
    out = study.out
    check_study_dir(study)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # results.json etc. of a study killed mid-write
    _write_json(out / "study.json", study.describe())
    n = len(study.runs)
    log(f"study {study.preset!r}: {n} runs ({', '.join(study.families)} x depths "
        f"{', '.join(map(str, study.depths))} x {len(study.seeds)} seed{'s' if len(study.seeds) > 1 else ''}) "
        f"on {study.data} -> {out}")
    for line in study.skipped:
        log(f"  skip: {line}")
    costs = [_cost(r) for r in study.runs]
    done_cost, done_seconds, start = 0.0, 0.0, time.time()
    for i, run in enumerate(study.runs):
        tag = f"[{i + 1}/{n}] {run.label} seed {run.seed}"
        prev = _finished(run)
        if prev is not None:
            log(f"{tag}: finished earlier, kept ({_result_words(prev)})")
            continue
        partial = (Path(run.cfg.out) / "checkpoint.safetensors").exists()
        opts = ", ".join(f"{k}={v}" for k, v in sorted(run.model_kwargs.items()))
        log(f"{tag}: {'resuming from its checkpoint' if partial else 'training'} {run.model}"
            + (f" ({opts})" if opts else "") + " ...")
        t0 = time.time()
        on_step = None if (run.cfg.progress or step_log_every_s is None) else _step_reporter(run, log, step_log_every_s)
        try:
            summary = train(run.cfg, on_step=on_step)
        except DivergenceError as e:
            summary = {"status": "diverged", "error": str(e)}
            log(f"{tag}: diverged ({e})")
        took = time.time() - t0
        if not partial:  # a resumed run did only part of its work: it would skew the rate
            done_cost += costs[i]
            done_seconds += took
        left = sum(c for j, c in enumerate(costs[i + 1:], i + 1) if _finished(study.runs[j]) is None)
        eta = done_seconds / done_cost * left if done_cost else float("nan")
        log(f"{tag}: {_result_words(summary)}, {took:.1f} s | elapsed {_fmt_time(time.time() - start)}, "
            f"ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}")
        write_results(study, collect_results(study))  # a killed study still leaves its results so far
    results = collect_results(study)
    write_results(study, results)
    if render:
        from .render import write_report

        paths = write_report(out, results, sections=_diagnostics_sections(results, out, log))
        log(f"report: {paths['md']} and {paths['html']} (open in a browser)")
    return results


def _result_words(s: dict[str, Any]) -> str:
    if s.get("status") == "diverged":
        return "diverged"
    return f"test acc {s['test_acc'] * 100:.1f}%, {s['train_img_per_s']:.0f} train img/s"


def _diagnostics_sections(results: dict[str, Any], out: Path, log: Callable[[str], None]) -> list:
    """The optional diagnostics section (see :data:`DIAGNOSTICS_HOOK`); empty until it exists."""
    import importlib

    mod_name, fn_name = DIAGNOSTICS_HOOK
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name, None)
    except ImportError:
        return []
    if fn is None:
        return []
    section = fn(results, out)
    return [section] if section is not None else []


# -------------------------------------------------------------------------------------------------
# results
# -------------------------------------------------------------------------------------------------

RECORD_KEYS = ("family", "model", "depth", "seed", "status", "params", "test_acc", "test_loss", "test_images",
               "train_img_per_s", "train_seconds", "wall_s", "steps", "epochs", "batch_size", "device", "threads",
               "model_kwargs", "run_dir", "curves")


def collect_results(study: Study) -> dict[str, Any]:
    """Records of every finished run of ``study`` (read from the run directories)."""
    import platform

    from ..version import __version__

    records = []
    for run in study.runs:
        s = _finished(run)
        if s is None:
            continue
        rec = {"family": run.family, "model": run.model, "depth": run.depth, "seed": run.seed,
               "status": s.get("status"), "model_kwargs": run.model_kwargs, "run_dir": f"runs/{run.run_id}"}
        if s.get("status") == "complete":
            rec.update({k: s.get(k) for k in ("params", "test_acc", "test_loss", "train_img_per_s", "train_seconds",
                                              "wall_s", "steps", "epochs", "batch_size", "device", "threads")})
            rec["curves"] = _curves(s, Path(run.cfg.out) / "metrics.jsonl")
            rec["test_images"] = run.cfg.test_subset or None  # None: the whole test split
        else:
            rec["error"] = s.get("error")
        records.append({k: rec.get(k) for k in RECORD_KEYS} | ({"error": rec["error"]} if "error" in rec else {}))
    meta = study.describe()
    meta.update({"runs_finished": len(records), "complete": len(records) == len(study.runs),
                 "pnnh": __version__, "python": platform.python_version(), "machine": platform.machine(),
                 "cpu_count": _cpu_count(), "written": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return json.loads(json.dumps({"study": meta, "runs": records}))  # plain JSON types, as in results.json


def _curves(summary: dict[str, Any], metrics: Path) -> dict[str, list[list[float]]]:
    """Training loss per logged step (the engine's curve) and per-epoch metrics, as [step, value] pairs."""
    out: dict[str, list[list[float]]] = {"train_loss": summary.get("curve") or []}
    try:
        lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    except (OSError, json.JSONDecodeError):
        lines = []
    for key in ("train_acc", "test_acc", "test_loss"):
        out[key] = [[ln["step"], ln[key]] for ln in lines if ln.get(key) is not None]
    return out


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count()


CSV_COLUMNS = ("family", "model", "depth", "seed", "status", "params", "test_acc", "test_loss", "test_images",
               "train_img_per_s", "train_seconds", "wall_s", "steps", "epochs", "batch_size", "device", "threads",
               "model_kwargs", "run_dir")


def results_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in results["runs"]:
        w.writerow([json.dumps(r[c], sort_keys=True) if c == "model_kwargs" else ("" if r.get(c) is None else r[c])
                    for c in CSV_COLUMNS])
    return buf.getvalue()


def write_results(study: Study, results: dict[str, Any]) -> None:
    _write_json(study.out / "results.json", results)
    atomic_write_text(study.out / "results.csv", results_csv(results))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
