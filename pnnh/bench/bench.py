"""Side-by-side throughput, latency, memory and FLOPs of registered models.

:func:`run_bench` builds every model once, warms each up, then times them in **alternating
rounds**: round ``r`` runs ``steps`` timed steps of every model in turn, in forward order on
even rounds and reverse order on odd rounds (A B, B A, A B ...), so slow drifts of a shared
machine hit every model alike. The ratio of a model to the first one is the median over rounds
of the *paired* per-round ratio, which is what makes it meaningful on a noisy machine.

What one row reports (per model and mode):

- ``img_per_s``: ``batch_size / median step latency``; ``step_ms``: median, min, max latency.
- ``ratio``: throughput relative to the first model (median of per-round paired ratios).
- ``flops_per_img``: FLOPs of one image (a multiply-add counts 2), counted by
  ``torch.utils.flop_counter.FlopCounterMode``: forward for ``infer``, forward + backward for
  ``train`` (the optimizer update is not counted).
- ``gflops_per_s`` and ``peak_frac``: achieved FLOP/s, and that over the dense matmul peak
  (:func:`matmul_peak`, same dtype and thread count) measured at the start of *every round*, so
  the fraction is paired too (median over rounds of model FLOP/s over that round's peak).
- ``peak_mem_mb``: the peak bytes of tensors this model holds during one step: its parameters,
  gradients, optimizer state and input when the step starts, plus the largest net growth of
  allocations during the step. CUDA: from ``torch.cuda.max_memory_allocated``; CPU: from the
  allocation events of ``torch.profiler`` (``profile_memory=True``). The same definition on both,
  so numbers compare across devices; allocator caching and fragmentation are not included.
- ``params``: trainable + frozen parameter count of the model as built.

A model spec is a registered name followed by options that apply to that model only, so one
run can measure the effect of a setting side by side:

- ``:fused`` -- :func:`pnnh.deploy` the model first (inference only);
- ``:channels_last``, ``:compile``, ``:bf16``, ``:fp16`` -- as the global flags, for this model.

e.g. ``plain56,plain56:fused`` or ``resnet56,resnet56:channels_last,resnet56:bf16``.

A name ``timm:ARCH`` or ``torchvision:ARCH`` is a model of that library, built untrained
(``timm.create_model(ARCH, pretrained=False, ...)``, ``torchvision.models.get_model(ARCH,
weights=None, ...)``) with the run's classes and input channels, and measured in the same
alternating rounds as the registered ones: ``resnet50,timm:resnet50,torchvision:resnet50``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import create_model, is_factory_spec, load_factory, model_info
from ..train.config import TrainConfig
from ..train.device import AMP_DTYPES, amp_warning, autocast, cpu_bf16_native, resolve_device
from ..train.engine import build_optimizer
from ..train.malloc import tune_glibc_malloc
from ..utils import parse_kv
from .fuse import deploy, unfused_kernels

__all__ = ["BenchConfig", "run_bench", "build_external", "is_external", "matmul_peak", "count_flops", "peak_memory", "profile_training_step", "format_table", "machine_info"]

MODES = ("train", "infer")


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures. Field names match the ``pnnh bench`` flags."""

    models: list[str]
    batch_size: int = 128
    input_size: int | None = None  # default: the first model's default_cfg input size
    in_chans: int = 1
    num_classes: int = 10
    mode: str = "train"  # train | infer | both
    channels_last: bool = False
    compile: bool = False
    amp: str | None = None  # None | bf16 | fp16
    device: str = "cpu"
    repeats: int = 5  # alternating rounds
    steps: int = 5  # timed steps per model per round
    warmup: int = 2  # untimed steps per model before the first round
    threads: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    memory: bool = True
    peak: bool = True  # measure the dense matmul peak
    peak_size: int = 2048
    seed: int = 0

    def validate(self) -> "BenchConfig":
        if not self.models:
            raise ConfigError("give at least one model")
        if self.mode not in (*MODES, "both"):
            raise ConfigError(f"mode must be train, infer or both, got {self.mode!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ConfigError(f"amp must be bf16, fp16 or unset, got {self.amp!r}")
        for name in ("batch_size", "repeats", "steps", "in_chans", "num_classes", "peak_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"input_size must be >= 1, got {self.input_size}")
        for spec in self.models:
            ms = parse_spec(spec, self)
            if is_external(ms.name):
                check_external(ms.name, self.in_chans)
            elif is_factory_spec(ms.name):
                load_factory(ms.name)  # a missing file or factory fails here
            else:
                model_info(ms.name)  # unknown names fail here, with close matches
            if ms.fused and self.mode != "infer":
                raise ConfigError(f"{spec}: a fused (deployed) model is for inference only; use --mode infer")
        return self

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)


SPEC_OPTIONS = ("fused", "channels_last", "compile", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked variant: a registered name and the settings that apply to it."""

    name: str
    fused: bool = False
    channels_last: bool = False
    compile: bool = False
    amp: str | None = None
    kwargs: tuple = ()  # (key, value) model options of this spec only, over the config's model_kwargs


def parse_spec(spec: str, cfg: "BenchConfig | None" = None) -> ModelSpec:
    """``"plain56:fused:channels_last"`` -> a :class:`ModelSpec`; ``cfg``'s global flags fill in the rest.

    ``key=value`` parts are model options for this spec alone (YAML scalars, as ``-k``):
    ``pnnh56:path_param=init`` against ``pnnh56`` compares two settings of one model side by side.
    """
    parts = [p.strip() for p in spec.strip().split(":")]
    if parts[0] in EXTERNAL_LIBRARIES and len(parts) > 1:  # timm:resnet50 is one name
        parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
    elif len(parts) > 1 and is_factory_spec(f"{parts[0]}:{parts[1]}") and parts[1] not in SPEC_OPTIONS:
        parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]  # path/to/file.py:factory, then the options
    name, *opts = parts
    kwargs = tuple(parse_kv(tuple(o for o in opts if "=" in o), f"model spec {spec!r}").items())
    opts = [o for o in opts if "=" not in o]
    bad = [o for o in opts if o not in SPEC_OPTIONS]
    if bad or not name or any(not k for k, _ in kwargs):
        raise ConfigError(f"model spec {spec!r}: options after the name are {', '.join(SPEC_OPTIONS)} "
                          f"or key=value model options")
    amps = [o for o in opts if o in ("bf16", "fp16")]
    if len(amps) > 1:
        raise ConfigError(f"model spec {spec!r}: give at most one of bf16 / fp16")
    return ModelSpec(name, fused="fused" in opts,
                     channels_last="channels_last" in opts or bool(cfg and cfg.channels_last),
                     compile="compile" in opts or bool(cfg and cfg.compile),
                     amp=amps[0] if amps else (cfg.amp if cfg else None), kwargs=kwargs)


# -------------------------------------------------------------------------------------------------
# models of other libraries: timm:ARCH, torchvision:ARCH
# -------------------------------------------------------------------------------------------------

EXTERNAL_LIBRARIES = ("timm", "torchvision")


def is_external(name: str) -> bool:
    """Whether ``name`` is a ``timm:ARCH`` / ``torchvision:ARCH`` model rather than a registered one."""
    return name.split(":", 1)[0] in EXTERNAL_LIBRARIES and ":" in name


def _import_library(lib: str):
    try:
        module = importlib.import_module("torchvision.models" if lib == "torchvision" else lib)
    except Exception as e:  # ImportError, or a build of the library that does not match this torch
        raise ConfigError(f"{lib} models need the {lib} package, which does not import here "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"pip install 'pnnh[timm]'") from None
    return module


def check_external(name: str, in_chans: int) -> None:
    """Raise :class:`ConfigError` unless ``name`` (``LIB:ARCH``) can be built here with ``in_chans`` inputs."""
    lib, arch = name.split(":", 1)
    module = _import_library(lib)
    known = module.list_models()  # timm.list_models, torchvision.models.list_models
    if arch not in known:
        close = difflib.get_close_matches(arch, known, 3)
        raise ConfigError(f"unknown {lib} model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if lib == "torchvision" and in_chans != 3:
        raise ConfigError(f"{name} takes 3 input channels; run it with --in-chans 3 (got {in_chans})")


def build_external(name: str, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    """An untrained ``timm:ARCH`` or ``torchvision:ARCH`` model with ``num_classes`` outputs."""
    check_external(name, in_chans)
    lib, arch = name.split(":", 1)
    module = _import_library(lib)
    if lib == "timm":
        return module.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return module.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _external_input_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])  # torchvision's classifiers: 224


def build_bench_model(ms: "ModelSpec", cfg: "BenchConfig", input_size: int | None) -> nn.Module:
    """The model of one spec as the bench measures it (before fusing, device and memory format)."""
    kwargs = {**cfg.model_kwargs, **dict(ms.kwargs)}
    if is_external(ms.name):  # the run's model_kwargs are pnnh options: only the spec's own apply
        return build_external(ms.name, cfg.num_classes, cfg.in_chans, **dict(ms.kwargs))
    if input_size is not None:
        kwargs.setdefault("img_size", input_size)  # the engine's convention: models take img_size
    return create_model(ms.name, num_classes=cfg.num_classes, in_chans=cfg.in_chans, **kwargs)


# -------------------------------------------------------------------------------------------------
# measurements
# -------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                repeats: int = 5) -> float:
    """Best achieved FLOP/s of an ``n x n`` dense matmul (``2 n^3`` FLOPs) over ``repeats`` runs."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel choice
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def count_flops(model: nn.Module, x: torch.Tensor, train: bool) -> int:
    """FLOPs of ``model(x)`` (and its backward if ``train``) for the whole batch ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    if train:
        with counter, unfused_kernels():
            model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with counter, torch.no_grad(), unfused_kernels():  # the counter does not know oneDNN's fused conv
            model(x)
    return int(counter.get_total_flops())


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def _quiet_fds():
    """Silence C++-level prints (the profiler's start/stop lines) on stdout and stderr."""
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:  # no real file descriptors (e.g. captured by a test runner): do not bother
        pass
    try:
        yield
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)


def peak_memory(step: Callable[[], Any], held: Callable[[], int], device: torch.device) -> int:
    """Peak bytes during one call of ``step``: ``held()`` bytes at its start plus the peak net growth."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, base = torch.cuda.memory_allocated(device), held()
        step()
        _sync(device)
        return base + torch.cuda.max_memory_allocated(device) - start

    from torch.profiler import ProfilerActivity, profile

    base = held()
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings(), _quiet_fds():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return base + peak


def profile_training_step(spec: str, cfg: BenchConfig, steps: int = 3, top: int = 12) -> dict[str, Any]:
    """Where one model's training step spends its time, by ``torch.profiler``.

    Builds ``spec`` as the bench does (same input, optimizer, autocast, memory format), runs
    ``cfg.warmup`` steps (at least one), times ``steps`` steps without the profiler, then profiles
    ``steps`` more. Returns per step: ``step_ms`` (the unprofiled wall time), ``device_busy_ms``
    (the summed duration of the device's kernels and copies; ``None`` on the CPU), ``kernels``
    (device activities launched) and ``ops`` (the ``top`` operators by self time on the device,
    on the CPU for a CPU run: name, calls and milliseconds per step). A step whose wall time is
    well above its device-busy time is bound by the host (kernel launches, Python), not the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    device = resolve_device(cfg.device)
    runner = _Runner(spec, "train", cfg, device, cfg.input_size)
    for _ in range(max(1, cfg.warmup)):
        runner.step()
    runner.timed_round(steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings(), _quiet_fds():
        warnings.simplefilter("ignore")
        with profile(activities=activities) as prof:
            for _ in range(steps):
                runner.step()
            _sync(device)
    on_device = device.type == "cuda"
    busy_ns, kernels = 0, 0
    if on_device:
        for e in prof.profiler.kineto_results.events():
            # kernels, copies and memsets (a user annotation mirrored on the GPU's timeline spans others)
            if e.device_type() == torch.autograd.DeviceType.CUDA and not e.is_user_annotation():
                busy_ns += e.duration_ns()
                kernels += 1

    def self_us(ev) -> float:
        if on_device:
            return float(getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0))
        return float(ev.self_cpu_time_total)

    averages = sorted(prof.key_averages(), key=self_us, reverse=True)
    ops = [{"name": ev.key, "calls": ev.count / steps, "ms": self_us(ev) / 1e3 / steps}
           for ev in averages[:top] if self_us(ev) > 0]
    return {"model": spec, "params": runner.params, "device": str(device), "dtype": runner.dtype,
            "batch_size": cfg.batch_size, "steps": steps,
            "step_ms": statistics.median(runner.times) * 1e3,
            "device_busy_ms": busy_ns / 1e6 / steps if on_device else None,
            "kernels": kernels / steps if on_device else None, "ops": ops}


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_bf16_native"] = cpu_bf16_native()
    return info


# -------------------------------------------------------------------------------------------------
# one benchmarked model
# -------------------------------------------------------------------------------------------------

class _Runner:
    """One model in one mode: its step function and the measurements taken of it."""

    def __init__(self, spec: str, mode: str, cfg: BenchConfig, device: torch.device, input_size: int):
        self.spec, self.mode = spec, mode
        ms = self.ms = parse_spec(spec, cfg)
        torch.manual_seed(cfg.seed)
        model = build_bench_model(ms, cfg, input_size)
        self.params = sum(p.numel() for p in model.parameters())
        train = mode == "train"
        model.train(train)
        if ms.fused:
            model = deploy(model)
        model.to(device)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.x = torch.randn(cfg.batch_size, cfg.in_chans, input_size, input_size, generator=g).to(device)
        if ms.channels_last:  # (a deployed model keeps the memory format deploy gave it)
            model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g).to(device)
        self.model = model
        self.flops = count_flops(model, self.x, train) / cfg.batch_size
        fwd = torch.compile(model) if ms.compile else model
        amp_dtype = AMP_DTYPES[ms.amp]
        self.dtype = str(amp_dtype or torch.float32).replace("torch.", "")

        if train:
            self.opt = build_optimizer(model, TrainConfig())  # the engine's default optimizer
            scaler = torch.amp.GradScaler(device.type, enabled=ms.amp == "fp16")

            def step():
                self.opt.zero_grad(set_to_none=True)
                with autocast(device, amp_dtype):
                    loss = F.cross_entropy(fwd(self.x).float(), self.y)
                scaler.scale(loss).backward()
                scaler.step(self.opt)
                scaler.update()
        else:
            self.opt = None

            def step():
                with torch.inference_mode(), autocast(device, amp_dtype):
                    fwd(self.x)
        self.step = step
        self.times: list[float] = []  # per-step seconds
        self.rounds: list[float] = []  # per-round seconds

    def held_bytes(self) -> int:
        state = [v for s in (self.opt.state.values() if self.opt else []) for v in s.values()]
        return _tensor_bytes([*self.model.parameters(), *(p.grad for p in self.model.parameters()),
                              *self.model.buffers(), *state, self.x, self.y])

    def timed_round(self, steps: int, device: torch.device) -> None:
        total = 0.0
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            self.step()
            _sync(device)
            dt = time.perf_counter() - t0
            self.times.append(dt)
            total += dt
        self.rounds.append(total)


# -------------------------------------------------------------------------------------------------
# the benchmark
# -------------------------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every model of ``cfg`` side by side; return ``{"config", "machine", "peak", "rows"}``.

    ``log`` receives progress lines (the CLI prints them to stderr).
    """
    cfg.validate()
    log = log or (lambda s: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    for amp in dict.fromkeys(parse_spec(m, cfg).amp for m in cfg.models):
        if note := amp_warning(device, amp):
            log(f"warning: {note}")
    # as the training engine does, so the bench measures what training runs; whether freed host
    # memory stays in the process moves CPU step times, so the result records it
    malloc_tuned = tune_glibc_malloc() if device.type == "cpu" else None
    input_size = cfg.input_size
    if input_size is None:
        ms0 = parse_spec(cfg.models[0])
        first = build_bench_model(ms0, cfg, None)
        if not is_external(ms0.name) and not hasattr(first, "default_cfg"):
            raise ConfigError(f"{ms0.name} records no default_cfg['input_size']; give --input-size")
        input_size = (_external_input_size(first) if is_external(ms0.name)
                      else int(first.default_cfg["input_size"][-1]))
        del first
    # The matmul peak is re-measured at the start of every round, beside the models, for every
    # dtype a model computes in (fp32, or its autocast dtype).
    peaks: dict[str, list[float]] = {}

    def measure_peaks(dtypes: set[str]) -> None:
        for name in sorted(dtypes):
            peaks.setdefault(name, []).append(matmul_peak(device, getattr(torch, name), cfg.peak_size, repeats=3))

    rows = []
    for mode in cfg.modes:
        runners = []
        for spec in cfg.models:
            log(f"[{mode}] building {spec}")
            runners.append(_Runner(spec, mode, cfg, device, input_size))
        for r in runners:  # warm-up (and compilation) before anything is timed
            log(f"[{mode}] warm-up {r.spec}")
            for _ in range(max(cfg.warmup, 1 if r.ms.compile else 0)):
                r.step()
            _sync(device)
        first = {k: len(v) for k, v in peaks.items()}
        mem = {}
        if cfg.memory:
            for r in runners:
                mem[id(r)] = peak_memory(r.step, r.held_bytes, device)
        for i in range(cfg.repeats):
            order = runners if i % 2 == 0 else runners[::-1]
            if cfg.peak:
                measure_peaks({r.dtype for r in runners})
            for r in order:
                r.timed_round(cfg.steps, device)
            log(f"[{mode}] round {i + 1}/{cfg.repeats}: " + ", ".join(
                f"{r.spec} {cfg.batch_size * cfg.steps / r.rounds[-1]:.0f} img/s" for r in runners))
        base = runners[0]
        for r in runners:
            med = statistics.median(r.times)
            img_s = cfg.batch_size / med
            gflops = r.flops * img_s / 1e9
            own_peaks = peaks.get(r.dtype, [])[first.get(r.dtype, 0):]
            rows.append({
                "model": r.spec, "mode": mode, "params": r.params, "batch_size": cfg.batch_size,
                "img_per_s": img_s,
                "step_ms": {"median": med * 1e3, "min": min(r.times) * 1e3, "max": max(r.times) * 1e3},
                "ratio": statistics.median(b / t for b, t in zip(base.rounds, r.rounds)),
                "flops_per_img": r.flops, "gflops_per_s": gflops, "dtype": r.dtype,
                # paired with the matmul peak of the same round, like the ratio
                "peak_frac": statistics.median(cfg.batch_size * cfg.steps * r.flops / t / p
                                               for t, p in zip(r.rounds, own_peaks)) if own_peaks else None,
                "peak_mem_mb": mem[id(r)] / 2**20 if id(r) in mem else None,
                "rounds_s": r.rounds,
            })
        del runners
    return {"config": {**asdict(cfg), "input_size": input_size}, "machine": {**machine_info(device), "malloc_tuned": malloc_tuned},
            "peak": {"size": cfg.peak_size,
                     "gflops_per_s": {k: statistics.median(v) / 1e9 for k, v in peaks.items()},
                     "rounds_gflops_per_s": {k: [p / 1e9 for p in v] for k, v in peaks.items()}},
            "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """The rows of :func:`run_bench` as an aligned text table (ratio is to the first model)."""
    cfg, peak = result["config"], result["peak"]
    w = max([28] + [len(r["model"]) + 2 for r in result["rows"]])  # the model column fits every name
    head = (f"{'mode':<6}{'model':<{w}}{'params':>9}{'GFLOP/img':>10}{'img/s':>9}{'ratio':>7}"
            f"{'step ms med/min/max':>22}{'GFLOP/s':>9}{'%peak':>7}{'mem MB':>9}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        ms = r["step_ms"]
        lat = f"{ms['median']:.1f}/{ms['min']:.1f}/{ms['max']:.1f}"
        frac = f"{r['peak_frac'] * 100:.1f}%" if r["peak_frac"] is not None else "-"
        mem = f"{r['peak_mem_mb']:.1f}" if r["peak_mem_mb"] is not None else "-"
        lines.append(f"{r['mode']:<6}{r['model']:<{w}}{r['params'] / 1e6:>8.3f}M{r['flops_per_img'] / 1e9:>10.4f}"
                     f"{r['img_per_s']:>9.1f}{r['ratio']:>7.3f}{lat:>22}{r['gflops_per_s']:>9.1f}{frac:>7}{mem:>9}")
    m = result["machine"]
    foot = (f"batch {cfg['batch_size']}, input {cfg['in_chans']}x{cfg['input_size']}x{cfg['input_size']}, "
            f"{cfg['repeats']} alternating rounds x {cfg['steps']} steps, device {m['device']}, "
            f"{m['threads']} thread(s), torch {m['torch']}, {m['cpu']}")
    if m.get("malloc_tuned") is False:
        foot += ", glibc malloc thresholds not set (PNNH_MALLOC_TUNING=0 or user tunables)"
    flags = [k for k in ("channels_last", "compile") if cfg[k]] + ([f"amp {cfg['amp']}"] if cfg["amp"] else [])
    if flags:
        foot += ", all models: " + ", ".join(flags)
    for dtype, gflops in peak["gflops_per_s"].items():
        foot += f"\ndense {dtype} matmul peak ({peak['size']}^2, median of rounds): {gflops:.1f} GFLOP/s"
    return "\n".join(lines + [foot])
