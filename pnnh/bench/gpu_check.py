"""One prepared, time-boxed check of the GPU path, written to one JSON file and one Markdown page.

``python -m pnnh.bench.gpu_check OUT_DIR`` (``scripts/gpu_check.sh OUT_DIR``, ``make gpu-check``)
runs these steps in order, each in its own process with its own time box, all within one total
budget (``--budget``, default 450 s):

``environment``
    torch, CUDA, GPU, timm, torchvision and ``pnnh.convert`` as this machine has them.
``cuda_tests``
    the suite's ``cuda``-marked tests (``pytest -m cuda``): loader, engine, AMP bf16 and fp16 with a
    grad scaler, ``torch.compile`` of a training step, channels-last, deploy/fuse parity.
``fmnist_amp``
    one epoch of resnet56, pnnh56 and plain56 on Fashion-MNIST with bf16 autocast (the engine's
    defaults otherwise): test accuracy and training images/s.
``bench_cifar`` / ``bench_imagenet``
    :func:`~pnnh.bench.run_bench` side by side: training, and fused (:func:`pnnh.deploy`)
    inference, of resnet56 / pnnh56 / plain56 (CIFAR layout, 3x32x32, batch 512) and of resnet50 /
    pnnh50 / plain50 (ImageNet layout, 3x224x224 synthetic, batch 256) with timm's and torchvision's
    ``resnet50`` in the same alternating rounds where they import. bf16 autocast, channels-last.
``bench_cifar_reference``
    the CIFAR nets' training again with ``PNNH_KERNELS=reference`` (every PNNH layer through its
    reference forward): what the training kernels of :mod:`pnnh.models.kernels` gain on this GPU.
``profile_cifar``
    one training step of resnet56 and pnnh56 (the bench's settings) under ``torch.profiler``: the
    wall time against the GPU's busy time and the kernels launched per step, and the operators
    that take the GPU's time (:func:`~pnnh.bench.bench.profile_training_step`).
``convert``
    where ``pnnh.convert`` exists: torchvision's ``resnet50`` and timm's ``vit_small_patch16_224``
    converted to PNNH and trained for a few steps each (bf16 autocast, synthetic 224 px batches).
``bench_cifar_compile`` / ``bench_imagenet_compile``
    the same benches with every model also under ``torch.compile``, eager and compiled side by side.

A step that fails, raises or runs out of time is recorded as such (status, error, the tail of its
log) and the next one runs. The JSON and the Markdown are rewritten after every step, so an
interrupted run still leaves what it measured. ``--dry-run`` runs every step on the CPU with tiny
models and sizes (no timm/torchvision, no compile) in well under a minute: the test suite runs it so
that the check cannot rot between runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

# Each step imports what it uses inside its own function (it runs in its own process): an import that fails
# on the GPU machine (a library missing, or built for another torch or CUDA) fails that step only, and the
# check records it and runs the next step.

__all__ = ["CheckPlan", "make_plan", "run_check", "format_markdown", "STEPS", "main"]

JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"
LOG_TAIL = 3000  # characters of a failed step's log kept in the JSON


@dataclass
class CheckPlan:
    """Everything a step needs to know; written to ``OUT_DIR/plan.json`` for the step processes."""

    out_dir: str
    dry_run: bool = False
    device: str = "cuda"
    budget_s: float = 450.0
    amp: str = "bf16"
    data_dir: str | None = None
    tests_dir: str | None = None  # the suite whose cuda-marked tests run; None: the repository's tests/
    # the nets of each layout: (residual, PNNH, plain)
    cifar_models: tuple[str, ...] = ("resnet56", "pnnh56", "plain56")
    imagenet_models: tuple[str, ...] = ("resnet50", "pnnh50", "plain50")
    external_models: tuple[str, ...] = ("timm:resnet50", "torchvision:resnet50")
    cifar_batch: int = 512
    imagenet_batch: int = 256
    imagenet_size: int = 224
    bench_rounds: dict = field(default_factory=lambda: {"repeats": 5, "steps": 5, "warmup": 3})
    fmnist: dict = field(default_factory=lambda: {"epochs": 1, "batch_size": 128})
    bench_model_kwargs: dict = field(default_factory=dict)  # options of our nets in the benches
    profile_steps: int = 5  # training steps under the profiler, per model
    convert_steps: int = 10
    convert_batch: int = 64
    compile: bool = True
    # seconds each step may take at most (the total budget caps them further)
    step_timeout_s: dict = field(default_factory=lambda: dict(
        environment=30, cuda_tests=150, fmnist_amp=100, bench_cifar=60, bench_cifar_reference=45, profile_cifar=60, bench_imagenet=75,
        convert=45,
        bench_cifar_compile=120, bench_imagenet_compile=150))


def make_plan(out_dir: str | os.PathLike, *, dry_run: bool = False, budget_s: float | None = None,
              data_dir: str | None = None, tests_dir: str | None = None) -> CheckPlan:
    """The plan of a GPU run, or with ``dry_run`` the same steps at CPU-sized settings."""
    plan = CheckPlan(out_dir=str(out_dir), dry_run=dry_run, data_dir=data_dir, tests_dir=tests_dir)
    if dry_run:
        plan.device = "cpu"
        plan.cifar_models = ("resnet8", "pnnh8", "plain8")
        plan.imagenet_models = ("resnet18", "pnnh18", "plain18")
        plan.external_models = ()
        plan.cifar_batch, plan.imagenet_batch, plan.imagenet_size = 4, 2, 32
        plan.bench_rounds = {"repeats": 1, "steps": 1, "warmup": 0}
        plan.bench_model_kwargs = {"width": 0.25}
        plan.fmnist = {"epochs": 1, "batch_size": 64, "train_subset": 128, "test_subset": 64,
                       "model_kwargs": {"width": 0.25}}
        plan.convert_steps, plan.convert_batch, plan.profile_steps = 2, 2, 1
        plan.compile = False
        plan.step_timeout_s = {k: 60 for k in plan.step_timeout_s}
        plan.budget_s = 120.0
    if budget_s is not None:
        plan.budget_s = float(budget_s)
    return plan


# -------------------------------------------------------------------------------------------------
# steps (each runs in its own process: see _run_step)
# -------------------------------------------------------------------------------------------------

class Skip(Exception):
    """A step that does not apply here (the reason is recorded)."""


def _each(res: dict, into: dict, items: dict[str, Callable[[], dict]], emit: Callable[[dict], None]) -> dict:
    """``into[key] = measure()`` for each item of ``items``, emitting ``res`` after each (what is done
    survives a timeout); an item that raises gets its error instead and the rest still run, and
    ``res`` is then marked failed."""
    failed = False
    for key, measure in items.items():
        try:
            into[key] = measure()
        except Exception as e:
            into[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-LOG_TAIL:]}
            failed = True
        emit(res)
    if failed:
        res["status"] = "failed"
    return res


def _versions() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    for lib in ("timm", "torchvision", "triton", "pytest"):
        try:
            info[lib] = importlib.import_module(lib).__version__
        except Exception as e:  # missing, or built for another torch
            info[lib] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    info["pnnh_convert"] = _converter() is not None
    return info


def step_environment(plan: CheckPlan, emit: Callable[[dict], None]) -> dict:
    info = _versions()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not available: {e}"
    return info


def _tests_dir(plan: CheckPlan) -> Path:
    if plan.tests_dir:
        return Path(plan.tests_dir)
    return Path(__file__).resolve().parents[2] / "tests"


def step_cuda_tests(plan: CheckPlan, emit: Callable[[dict], None]) -> dict:
    import xml.etree.ElementTree as ET

    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest does not import here: pip install pytest (scripts/gpu_check.sh installs it "
                           "from wheels/ when the directory is there)")
    tests = _tests_dir(plan)
    if not tests.is_dir():
        raise Skip(f"no test suite at {tests} (an installed pnnh without its repository)")
    # only the modules that hold cuda-marked tests are collected: the others may import packages
    # (Pillow, onnx ...) that a GPU machine lacks, and collecting the whole suite takes time
    files = sorted(str(p) for p in tests.rglob("test_*.py") if "mark.cuda" in p.read_text(errors="replace"))
    if not files:
        raise Skip(f"no cuda-marked tests under {tests}")
    xml = Path(plan.out_dir) / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", "--junitxml", str(xml),
           "-o", "junit_family=xunit1", "--rootdir", str(tests.parent), *files]
    sys.stdout.flush()
    # pytest writes to this step's log, line by line: if the time box stops it, the log says how far it got
    proc = subprocess.run(cmd, cwd=tests.parent)
    res: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode}
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}); see the log")
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (el.get("message") or el.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), "message": message})
    res["counts"] = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    res["cases"] = cases
    if res["counts"]["failed"] or res["counts"]["error"] or proc.returncode not in (0, 5):
        res["status"] = "failed"
    return res


def step_fmnist_amp(plan: CheckPlan, emit: Callable[[dict], None]) -> dict:
    from ..data import load_dataset
    from ..errors import PnnhError
    from ..train import TrainConfig, train

    try:
        load_dataset("fashion-mnist", "test", plan.data_dir)
    except PnnhError as e:
        raise Skip(f"Fashion-MNIST not found ({e}); set PNNH_DATA or --data-dir") from None
    opts = dict(plan.fmnist)
    runs: dict[str, Any] = {}
    res: dict[str, Any] = {"amp": plan.amp, "settings": opts, "runs": runs}

    def run(name: str) -> dict:
        s = train(TrainConfig(model=name, data="fashion-mnist", data_dir=plan.data_dir, device=plan.device,
                              amp=plan.amp, progress=False, **opts))  # no run directory: the numbers go to the JSON
        return {k: s[k] for k in ("params", "test_acc", "test_loss", "train_img_per_s", "train_seconds", "wall_s",
                                  "steps", "device")}

    return _each(res, runs, {name: partial(run, name) for name in plan.cifar_models}, emit)


def bench_models(plan: CheckPlan, layout: str, compiled: bool) -> tuple[list[str], list[str], dict[str, str]]:
    """The bench specs of one step: (training, inference, {external model: why it is left out})."""
    from ..errors import ConfigError
    from .bench import check_external

    ours = plan.cifar_models if layout == "cifar" else plan.imagenet_models
    if compiled:
        return ([*ours, *(f"{m}:compile" for m in ours)],
                [*(f"{m}:fused" for m in ours), *(f"{m}:fused:compile" for m in ours)], {})
    externals, missing = [], {}
    for name in plan.external_models if layout == "imagenet" else ():
        try:
            check_external(name, 3)
            externals.append(name)
        except ConfigError as e:
            missing[name] = str(e)
    # inference: the unfused ResNet beside the external ones (the same graph), then our fused nets
    return [*ours, *externals], [*ours[:1], *externals, *(f"{m}:fused" for m in ours)], missing


def _bench_layout(plan: CheckPlan, layout: str, compiled: bool, emit: Callable[[dict], None],
                  reference_kernels: bool = False) -> dict:
    """Training and fused inference of one layout's nets, with the external nets where they import;
    with ``compiled``, our nets eager and under ``torch.compile`` side by side (the external nets,
    measured eager by the other step, are left out to keep the compile time inside the budget);
    with ``reference_kernels``, training only, every PNNH layer through its reference forward
    (``PNNH_KERNELS=reference``: this step's process only)."""
    from .bench import BenchConfig, run_bench

    train_models, infer_models, missing = bench_models(plan, layout, compiled)
    if reference_kernels:
        os.environ["PNNH_KERNELS"] = "reference"
        infer_models = []
    shape = (dict(batch_size=plan.cifar_batch, input_size=32, num_classes=10) if layout == "cifar" else
             dict(batch_size=plan.imagenet_batch, input_size=plan.imagenet_size, num_classes=1000))
    base = dict(in_chans=3, device=plan.device, amp=plan.amp, channels_last=True, peak_size=4096 if not plan.dry_run else 64,
                memory=not plan.dry_run, peak=not plan.dry_run, model_kwargs=dict(plan.bench_model_kwargs),
                **plan.bench_rounds, **shape)
    res: dict[str, Any] = {"layout": layout, "settings": {**base, "amp": plan.amp}, "skipped_models": missing,
                           "results": {}}

    def bench(mode: str, models: list[str]) -> dict:
        out = run_bench(BenchConfig(models=models, mode=mode, **base))
        return {"rows": out["rows"], "machine": out["machine"], "peak": out["peak"]}

    modes = {mode: partial(bench, mode, models)
             for mode, models in (("train", train_models), ("infer", infer_models)) if models}
    return _each(res, res["results"], modes, emit)


def step_bench_cifar(plan, emit):
    return _bench_layout(plan, "cifar", False, emit)


def step_bench_cifar_reference(plan, emit):
    return _bench_layout(plan, "cifar", False, emit, reference_kernels=True)


def step_profile_cifar(plan: CheckPlan, emit: Callable[[dict], None]) -> dict:
    """The residual and the PNNH CIFAR net's training step under ``torch.profiler``."""
    from .bench import BenchConfig, profile_training_step

    cfg = BenchConfig(models=list(plan.cifar_models[:2]), mode="train", batch_size=plan.cifar_batch, input_size=32,
                      num_classes=10, in_chans=3, device=plan.device, amp=plan.amp, channels_last=True,
                      model_kwargs=dict(plan.bench_model_kwargs), warmup=plan.bench_rounds["warmup"])
    res: dict[str, Any] = {"settings": {"batch_size": plan.cifar_batch, "amp": plan.amp, "channels_last": True},
                           "profiles": {}}
    profiles = {name: partial(profile_training_step, name, cfg, steps=plan.profile_steps) for name in plan.cifar_models[:2]}
    return _each(res, res["profiles"], profiles, emit)


def step_bench_imagenet(plan, emit):
    return _bench_layout(plan, "imagenet", False, emit)


def step_bench_cifar_compile(plan, emit):
    return _bench_layout(plan, "cifar", True, emit)


def step_bench_imagenet_compile(plan, emit):
    return _bench_layout(plan, "imagenet", True, emit)


def _converter() -> Callable | None:
    """``pnnh.convert(model, to="pnnh")`` where this pnnh has it, else None."""
    try:
        import pnnh
    except ImportError:
        return None
    conv = getattr(pnnh, "convert", None)
    if conv is None and importlib.util.find_spec("pnnh.convert") is not None:
        conv = importlib.import_module("pnnh.convert")
    if conv is not None and not callable(conv):  # the module: its function of the same name
        conv = getattr(conv, "convert", None)
    return conv if callable(conv) else None


def step_convert(plan: CheckPlan, emit: Callable[[dict], None]) -> dict:
    import torch
    import torch.nn.functional as F

    from ..models import create_model
    from ..train import TrainConfig
    from ..train.engine import build_optimizer

    convert = _converter()
    if convert is None:
        raise Skip("pnnh.convert does not exist in this version of pnnh")
    size = plan.imagenet_size
    if plan.dry_run:
        source_name = "pnnh:resnet18"
        source = create_model("resnet18", num_classes=1000, in_chans=3, img_size=size, **plan.bench_model_kwargs)
    else:
        try:
            import torchvision
        except Exception as e:
            raise Skip(f"torchvision does not import here ({type(e).__name__}: {e})") from None
        source_name, source = "torchvision:resnet50", torchvision.models.resnet50(weights=None)
    device = torch.device(plan.device)

    def train_converted(source: torch.nn.Module, name: str) -> dict[str, Any]:
        """Convert ``source`` to PNNH and train the twin for ``convert_steps`` bf16 steps on random images."""
        out: dict[str, Any] = {"source": name, "params_source": sum(p.numel() for p in source.parameters())}
        model = convert(source, to="pnnh")
        out["params_converted"] = sum(p.numel() for p in model.parameters())
        model.train().to(device).to(memory_format=torch.channels_last)
        opt = build_optimizer(model, TrainConfig(lr=0.01))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(plan.convert_batch, 3, size, size, generator=g).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (plan.convert_batch,), generator=g).to(device)
        losses, t0 = [], time.perf_counter()
        for i in range(plan.convert_steps):
            if i == 1:  # timed from the second step: the first includes cuDNN's algorithm search
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())  # .item() waits for the device: the clock sees finished steps
        timed = plan.convert_steps - 1
        out.update(steps=plan.convert_steps, batch_size=plan.convert_batch, losses=losses,
                   train_img_per_s=plan.convert_batch * timed / (time.perf_counter() - t0) if timed else None)
        if not all(math.isfinite(l) for l in losses):
            out["status"] = "failed"
        return out

    res = train_converted(source, source_name)
    # a Vision Transformer too: timm's ViT-S/16 on the GPU, pnnh's ViT in a dry run
    try:
        if plan.dry_run:
            vit_name, vit = "pnnh:vit_mini_d6", create_model("vit_mini_d6", num_classes=1000, in_chans=3,
                                                             img_size=size, patch_size=8)
        else:
            import timm

            vit_name, vit = "timm:vit_small_patch16_224", timm.create_model("vit_small_patch16_224",
                                                                            img_size=size, pretrained=False)
    except Exception as e:  # timm missing or too old: the ResNet result stands alone
        res["vit"] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    else:
        res["vit"] = train_converted(vit, vit_name)
        if res["vit"].get("status") == "failed":
            res["status"] = "failed"
    return res


STEPS: dict[str, Callable[[CheckPlan, Callable[[dict], None]], dict]] = {
    "environment": step_environment,
    "cuda_tests": step_cuda_tests,
    "fmnist_amp": step_fmnist_amp,
    "bench_cifar": step_bench_cifar,
    "bench_cifar_reference": step_bench_cifar_reference,
    "profile_cifar": step_profile_cifar,
    "bench_imagenet": step_bench_imagenet,
    "convert": step_convert,
    "bench_cifar_compile": step_bench_cifar_compile,
    "bench_imagenet_compile": step_bench_imagenet_compile,
}


def _skip_reason(plan: CheckPlan, name: str) -> str | None:
    """Why ``name`` does not run under ``plan``, known without starting its process."""
    if name.endswith("_compile") and not plan.compile:
        return "dry run: torch.compile is exercised on the GPU only"
    return None


def _run_step(name: str, plan_path: Path, result_path: Path) -> int:
    """Body of one step process: run the step and write its result (also partial ones) as JSON."""
    plan = CheckPlan(**json.loads(plan_path.read_text()))
    plan.cifar_models, plan.imagenet_models = tuple(plan.cifar_models), tuple(plan.imagenet_models)
    plan.external_models = tuple(plan.external_models)

    def emit(partial: dict) -> None:
        _write_json(result_path, {"status": "running", **partial})

    try:
        res = STEPS[name](plan, emit)
        res = {"status": res.pop("status", "ok"), **res}
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-LOG_TAIL:]}
    _write_json(result_path, res)
    return 0


# -------------------------------------------------------------------------------------------------
# the driver
# -------------------------------------------------------------------------------------------------

def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""


def _run_in_process_group(cmd: list[str], timeout: float, log: Path, env: dict) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group; on timeout kill the group (compile workers too)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.perf_counter() - t0


def run_check(plan: CheckPlan, steps: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the steps of ``plan`` in order, each in a time-boxed process; return (and write) the result."""
    out = Path(plan.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    _write_json(plan_path, asdict(plan))
    names = steps or list(STEPS)
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    env = dict(os.environ)
    if plan.data_dir:
        env["PNNH_DATA"] = plan.data_dir  # the CUDA tests find Fashion-MNIST there too
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    t_start = time.time()
    result: dict[str, Any] = {"dry_run": plan.dry_run, "device": plan.device, "budget_s": plan.budget_s,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                              "plan": asdict(plan), "steps": {}}

    def write() -> None:
        result["elapsed_s"] = round(time.time() - t_start, 1)
        _write_json(out / JSON_NAME, result)
        (out / MD_NAME).write_text(format_markdown(result))

    for name in names:
        left = plan.budget_s - (time.time() - t_start)
        box = min(plan.step_timeout_s.get(name, 60), left)
        reason = _skip_reason(plan, name) or (f"total budget of {plan.budget_s:.0f} s spent" if box < 5 else None)
        if reason:
            result["steps"][name] = {"status": "skipped", "reason": reason}
            log(f"gpu_check: {name}: skipped ({reason})")
            write()
            continue
        log(f"gpu_check: {name} (at most {box:.0f} s)")
        res_path, log_path = out / "logs" / f"{name}.json", out / "logs" / f"{name}.log"
        res_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pnnh.bench.gpu_check", "--run-step", name, "--plan", str(plan_path),
               "--result", str(res_path)]
        code, seconds = _run_in_process_group(cmd, box, log_path, env)
        try:
            res = json.loads(res_path.read_text())
        except (OSError, ValueError):
            res = {}
        if code is None:
            res = {**res, "status": "timeout", "reason": f"stopped after its time box of {box:.0f} s"}
        elif not res or res.get("status") == "running":
            res = {**res, "status": "failed", "error": f"step process exited with code {code} before finishing"}
        if res["status"] in ("failed", "timeout"):
            res["log_tail"] = _tail(log_path)
        res["seconds"] = round(seconds, 1)
        result["steps"][name] = res
        log(f"gpu_check: {name}: {res['status']} in {seconds:.0f} s"
            + (f" ({res.get('reason') or res.get('error')})" if res["status"] != "ok" else ""))
        write()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write()
    return result


# -------------------------------------------------------------------------------------------------
# Markdown
# -------------------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _bench_table(res: dict) -> list[str]:
    lines = []
    for mode in ("train", "infer"):
        part = res.get("results", {}).get(mode)
        if part is None:
            continue
        if "error" in part:
            lines += [f"{mode}: failed: `{part['error'][:300]}`", ""]
            continue
        lines += [f"**{mode}** (ratio: throughput over the first row, median of paired rounds)", "",
                  "| model | params | img/s | ratio | step ms (median) | peak mem MB | % matmul peak |",
                  "|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            frac = f"{r['peak_frac'] * 100:.1f}" if r.get("peak_frac") is not None else "-"
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['img_per_s']:.0f} | {r['ratio']:.3f} | "
                         f"{r['step_ms']['median']:.2f} | {_fmt(r.get('peak_mem_mb'), '.0f')} | {frac} |")
        lines.append("")
    for name, why in res.get("skipped_models", {}).items():
        lines.append(f"- {name} not measured: {why}")
    return lines


def _model_table(title: str, columns: list[str], runs: dict, cells: Callable[[dict], list[str]]) -> list[str]:
    """A section with one row per model; a model that failed shows its error in the first column."""
    lines = ["", title, "", "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].splitlines()[0][:120]} |" + " |" * (len(columns) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(cells(r)) + " |")
    return lines


def format_markdown(result: dict) -> str:
    """The result of :func:`run_check` as a Markdown page: a summary table, then each step's numbers."""
    steps = result["steps"]
    env = steps.get("environment", {})
    title = "GPU check" + (" (dry run on the CPU: tiny sizes, not measurements)" if result["dry_run"] else "")
    lines = [f"# {title}", "",
             f"Started {result['started']}, {result.get('elapsed_s', 0):.0f} s of a {result['budget_s']:.0f} s budget, "
             f"device {result['device']}."]
    if env.get("status") == "ok":
        lines.append(f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), GPU {env.get('gpu', 'none')}, "
                     f"{env.get('cpu_count')} CPUs, timm {env.get('timm')}, torchvision {env.get('torchvision')}.")
    lines += ["", "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, res in steps.items():
        note = res.get("reason") or res.get("error") or ""
        if name == "cuda_tests" and "counts" in res:
            note = ", ".join(f"{v} {k}" for k, v in res["counts"].items() if v) or "no tests collected"
        lines.append(f"| {name} | {res['status']} | {_fmt(res.get('seconds'), '.0f')} | "
                     f"{str(note).splitlines()[0][:160] if note else ''} |")
    tests = steps.get("cuda_tests", {})
    bad = [c for c in tests.get("cases", []) if c["outcome"] in ("failed", "error")]
    if bad:
        lines += ["", "## CUDA tests that failed", ""] + [f"- `{c['test']}`: {c['message']}" for c in bad]
    fm = steps.get("fmnist_amp", {})
    if fm.get("runs"):
        lines += _model_table(f"## Fashion-MNIST, {fm['settings'].get('epochs')} epoch, AMP {fm['amp']}",
                              ["test acc %", "train img/s", "train s"], fm["runs"],
                              lambda r: [f"{r['test_acc'] * 100:.2f}", f"{r['train_img_per_s']:.0f}",
                                         f"{r['train_seconds']:.1f}"])
    for name in ("bench_cifar", "bench_cifar_reference", "bench_imagenet", "bench_cifar_compile",
                 "bench_imagenet_compile"):
        res = steps.get(name, {})
        if res.get("results"):
            s = res["settings"]
            lines += ["", f"## `{name}`: batch {s['batch_size']}, 3x{s['input_size']}x{s['input_size']}, "
                          f"AMP {s['amp']}, channels-last", ""] + _bench_table(res)
    prof = steps.get("profile_cifar", {})
    if prof.get("profiles"):
        s = prof["settings"]
        lines += _model_table(f"## `profile_cifar`: one training step, batch {s['batch_size']}, AMP {s['amp']}, "
                              "channels-last", ["step ms", "device busy ms", "kernels per step"], prof["profiles"],
                              lambda p: [f"{p['step_ms']:.2f}", _fmt(p["device_busy_ms"], ".2f"), _fmt(p["kernels"], ".0f")])
        for name, p in prof["profiles"].items():
            if p.get("ops"):
                lines += ["", f"{name}, operators by self time per step:", "", "| operator | calls | ms |", "|---|---|---|"]
                lines += [f"| `{o['name'][:80]}` | {o['calls']:.0f} | {o['ms']:.3f} |" for o in p["ops"]]
    conv = steps.get("convert", {})
    if "losses" in conv:
        lines += ["", f"## {conv['source']} converted to PNNH", "",
                  f"{conv['params_source'] / 1e6:.2f}M -> {conv['params_converted'] / 1e6:.2f}M parameters; "
                  f"{conv['steps']} training steps at "
                  f"batch {conv['batch_size']}: loss {conv['losses'][0]:.3f} -> {conv['losses'][-1]:.3f}, "
                  f"{_fmt(conv.get('train_img_per_s'), '.0f')} img/s."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------
# command line
# -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pnnh.bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", help="Where gpu_check.json, gpu_check.md and logs/ are written.")
    ap.add_argument("--dry-run", action="store_true", help="Every step on the CPU at tiny sizes (no timm, no compile).")
    ap.add_argument("--budget", type=float, help="Total seconds for all steps [450; dry run 120].")
    ap.add_argument("--steps", help=f"Comma-separated subset of: {', '.join(STEPS)} [all, in this order].")
    ap.add_argument("--data-dir", help="Directory holding fashion-mnist/ [$PNNH_DATA, system dirs].")
    ap.add_argument("--tests-dir", help="The test suite whose cuda-marked tests run [the repository's tests/].")
    ap.add_argument("--run-step", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_step:
        return _run_step(args.run_step, Path(args.plan), Path(args.result))
    if not args.out_dir:
        print("error: give an output directory: python -m pnnh.bench.gpu_check OUT_DIR", file=sys.stderr)
        return 2
    steps = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None
    bad = [s for s in steps or [] if s not in STEPS]
    if bad:
        print(f"error: unknown step(s) {', '.join(bad)}; steps are {', '.join(STEPS)}", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here; run with --dry-run to check the script on the CPU", file=sys.stderr)
            return 2
    plan = make_plan(args.out_dir, dry_run=args.dry_run, budget_s=args.budget, data_dir=args.data_dir,
                     tests_dir=args.tests_dir)
    result = run_check(plan, steps, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"gpu_check: wrote {Path(args.out_dir) / JSON_NAME} and {Path(args.out_dir) / MD_NAME}", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
