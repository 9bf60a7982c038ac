"""InMemoryLoader and random_crop_flip: determinism, exact resume, DDP sharding, normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pnnh.data import ArrayDataset, InMemoryLoader, default_pad, random_crop_flip
from pnnh.errors import ConfigError


def make_ds(n=50, c=1, hw=(8, 8), seed=0) -> ArrayDataset:
    """Random images; label i identifies sample i so tests can track indices through the loader."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, *hw), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n), [str(i) for i in range(n)], "toy",
                        mean=(0.5,) * c, std=(0.25,) * c)


def batches(loader, start=0):
    return list(loader.iter_from(start)) if start else list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------------------
# random_crop_flip
# --------------------------------------------------------------------------------------


def crop_candidates(img: torch.Tensor, pad: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every (dy, dx, flipped) crop of one C×H×W image, computed the obvious way."""
    c, h, w = img.shape
    padded = F.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def test_random_crop_flip_shape_identity_and_seed():
    x = make_ds(16, c=3, hw=(6, 7)).images
    assert random_crop_flip(x, 0, False, torch.Generator().manual_seed(0)) is x  # identity
    y = random_crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == torch.uint8
    y2 = random_crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    y3 = random_crop_flip(x, 2, True, torch.Generator().manual_seed(2))
    assert torch.equal(y, y2) and not torch.equal(y, y3)


@pytest.mark.parametrize("pad,flip", [(2, True), (3, False), (0, True)])
def test_random_crop_flip_each_sample_is_a_crop_of_itself(pad, flip):
    x = make_ds(24, c=2, hw=(5, 6), seed=3).images
    y = random_crop_flip(x, pad, flip, torch.Generator().manual_seed(7))
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy, dx, f, crop in crop_candidates(x[i], pad) if torch.equal(crop, y[i])]
        assert matches, f"sample {i} is not a padded crop of its own input"
        seen |= {f for _, _, f in matches if not (f and torch.equal(x[i], x[i].flip(-1)))}
        if not flip:
            assert any(not f for _, _, f in matches)
    if flip:
        assert seen == {False, True}, "flip=True should flip some samples and not others"


def test_random_crop_flip_explicit_offsets():
    """A sample whose crop lands in the corner has zero padding along two borders."""
    x = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    y = random_crop_flip(x, 1, False, torch.Generator().manual_seed(0))
    corner = (y[:, 0, 0, :] == 0).all(dim=1) & (y[:, 0, :, 0] == 0).all(dim=1)  # dy = dx = 0
    assert corner.any()
    k = int(corner.nonzero()[0])
    assert torch.equal(y[k, 0, 1:, 1:], x[k, 0, :3, :3])  # shifted down-right by one pixel


def test_default_pad():
    assert default_pad(28) == 2 and default_pad(32) == 4 and default_pad(64) == 8


# --------------------------------------------------------------------------------------
# InMemoryLoader
# --------------------------------------------------------------------------------------


def test_loader_is_deterministic_and_epoch_dependent():
    ds = make_ds()
    kw = dict(train=True, augment=True, pad=2, seed=5)
    a = batches(InMemoryLoader(ds, 8, **kw))
    assert_same_batches(a, batches(InMemoryLoader(ds, 8, **kw)))
    other = InMemoryLoader(ds, 8, **kw)
    other.set_epoch(1)
    b = batches(other)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in b]))
    other.set_epoch(0)
    assert_same_batches(a, batches(other))
    seed6 = batches(InMemoryLoader(ds, 8, **{**kw, "seed": 6}))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in seed6]))


@pytest.mark.parametrize("start", [1, 3, 6])
def test_iter_from_equals_tail_of_full_epoch(start):
    loader = InMemoryLoader(make_ds(), 8, train=True, augment=True, pad=2, seed=1)
    loader.set_epoch(3)
    full = batches(loader)
    assert len(full) == len(loader) == 6  # 50 // 8
    assert_same_batches(full[start:], batches(loader, start))
    with pytest.raises(ConfigError, match="start_batch"):
        loader.iter_from(7)


@pytest.mark.parametrize("world_size,drop_last", [(2, True), (3, True), (3, False)])
def test_sharding_union_equals_single_process_global_batch(world_size, drop_last):
    ds, b = make_ds(n=50, c=2), 4
    kw = dict(train=True, augment=True, pad=1, seed=9, drop_last=drop_last)
    single = InMemoryLoader(ds, b * world_size, **kw)
    single.set_epoch(2)
    ranks = [InMemoryLoader(ds, b, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    for loader in ranks:
        loader.set_epoch(2)
    per_rank = [batches(loader) for loader in ranks]
    want = batches(single)
    assert all(len(p) == len(want) for p in per_rank)
    for i, (x, y) in enumerate(want):
        assert torch.equal(torch.cat([p[i][0] for p in per_rank]), x)  # same samples, same augmentation
        assert torch.equal(torch.cat([p[i][1] for p in per_rank]), y)
        assert all(p[i][0].shape[0] == b for p in per_rank)


def test_train_epoch_has_no_duplicates_with_drop_last_and_pads_without():
    ds = make_ds(n=50)
    seen = torch.cat([y for _, y in InMemoryLoader(ds, 8, train=True)])
    assert len(seen) == 48 and len(seen.unique()) == 48  # a permutation, truncated
    loader = InMemoryLoader(ds, 8, train=True, drop_last=False)
    padded = torch.cat([y for _, y in loader])
    assert len(loader) == 7 and len(padded) == 56
    assert sorted(padded[:50].tolist()) == list(range(50))
    assert torch.equal(padded[50:], padded[:6])  # padding repeats the start of the permutation


@pytest.mark.parametrize("world_size,b", [(1, 8), (3, 8), (4, 16)])
def test_test_split_covers_every_sample_once_across_ranks(world_size, b):
    ds = make_ds(n=50)
    seen = []
    for r in range(world_size):
        loader = InMemoryLoader(ds, b, train=False, augment=True, rank=r, world_size=world_size)
        got = batches(loader)
        assert len(got) == len(loader)
        assert all(0 < len(y) <= b for _, y in got)
        for x, y in got:  # no augmentation in evaluation: images untouched
            assert torch.allclose(x, (ds.images[y].float() / 255 - 0.5) / 0.25, atol=1e-5)
        seen += [y for _, y in got]
    assert sorted(torch.cat(seen).tolist()) == list(range(50))
    if world_size == 1:
        assert torch.equal(torch.cat(seen), torch.arange(50))  # no shuffle, in order


def test_normalisation_and_labels_match_images():
    g = torch.Generator().manual_seed(0)
    images = (torch.randn(200, 3, 6, 6, generator=g) * 40 + torch.tensor([60.0, 120.0, 180.0]).view(1, 3, 1, 1))
    images = images.clamp(0, 255).round().to(torch.uint8)
    x01 = images.double() / 255
    mean = tuple(x01.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x01.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1).tolist())
    ds = ArrayDataset(images, torch.arange(200) % 7, [str(i) for i in range(7)], "toy", mean, std)
    xs, ys = zip(*InMemoryLoader(ds, 32, train=False))
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (200, 3, 6, 6)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1) - 1).abs().max() < 1e-3
    assert torch.equal(torch.cat(ys), ds.labels)


def test_channels_last_flag():
    ds = make_ds(n=20, c=3)
    x, _ = next(iter(InMemoryLoader(ds, 4, train=True, augment=True, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, _ = next(iter(InMemoryLoader(ds, 4, train=True, augment=True)))
    assert x.is_contiguous()


def test_single_process_augmentation_is_random_crop_flip_with_batch_seed():
    """Batch i of a loader is exactly random_crop_flip of its raw samples (documented contract)."""
    ds = make_ds(n=32, c=1, hw=(8, 8))
    loader = InMemoryLoader(ds, 8, train=True, augment=True, pad=2, flip=True, seed=3)
    x, y = next(iter(loader))
    raw = (x * 0.25 + 0.5) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3)
    # Each augmented sample is a crop/flip of the sample its label names.
    for xi, yi in zip(raw.round().to(torch.uint8), y):
        assert any(torch.equal(crop, xi) for *_, crop in crop_candidates(ds.images[yi], 2))


def test_loader_validation():
    ds = make_ds(n=10)
    with pytest.raises(ConfigError, match="rank"):
        InMemoryLoader(ds, 2, train=True, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        InMemoryLoader(ds, 0, train=True)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        InMemoryLoader(ds, 8, train=True, world_size=2)
    with pytest.raises(ConfigError, match="drop_last"):
        InMemoryLoader(ds, 8, train=False, drop_last=True)
    assert len(InMemoryLoader(ds, 8, train=True, world_size=2, drop_last=False)) == 1
    loader = InMemoryLoader(ds, 4, train=False)
    assert len(loader) == 3 and [len(y) for _, y in loader] == [4, 4, 2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches():
    ds = make_ds(n=40, c=3)
    kw = dict(train=True, augment=True, pad=2, seed=4, rank=1, world_size=2)
    cpu = batches(InMemoryLoader(ds, 4, **kw))
    gpu = batches(InMemoryLoader(ds, 4, device="cuda", **kw))
    assert gpu[0][0].device.type == "cuda"
    assert_same_batches(cpu, [(x.cpu(), y.cpu()) for x, y in gpu])
