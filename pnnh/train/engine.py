"""The training engine: one loop for every model.

Read top to bottom: :func:`train` builds data, model and optimizer from a :class:`TrainConfig`,
restores a checkpoint when resuming, then runs ``steps`` SGD/AdamW steps with the learning rate
set from a pure function of the step (so resuming needs no scheduler state), evaluates on the
test split after each epoch, and writes ``metrics.jsonl`` / ``checkpoint.safetensors`` /
``summary.json`` into ``cfg.out``.

Exactness of resume: the batch order and augmentation of (epoch, batch) depend only on the seed
(see :class:`pnnh.data.InMemoryLoader`), model/optimizer/RNG state is checkpointed, so a run
resumed from a checkpoint follows the same trajectory as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..data import InMemoryLoader, load_dataset
from ..errors import CheckpointError, ConfigError, DivergenceError, PeerError, PnnhError
from . import distributed as dist_utils
from ..utils import remove_stale_temp_files
from .device import AMP_DTYPES, amp_warning, autocast, resolve_device
from .checkpoint import atomic_write_text, load_checkpoint, read_state, save_checkpoint, save_weights
from .config import RESUME_KEYS, TrainConfig
from .malloc import tune_glibc_malloc

__all__ = ["train", "evaluate", "precise_bn", "build_optimizer", "lr_at", "param_groups", "CKPT_NAME"]

CKPT_NAME = "checkpoint.safetensors"


# -------------------------------------------------------------------------------------------------
# pieces
# -------------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based) of ``total``: warmup then one-cycle/cosine/constant."""
    warm = int(round(cfg.warmup_frac * total))
    if step < warm:
        start = cfg.lr / 25 if cfg.schedule == "onecycle" else 0.0
        return start + (cfg.lr - start) * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "onecycle":  # linear decay to zero, as airbench / the triangular schedule
        return cfg.lr * (1 - t)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of convs/linears only; none on norms, biases and other 1-d params."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


@torch.no_grad()
def evaluate(model: nn.Module, loader: InMemoryLoader, device: torch.device, amp_dtype=None) -> dict[str, float]:
    """Loss and accuracy over a loader (summed across ranks when distributed)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        totals += torch.tensor([F.cross_entropy(logits.float(), y, reduction="sum").item(),
                                (logits.argmax(1) == y).sum().item(), y.numel()], dtype=torch.float64)
    totals = dist_utils.all_reduce_sum(totals)
    model.train(was_training)
    n = max(totals[2].item(), 1.0)
    return {"loss": totals[0].item() / n, "acc": totals[1].item() / n, "count": int(totals[2].item())}


_RUN_LOCKS: dict[Path, Any] = {}  # run directory -> the open lock file this process holds


def _lock_run_dir(out: Path) -> None:
    """Take ``out/.lock`` (an exclusive ``flock``) so that two processes never write one run.

    The kernel drops the lock when its process dies, SIGKILL included, so a crashed run never
    leaves a stale lock behind: resuming just works. The same process may re-enter (a caller
    resuming in-process after an exception). No-op where ``fcntl`` does not exist (Windows).
    """
    try:
        import fcntl
    except ImportError:
        return
    key = out.resolve()
    if key in _RUN_LOCKS:
        return
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{out} is in use by another running pnnh process (pid {holder}); "
                          "wait for it to finish or choose another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    except OSError as e:  # disk full: name the file, release the lock
        with contextlib.suppress(OSError):
            f.close()
        raise OSError(e.errno, e.strerror, str(out / ".lock")) from None
    _RUN_LOCKS[key] = f


def _unlock_run_dir(out: Path | None) -> None:
    f = _RUN_LOCKS.pop(out.resolve(), None) if out is not None else None
    if f is not None:
        f.close()  # closing the file releases the flock


def _prepare_out(cfg: TrainConfig, resume: bool) -> Path | None:
    if cfg.out is None:
        return None
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {out} is not writable: {e.strerror or e}") from None
    _lock_run_dir(out)
    if (out / CKPT_NAME).exists() and not resume:
        _unlock_run_dir(out)
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    remove_stale_temp_files(out, owned=True)  # of a writer killed mid-write; the lock makes them ours
    return out


def _on_main(fn: Callable[[], Any], is_main: bool) -> Any:
    """Run ``fn`` on rank 0 (a no-op elsewhere) and stop every rank together if it fails.

    Rank 0 alone prepares the run directory and writes checkpoints; a user error there would
    otherwise leave the other ranks waiting in a collective until rank 0's exit breaks it (a
    gloo traceback around the real error). Rank 0 raises its error, the others a quiet PeerError;
    in a process group both are marked ``collective`` (every rank raised it together).
    """
    err = None
    result = None
    if is_main:
        try:
            result = fn()
        except (PnnhError, OSError) as e:
            err = e
    if dist_utils.world_size() > 1:
        failed = dist_utils.all_reduce_sum(torch.tensor([float(err is not None)], dtype=torch.float64)).item()
        if failed:
            err = err or PeerError("rank 0 stopped this run with an error")
            err.collective = True
    if err is not None:
        raise err
    return result


def _is_restart_of_this_job(cfg: TrainConfig) -> bool:
    """A worker that torchrun restarted resumes the checkpoint its own job wrote, without --resume."""
    run_id = dist_utils.elastic_run_id()
    ckpt = Path(cfg.out) / CKPT_NAME if cfg.out else None
    if not (dist_utils.elastic_restart() and run_id and ckpt and ckpt.exists()):
        return False
    return read_state(ckpt).get("elastic_run_id") == run_id


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"cannot resume from {path}: the run was configured differently ({'; '.join(diff)})")


@dataclass
class _Clock:
    """Training time only (no eval, no checkpoint I/O), for an honest images/s."""

    seconds: float = 0.0
    images: int = 0


# -------------------------------------------------------------------------------------------------
# the loop
# -------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one model as ``cfg`` says; return the summary dict (also written to ``summary.json``).

    ``on_step(step)`` is called after every optimizer step (tests use it to simulate a crash).
    """
    session_start = time.time()
    cfg.validate()
    dist_utils.init_from_env(cfg.device)  # no-op for one process or when the caller already did it
    rank, world = dist_utils.rank(), dist_utils.world_size()
    is_main = rank == 0
    threads = cfg.threads or dist_utils.default_threads()
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        tune_glibc_malloc()  # keep freed activations' pages: no page faults at every step (train/malloc.py)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation")
    amp_dtype = AMP_DTYPES[cfg.amp]
    if is_main and (note := amp_warning(device, cfg.amp)):
        print(f"warning: {note}", file=sys.stderr, flush=True)
    resume = cfg.resume or _is_restart_of_this_job(cfg)
    out = _on_main(lambda: _prepare_out(cfg, resume), is_main)  # rank 0 prepares, every rank waits for it
    if not is_main:
        out = Path(cfg.out) if cfg.out else None

    # data: whole dataset in memory as uint8 tensors
    train_ds = load_dataset(cfg.data, "train", cfg.data_dir, img_size=cfg.img_size)
    test_ds = load_dataset(cfg.data, "test", cfg.data_dir, img_size=cfg.img_size)
    if cfg.train_subset:
        train_ds = train_ds.subset(cfg.train_subset)
    if cfg.test_subset:
        test_ds = test_ds.subset(cfg.test_subset)
    train_loader = InMemoryLoader(train_ds, cfg.batch_size, train=True, seed=cfg.seed,
                                  rank=rank, world_size=world, channels_last=cfg.channels_last)
    test_loader = InMemoryLoader(test_ds, cfg.eval_batch_size, train=False, rank=rank, world_size=world,
                                 channels_last=cfg.channels_last)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    augment = cfg.augment_for(total_steps / steps_per_epoch)
    train_loader.augment = augment
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # what the checkpoint and the final weights record about the data (pnnh.load_model reads it back)
    data_meta = {"data": cfg.data, "classes": train_ds.classes, "mean": list(train_ds.mean), "std": list(train_ds.std),
                 "input_size": list(train_ds.images.shape[1:])}

    # model and optimizer
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, train_ds)
    if cfg.sync_bn and world > 1:  # BatchNorm statistics over the global batch, not each rank's slice
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())

    # resume
    step, curve, clock, wall_before, epoch_sums, scaler_state = 0, [], _Clock(), 0.0, None, None
    ckpt = out / CKPT_NAME if out else None
    if resume and ckpt is not None and ckpt.exists():
        saved = read_state(ckpt)
        _check_resumable(saved["config"], cfg, ckpt)  # names what differs, before loading anything
        if saved.get("world_size", 1) != world:  # the global batch and each rank's data order depend on it
            raise ConfigError(f"cannot resume from {ckpt}: it was trained by {saved.get('world_size', 1)} "
                              f"process(es), this run has {world}; resume with the same number of processes")
        state = load_checkpoint(ckpt, model, optimizer)
        step, curve, wall_before = state["step"], state["curve"], state["wall_seconds"]
        clock = _Clock(state["train_seconds"], state["train_images"])
        # set when the checkpoint was taken mid-epoch: sums over all ranks, so rank 0 carries them
        epoch_sums = state.get("epoch_sums") if is_main else None
        scaler_state = state.get("scaler")
        if is_main:
            print(f"resuming {ckpt} at step {step} of {total_steps}", file=sys.stderr, flush=True)
    if is_main and out is not None:  # drop metric lines written after the checkpoint (all, when none)
        _truncate_metrics(out / "metrics.jsonl", step)
    wrapped = dist_utils.wrap_model(model, device)
    fwd = torch.compile(wrapped) if cfg.compile else wrapped
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    if scaler_state:  # the loss scale and its growth counter: fp16 resumes exactly
        scaler.load_state_dict(scaler_state)

    def save(sums: torch.Tensor | None) -> None:
        if ckpt is not None:  # a write failing on rank 0 (disk full) stops every rank with it
            _on_main(lambda: write(sums), is_main)

    def write(sums: torch.Tensor | None) -> None:
        if not is_main:
            return
        save_checkpoint(ckpt, model, optimizer, {
            "config": cfg.to_dict(), "step": step, "curve": curve, "train_seconds": clock.seconds,
            "train_images": clock.images, "wall_seconds": wall_before + time.time() - session_start,
            "epoch_sums": None if sums is None else sums.tolist(), "world_size": world,
            "elastic_run_id": dist_utils.elastic_run_id(), "scaler": scaler.state_dict() or None}, data_meta)

    bar = _progress(cfg, is_main, total_steps, step)
    last_finite, test = float("nan"), None
    grad_norm = None  # the clipped step's gradient norm before clipping (read only when a run diverges)

    def diverged(what: str) -> None:
        if bar is not None:
            bar.close()
        if grad_norm is not None and not scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
            what += (f"; the gradient norm at step {step - 1} was {grad_norm.item()}: the backward pass overflowed, "
                     f"which clipping cannot repair")
        msg = f"training diverged: {what}; last finite loss {last_finite:.4g}. "
        msg += f"The last good checkpoint is kept at {ckpt}." if ckpt and ckpt.exists() else "No checkpoint was written yet."
        if is_main and out is not None:
            _write_summary(out, {"status": "diverged", "error": msg, "model": cfg.model_name, "step": step})
        raise DivergenceError(msg)

    def check_finite() -> None:
        """Before a checkpoint or an epoch's end: a model holding inf/NaN is never saved or reported."""
        bad = _non_finite_entry(model)
        if dist_utils.all_reduce_sum(torch.tensor([float(bad is not None)], dtype=torch.float64)).item():
            diverged(f"the weights or BatchNorm statistics became non-finite ({bad or 'on another rank'}) "
                     f"by step {step} (lr {lr_at(max(step - 1, 0), total_steps, cfg):.4g})")

    model.train()
    for epoch in range(step // steps_per_epoch if step < total_steps else num_epochs, num_epochs):
        train_loader.set_epoch(epoch)
        # loss sum, correct, count over this epoch on this rank
        sums = torch.tensor(epoch_sums if epoch_sums else [0.0, 0.0, 0.0], dtype=torch.float64)
        epoch_sums = None
        t0, seg_images = time.perf_counter(), 0
        for x, y in train_loader.iter_from(step - epoch * steps_per_epoch):
            if step >= total_steps:
                break
            lr = lr_at(step, total_steps, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = fwd(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss_val = loss.item()
            if world > 1:  # every rank sees the mean loss, so all of them stop together on NaN
                mean_loss = dist_utils.all_reduce_sum(torch.tensor([loss_val], dtype=torch.float64)).item() / world
            else:
                mean_loss = loss_val
            if not math.isfinite(mean_loss):
                diverged(f"loss became {mean_loss} at step {step} (epoch {epoch}, lr {lr:.4g})")
            last_finite = mean_loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            n = y.numel()
            seg_images += n * world
            sums += torch.tensor([loss_val * n, (logits.detach().argmax(1) == y).sum().item(), n], dtype=torch.float64)
            if step % cfg.log_every == 0 or step == total_steps:
                curve.append([step, round(mean_loss, 5)])
                if bar is not None:
                    rate = (clock.images + seg_images) / max(clock.seconds + time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                                    img_s=f"{rate:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch and step < total_steps:
                clock = _Clock(clock.seconds + time.perf_counter() - t0, clock.images + seg_images)
                # rank 0 carries the sums of all ranks from here on (as a resume from this checkpoint will)
                sums = dist_utils.all_reduce_sum(sums)
                if not is_main:
                    sums.zero_()
                check_finite()
                save(sums)
                t0, seg_images = time.perf_counter(), 0
        clock = _Clock(clock.seconds + time.perf_counter() - t0, clock.images + seg_images)
        sums = dist_utils.all_reduce_sum(sums)
        if step >= total_steps and cfg.precise_bn:
            precise_bn(model, train_ds, cfg, device, amp_dtype)
        check_finite()
        if (epoch + 1) % cfg.eval_every == 0 or step >= total_steps:
            dist_utils.broadcast_buffers(model)  # every rank evaluates rank 0's model, the one it saves
            test = evaluate(model, test_loader, device, amp_dtype)
        rec = {"epoch": epoch + 1, "step": step, "lr": lr_at(step - 1, total_steps, cfg),
               "train_loss": sums[0].item() / max(sums[2].item(), 1), "train_acc": sums[1].item() / max(sums[2].item(), 1),
               "test_loss": test["loss"] if test else None, "test_acc": test["acc"] if test else None,
               "train_img_per_s": clock.images / max(clock.seconds, 1e-9), "train_seconds": clock.seconds}
        if out is not None:  # before the checkpoint: a resume drops lines past its step
            _on_main(lambda: _append_line(out / "metrics.jsonl", json.dumps(rec)), is_main)
        save(None)
        if bar is not None:
            bar.write(f"epoch {epoch + 1}/{num_epochs}  train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f}"
                      + (f"  test acc {test['acc']:.4f}" if test else "") + f"  {rec['train_img_per_s']:.0f} img/s")
        if step < total_steps:
            test = None
    if bar is not None:
        bar.close()
    if test is None:  # resumed a run that had already finished: evaluate the restored weights
        dist_utils.broadcast_buffers(model)
        test = evaluate(model, test_loader, device, amp_dtype)

    summary = {
        "status": "complete", "model": cfg.model_name, "model_kwargs": cfg.model_kwargs, "data": cfg.data,
        "params": n_params, "test_acc": test["acc"], "test_loss": test["loss"],
        "train_img_per_s": clock.images / max(clock.seconds, 1e-9), "train_seconds": clock.seconds,
        "epochs": total_steps / steps_per_epoch, "steps": total_steps, "batch_size": cfg.batch_size,
        "augment": augment, "precise_bn": min(cfg.precise_bn, len(train_ds)) if _batch_norms(model) else 0,
        "world_size": world, "seed": cfg.seed, "curve": curve, "device": str(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "wall_s": round(wall_before + time.time() - session_start, 2),
    }

    def finish() -> None:
        if out is not None:
            save_weights(out / "model.safetensors", model, {"test_acc": test["acc"], "steps": total_steps, **data_meta})
            _write_summary(out, summary)
            _unlock_run_dir(out)

    _on_main(finish, is_main)  # every rank returns once rank 0 has written, or stops with it
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path``; a failed write (disk full) is cut back off, leaving no torn line."""
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    size = os.fstat(fd).st_size
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _metric_step(line: str) -> int | None:
    """The ``step`` of one metrics.jsonl line, or None for a line that is not a whole record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to the checkpoint's ``step``; drop later ones and torn ones.

    A torn line is what a write cut short leaves (a full disk, a kill mid-write): it is dropped
    with a warning, so the resumed run rewrites that epoch's record.
    """
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    steps = [_metric_step(ln) for ln in lines]
    torn = sum(s is None for s in steps)
    if torn:
        print(f"warning: dropped {torn} incomplete line(s) from {path}", file=sys.stderr, flush=True)
    keep = [ln for ln, s in zip(lines, steps) if s is not None and s <= step]
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def precise_bn(model: nn.Module, ds, cfg: TrainConfig, device: torch.device, amp_dtype=None) -> int:
    """Re-estimate every BatchNorm's running mean and variance with the model's current weights:
    the average of the batch statistics over the first ``cfg.precise_bn`` training images
    (un-augmented, batches of ``cfg.batch_size``), as pycls / detectron2's precise BN. Returns the
    number of images used. Weights and the training RNG stream are untouched.
    """
    bns = _batch_norms(model)
    if not bns:
        return 0
    loader = InMemoryLoader(ds.subset(min(cfg.precise_bn, len(ds))), cfg.batch_size, train=False,
                            channels_last=cfg.channels_last)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches that follow
    was_training = model.training
    model.train()
    seen = 0
    rng = torch.get_rng_state()  # dropout / drop-path draw in train mode: leave the stream as it was
    try:
        for x, _ in loader:
            with autocast(device, amp_dtype):
                model(x.to(device, non_blocking=True))
            seen += x.shape[0]
    finally:
        torch.set_rng_state(rng)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return seen


def _non_finite_entry(model: nn.Module) -> str | None:
    """The name of the first weight or buffer holding an inf or NaN, or None when all are finite."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _build_model(cfg: TrainConfig, ds) -> nn.Module:
    """The model ``cfg.model`` names (built for ``ds``), or the module it holds; checked on ``ds``'s images."""
    if isinstance(cfg.model, nn.Module):
        model = cfg.model
    else:
        kwargs = dict(cfg.model_kwargs)
        kwargs.setdefault("img_size", ds.img_size)
        model = models.create_model(cfg.model, num_classes=ds.num_classes, in_chans=ds.in_chans, **kwargs)
    _check_input_size(model, ds, cfg.model_name)
    return model


def _check_input_size(model: nn.Module, ds, name: str) -> None:
    """Fail early, clearly, on an image size the model cannot take or a wrong number of outputs."""
    try:
        with torch.no_grad():
            model.eval()
            out = model(torch.zeros(2, ds.in_chans, *ds.images.shape[-2:]))
            model.train()
    except RuntimeError as e:
        raise ConfigError(f"model {name} cannot take {ds.name} images of size "
                          f"{tuple(ds.images.shape[1:])}: {str(e).splitlines()[0]}") from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[1] != ds.num_classes:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"model {name} must return (batch, {ds.num_classes}) logits for {ds.name}, got {got}")


def _progress(cfg: TrainConfig, is_main: bool, total: int, initial: int):
    if not (cfg.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=cfg.model_name, unit="step", dynamic_ncols=True, leave=True)
