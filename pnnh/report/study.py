"""The depth study: train every (family, depth, seed) of a preset, then write the results and a report.

A study is a directory::

    DIR/study.json          what was asked for (preset, families, depths, seeds, training recipe)
    DIR/runs/<run id>/      one engine run directory per run, e.g. runs/plain56-s0 (see pnnh.train)
    DIR/results.json        one record per finished run (family, model, depth, seed, params, test_acc,
                            train_img_per_s, wall_s, curves, ...), plus the study description
    DIR/results.csv         the same records without the curves
    DIR/report.md, DIR/plots/*.png, DIR/report.html (self-contained: the plots are embedded)
    DIR/logs/<run id>.log   output of worker processes (``--jobs N``); DIR/slurm/: Slurm job files

The runs go through the experiment runner (:mod:`pnnh.experiments`): re-running the same study
skips the runs whose ``summary.json`` says they finished (without touching them) and resumes an
interrupted run from its last checkpoint (the engine checkpoints every epoch and every
``checkpoint_every`` steps), so a killed study loses at most the work since that checkpoint. A
run configured differently from the one on disk is refused before anything trains. Runs execute
in this process, in N worker processes or as Slurm jobs (:mod:`pnnh.experiments.launchers`).

Families are data: :data:`FAMILIES` maps a family name to a registered-model name pattern and the
model options that make the family (``plain_dirac`` is ``plain{depth}`` with ``init="dirac"``),
read from ``configs/study/families.yaml``. Presets are data too (:data:`PRESETS`, from
``configs/study/<name>.yaml``; any such YAML file can be passed as a preset).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..experiments.grid import Grid, Run
from ..experiments.launchers import LaunchOptions, make_launcher
from ..experiments.results import curves
from ..experiments.runner import run_grid, step_reporter
from ..experiments.state import check_grid, finished
from ..utils import atomic_write_text, remove_stale_temp_files

__all__ = ["Family", "Preset", "FAMILIES", "PRESETS", "StudyRun", "Study", "load_families", "load_preset",
           "plan_study", "study_grid", "check_study_dir", "run_study", "collect_results", "write_results"]


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


def load_families(path: str | Path = "study/families.yaml") -> dict[str, Family]:
    """Families from a YAML mapping ``name: {pattern, model_kwargs, description}`` (``configs/study/``)."""
    from ..experiments.grid import load_yaml

    return {name: Family(name, d.get("pattern"), dict(d.get("model_kwargs") or {}), d.get("description", ""))
            for name, d in load_yaml(path).items()}


FAMILIES: dict[str, Family] = load_families()


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


_PRESET_KEYS = ("name", "description", "data", "families", "depths", "seeds", "train", "model_kwargs", "device")


def load_preset(path: str | Path) -> Preset:
    """A preset from a YAML file with the fields of :class:`Preset` (``configs/study/quick.yaml``)."""
    from ..experiments.grid import load_yaml

    d = load_yaml(path)
    unknown = sorted(set(d) - set(_PRESET_KEYS))
    missing = [k for k in ("data", "families", "depths", "seeds", "train") if k not in d]
    if unknown or missing:
        raise ConfigError(f"study file {path}: " + "; ".join(
            ([f"unknown key(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"missing {', '.join(missing)}"] if missing else [])) + f" (keys: {', '.join(_PRESET_KEYS)})")
    return Preset(d.get("name") or Path(path).stem, d.get("description", ""), d["data"], tuple(d["families"]),
                  tuple(d["depths"]), int(d["seeds"]), dict(d["train"]), dict(d.get("model_kwargs") or {}),
                  d.get("device", "auto"))


PRESETS: dict[str, Preset] = {p.name: p for p in (load_preset(f"study/{n}.yaml") for n in ("quick", "standard", "paper"))}


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

    ``preset`` is a name of :data:`PRESETS`, a :class:`Preset` or a YAML file of one.
    ``train`` overrides TrainConfig fields of the preset's recipe (``{"steps": 10}``; giving one of
    ``steps``/``epochs`` replaces the other). Families whose model does not exist at a depth are
    left out with a sentence in ``Study.skipped``; a family unknown altogether is an error.
    """
    from ..train import TrainConfig

    if isinstance(preset, str):
        if preset in PRESETS:
            preset = PRESETS[preset]
        elif preset.endswith((".yaml", ".yml")):
            preset = load_preset(preset)
        else:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} or a .yaml file")
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
# running (pnnh.experiments: the reuse/resume rule, launchers, progress)
# -------------------------------------------------------------------------------------------------

def study_grid(study: Study) -> Grid:
    """The study's runs as a grid of the experiment runner (run directories ``DIR/runs/<run id>``)."""
    return Grid("study", study.out, [Run(r.run_id, f"{r.label} seed {r.seed}", r.cfg) for r in study.runs])


def check_study_dir(study: Study) -> None:
    """Refuse (before training anything) runs on disk that were made with other settings."""
    check_grid(study_grid(study))


def run_study(study: Study, *, log: Callable[[str], None] = print, render: bool = True,
              step_log_every_s: float | None = 30.0, launch: LaunchOptions | None = None) -> dict[str, Any]:
    """Run (or continue) every run of ``study``, then write results and the report.

    Returns the results dict written to ``results.json``. ``log`` receives one line per event
    (run i of n, accuracy, runs done / running / left, ETA). ``launch`` says where runs execute
    (default: one after another in this process). A run whose loss diverges is recorded as
    diverged and the study goes on; in this process any other error stops the study, with worker
    processes or Slurm jobs the other runs go on and the study then fails (re-running continues
    where it stopped, resuming each unfinished run from its last checkpoint).
    """
    from ..data.datasets import find_data_dir

    find_data_dir(study.data, study.train.get("data_dir"))  # missing data: fail before anything is written
    out = study.out
    grid = study_grid(study)
    check_grid(grid)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # results.json etc. of a study killed mid-write
    _write_json(out / "study.json", study.describe())
    n = len(study.runs)
    log(f"study {study.preset!r}: {n} runs ({', '.join(study.families)} x depths "
        f"{', '.join(map(str, study.depths))} x {len(study.seeds)} seed{'s' if len(study.seeds) > 1 else ''}) "
        f"on {study.data} -> {out}")
    for line in study.skipped:
        log(f"  skip: {line}")
    launch = launch or LaunchOptions()

    def on_step(run: Run):
        return None if (run.cfg.progress or step_log_every_s is None) else step_reporter(run, log, step_log_every_s)

    launcher = make_launcher(launch, out, name=f"pnnh-study-{study.preset}", on_step=on_step)
    # a killed study still leaves its results so far
    run_grid(grid, launcher, log=log, on_run_end=lambda: write_results(study, collect_results(study)))
    results = collect_results(study)
    write_results(study, results)
    if render:
        from .render import write_report

        paths = write_report(out, results)
        log(f"report: {paths['md']} and {paths['html']} (open in a browser)")
    return results


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
    for run, grid_run in zip(study.runs, study_grid(study).runs):
        s = finished(grid_run)
        if s is None:
            continue
        rec = {"family": run.family, "model": run.model, "depth": run.depth, "seed": run.seed,
               "status": s.get("status"), "model_kwargs": run.model_kwargs, "run_dir": f"runs/{run.run_id}"}
        if s.get("status") == "complete":
            rec.update({k: s.get(k) for k in ("params", "test_acc", "test_loss", "train_img_per_s", "train_seconds",
                                              "wall_s", "steps", "epochs", "batch_size", "device", "threads")})
            rec["curves"] = curves(s, Path(run.cfg.out) / "metrics.jsonl")
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
