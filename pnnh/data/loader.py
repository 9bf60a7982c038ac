"""Batches straight from in-memory uint8 tensors, with batched random-crop/flip augmentation.

:class:`InMemoryLoader` replaces ``torch.utils.data.DataLoader`` for datasets held in an
:class:`~pnnh.data.datasets.ArrayDataset`: a batch is one ``index_select`` on the uint8
image tensor, one batched crop+flip (a single ``gather``), one float conversion and one
fused normalisation. There are no worker processes and no per-sample Python, so a full
Fashion-MNIST epoch takes about a second on two CPU cores.

Determinism and exact resume
    The train order of epoch ``e`` is ``torch.randperm(N, generator=g)`` with ``g`` seeded
    from ``(seed, e)`` only; the augmentation of global batch ``i`` uses a generator seeded
    from ``(seed, e, i)`` only. Batch ``i`` is therefore a pure function of
    ``(seed, epoch, i)``: :meth:`InMemoryLoader.iter_from` jumps to it without computing the
    earlier batches, and resuming mid-epoch reproduces the uninterrupted run bit for bit.

DDP sharding (``rank``/``world_size``)
    Every rank computes the same permutation. For training it is truncated
    (``drop_last=True``) or padded by repeating its beginning (``drop_last=False``) to a
    multiple of ``B*W`` (``B`` = per-rank ``batch_size``, ``W`` = ``world_size``). Global
    batch ``i`` is ``perm[i*B*W:(i+1)*B*W]`` and rank ``r`` takes its contiguous slice
    ``[r*B:(r+1)*B]``. Augmentation parameters are drawn for the whole global batch and
    sliced the same way, so the union over ranks of batch ``i`` -- samples, order *and*
    augmentation -- equals batch ``i`` of a single process with batch size ``B*W``
    (gradient equivalence between DDP and single-process training).

Evaluation (``train=False``)
    Dataset order, no augmentation, no padding: the global batches tile ``0..N-1`` and rank
    ``r`` takes the same ``[r*B:(r+1)*B]`` slice of each, so every sample is seen exactly once
    over all ranks. The last slices may be short or empty; empty ones are not yielded, so
    trailing ranks can have one batch fewer (``len()`` accounts for it) -- reduce metrics
    once after the loop, not per batch.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from pnnh.data.datasets import ArrayDataset
from pnnh.errors import ConfigError

__all__ = ["InMemoryLoader", "random_crop_flip", "default_pad"]


def _derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: int | str) -> torch.Generator:
    g = torch.Generator()  # CPU: identical streams whatever the training device
    g.manual_seed(_derive_seed(*parts))
    return g


def default_pad(img_size: int) -> int:
    """Random-crop padding used when none is given: 4 px for 32 px images, 2 px for 28 px.

    Scales as ``img_size // 8`` from 32 px up (8 px at 64 px); smaller images get at most 2.
    """
    return img_size // 8 if img_size >= 32 else min(2, max(img_size // 4, 0))


def _sample_crop_flip(
    n: int, pad: int, flip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``dy, dx`` in ``[0, 2*pad]`` and a horizontal-flip mask.

    Drawn in a fixed order (dy, dx, flip) so a generator state fully determines them.
    """
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    if flip:
        mask = torch.randint(0, 2, (n,), generator=generator, dtype=torch.bool)
    else:
        mask = torch.zeros(n, dtype=torch.bool)
    return dy, dx, mask


def _apply_crop_flip(
    x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Crop ``x`` (N×C×H×W, any dtype) zero-padded by ``pad`` at ``(dy, dx)`` and flip where ``flip``.

    One ``gather`` over the padded batch: output pixel ``(i, j)`` of sample ``n`` reads padded
    pixel ``(dy[n] + i, dx[n] + j)``, or ``(dy[n] + i, dx[n] + W-1-j)`` when flipped, so crop and
    flip cost a single pass whatever the number of distinct offsets.
    """
    n, c, h, w = x.shape
    dev = x.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    hp, wp = h + 2 * pad, w + 2 * pad
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # N×H
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # N×W
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(xp.reshape(n, c, hp * wp), 2, flat)
    return out.view(n, c, h, w)


def random_crop_flip(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, on a whole batch at once.

    Each sample ``x[n]`` (N×C×H×W, typically uint8) is zero-padded by ``pad`` on every side,
    cropped back to H×W at an offset drawn uniformly from ``[0, 2*pad]²`` and, if ``flip``,
    mirrored horizontally with probability 1/2 -- torchvision's
    ``RandomCrop(H, padding=pad) + RandomHorizontalFlip()`` without a per-sample loop.
    ``pad=0, flip=False`` returns ``x`` unchanged. The same generator state gives the same output.
    """
    if x.dim() != 4:
        raise ConfigError(f"random_crop_flip expects an N×C×H×W batch, got shape {tuple(x.shape)}")
    if pad < 0:
        raise ConfigError(f"random-crop padding must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return x
    dy, dx, mask = _sample_crop_flip(x.shape[0], pad, flip, generator)
    return _apply_crop_flip(x, pad, dy, dx, mask)


class InMemoryLoader:
    """Yields normalised float batches straight from uint8 tensors: no worker processes, no per-sample Python.

    Iterating yields ``(images, labels)``: float32 ``B×C×H×W`` normalised with the dataset's
    ``mean``/``std`` (channels-last if requested) and int64 ``B``, both on ``device``.
    See the module docstring for the exact ordering, seeding and DDP sharding rules.

    Args:
        ds: the dataset (moved to ``device`` once).
        batch_size: per-rank batch size ``B``.
        train: shuffle every epoch and (if ``augment``) augment; ``False`` gives the evaluation
            order: every sample exactly once over all ranks, no shuffle, no augmentation.
        augment: random crop (zero padding ``pad``) + horizontal flip (if ``flip``); train only.
        pad: crop padding in pixels; default :func:`default_pad` (4 for 32 px, 2 for 28 px).
        flip: random horizontal flip; default ``True`` (label-preserving for Fashion-MNIST and
            CIFAR -- pass ``False`` for data where mirroring changes the class, e.g. digits).
        seed: base seed of the shuffling and augmentation streams.
        drop_last: train only; default ``True``. ``False`` pads the epoch by repeating its first
            samples so every (global) batch is full.
        rank, world_size: DDP shard of this process.
        channels_last: return ``torch.channels_last`` batches.
        device: where the dataset lives and batches are produced.
    """

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        *,
        train: bool,
        augment: bool = False,
        pad: int | None = None,
        flip: bool | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last is None:
            drop_last = train
        if drop_last and not train:
            raise ConfigError(
                "drop_last=True is only for training; an evaluation loader (train=False) "
                "must see every sample -- leave drop_last unset"
            )
        n = len(ds)
        if n == 0:
            raise ConfigError(f"dataset {ds.name!r} ({ds.split}) is empty; nothing to load")
        if train and drop_last and n < batch_size * world_size:
            raise ConfigError(
                f"{ds.name} ({ds.split}) has {n} samples, fewer than one global batch "
                f"(batch_size {batch_size} × world_size {world_size}); with drop_last the epoch "
                f"would be empty -- lower the batch size (--batch-size), or from Python build the loader "
                f"with drop_last=False"
            )
        pad = default_pad(min(ds.img_hw)) if pad is None else int(pad)
        if pad < 0:
            raise ConfigError(f"random-crop padding must be >= 0, got {pad}")

        self.dataset = ds
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.pad = pad
        self.flip = True if flip is None else bool(flip)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.channels_last = bool(channels_last)
        self.device = torch.device(device)
        self.epoch = 0

        self._images = ds.images.to(self.device)
        self._labels = ds.labels.to(self.device)
        mean = torch.tensor(ds.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(ds.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x/255 - mean)/std == x*scale - shift: one multiply and one subtract per batch.
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std

    # ------------------------------------------------------------------ epoch layout

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _num_global_batches(self) -> int:
        n, gb = len(self.dataset), self.global_batch_size
        return n // gb if self.drop_last else math.ceil(n / gb)

    def __len__(self) -> int:
        """Batches per epoch for this rank (evaluation: trailing ranks may get one fewer)."""
        if self.train:
            return self._num_global_batches()
        n, offset = len(self.dataset), self.rank * self.batch_size
        return math.ceil((n - offset) / self.global_batch_size) if n > offset else 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order/augmentation the next iteration yields (as DistributedSampler)."""
        self.epoch = int(epoch)

    def _epoch_order(self) -> torch.Tensor:
        """Sample indices of the whole epoch (all ranks), already truncated/padded for training."""
        n = len(self.dataset)
        if not self.train:
            return torch.arange(n)
        perm = torch.randperm(n, generator=_generator(self.seed, self.epoch, "perm"))
        total = self._num_global_batches() * self.global_batch_size
        if total <= n:
            return perm[:total]
        return perm.repeat(math.ceil(total / n))[:total]  # pad by repeating from the start

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the current epoch from batch 0."""
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over the current epoch from batch ``start_batch``, skipping earlier ones unseen.

        Batch ``i`` is identical to the ``i``-th batch of ``iter(self)``, which makes mid-epoch
        resume from a checkpoint exact.
        """
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch must be in [0, {len(self)}] (batches per epoch), got {start_batch}")
        return self._iterate(int(start_batch), self._epoch_order())

    def _iterate(self, start: int, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gb, b, r = self.global_batch_size, self.batch_size, self.rank
        order = order.to(self.device)
        for i in range(start, len(self)):
            lo = i * gb + r * b
            idx = order[lo : lo + b]  # evaluation: the last slice may be short
            yield self._make_batch(idx, i)

    def _make_batch(self, idx: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._images.index_select(0, idx)
        y = self._labels.index_select(0, idx)
        if self.augment and (self.pad > 0 or self.flip):
            # Parameters for the whole global batch, then this rank's slice: identical to what a
            # single process with batch size B*W would draw for these samples.
            g = _generator(self.seed, self.epoch, i, "aug")
            dy, dx, mask = _sample_crop_flip(self.global_batch_size, self.pad, self.flip, g)
            sl = slice(self.rank * self.batch_size, self.rank * self.batch_size + idx.shape[0])
            x = _apply_crop_flip(x, self.pad, dy[sl], dx[sl], mask[sl])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # on uint8: 4× less to move
        x = x.to(torch.float32)  # preserves the memory format
        x.mul_(self._scale).sub_(self._shift)
        return x, y

    def __repr__(self) -> str:
        return (
            f"InMemoryLoader({self.dataset.name}/{self.dataset.split}, batch_size={self.batch_size}, "
            f"train={self.train}, augment={self.augment}, pad={self.pad}, flip={self.flip}, "
            f"rank={self.rank}/{self.world_size}, batches={len(self)})"
        )
