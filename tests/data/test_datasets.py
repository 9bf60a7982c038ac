"""Dataset loading: IDX (Fashion-MNIST), CIFAR pickles, image folders, search order, errors.

Every test writes its own small files in the exact distribution format into ``tmp_path``;
only :func:`test_real_fashion_mnist` reads the system copy (Debian ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import pnnh.data.datasets as datasets_mod
from pnnh.data import DATASETS, ArrayDataset, find_data_dir, load_dataset
from pnnh.errors import ConfigError, DataError

REAL_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_search(monkeypatch, tmp_path):
    """No $PNNH_DATA, an empty user cache and no system dirs unless a test sets them."""
    monkeypatch.delenv("PNNH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(datasets_mod, "SYSTEM_DIRS", {})


# --------------------------------------------------------------------------------------
# IDX helpers
# --------------------------------------------------------------------------------------


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, h, w = images.shape
    return np.array([magic, n, h, w], dtype=">u4").tobytes() + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return np.array([magic, len(labels)], dtype=">u4").tobytes() + labels.astype(np.uint8).tobytes()


def write_fashion_mnist(d: pathlib.Path, n_train=50, n_test=20, gz=False, seed=0) -> dict[str, np.ndarray]:
    """Write the four IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, size=n, dtype=np.uint8)
        for fname, payload in ((f"{prefix}-images-idx3-ubyte", idx_images(imgs)),
                               (f"{prefix}-labels-idx1-ubyte", idx_labels(lbls))):
            if gz:
                (d / (fname + ".gz")).write_bytes(gzip.compress(payload, compresslevel=1))
            else:
                (d / fname).write_bytes(payload)
        out[prefix] = (imgs, lbls)
    return out


# --------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_load_raw_and_gz(tmp_path, gz):
    written = write_fashion_mnist(tmp_path / "fm", gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("fashion-mnist", split, tmp_path / "fm")
        imgs, lbls = written[prefix]
        assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert ds.images.shape == (len(imgs), 1, 28, 28)
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
        assert torch.equal(ds.labels, torch.from_numpy(lbls.astype(np.int64)))
        assert (ds.num_classes, ds.in_chans, ds.img_size, ds.split) == (10, 1, 28, split)
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
        assert ds.mean == (0.2860,) and ds.std == (0.3530,)


def test_idx_search_order_env_and_cache(tmp_path, monkeypatch):
    cache = tmp_path / "xdg-cache" / "pnnh" / "fashion-mnist"
    write_fashion_mnist(cache, n_train=3)
    assert find_data_dir("fashion-mnist") == cache
    assert len(load_dataset("fashion-mnist")) == 3

    env_root = tmp_path / "pnnh-data"
    write_fashion_mnist(env_root / "fashion-mnist", n_train=4)
    monkeypatch.setenv("PNNH_DATA", str(env_root))  # $PNNH_DATA/fashion-mnist beats the cache
    assert find_data_dir("fashion-mnist") == env_root / "fashion-mnist"
    assert len(load_dataset("fashion-mnist")) == 4

    write_fashion_mnist(env_root, n_train=5)  # $PNNH_DATA itself beats its sub-folder
    assert len(load_dataset("fashion-mnist")) == 5

    system = tmp_path / "system"
    write_fashion_mnist(system, n_train=6)
    monkeypatch.setattr(datasets_mod, "SYSTEM_DIRS", {"fashion-mnist": (system,)})
    monkeypatch.delenv("PNNH_DATA")  # system dir beats the cache
    assert len(load_dataset("fashion-mnist")) == 6

    explicit = tmp_path / "explicit"
    write_fashion_mnist(explicit / "fashion-mnist", n_train=7)  # parent of the folder is accepted
    assert len(load_dataset("fashion-mnist", data_dir=explicit)) == 7


def test_idx_wrong_magic(tmp_path):
    d = tmp_path / "fm"
    write_fashion_mnist(d)
    imgs = np.zeros((50, 28, 28), np.uint8)
    (d / "train-images-idx3-ubyte").write_bytes(idx_images(imgs, magic=2049))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic number 2049, expected 2051"):
        load_dataset("fashion-mnist", "train", d)


def test_idx_truncated_names_file_and_sizes(tmp_path):
    d = tmp_path / "fm"
    write_fashion_mnist(d, gz=True)
    path = d / "train-images-idx3-ubyte.gz"
    full = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(full[:-100]))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", "train", d)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg
    assert str(len(full)) in msg and str(len(full) - 100) in msg


def test_idx_count_mismatch(tmp_path):
    d = tmp_path / "fm"
    write_fashion_mnist(d)
    (d / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.zeros(49, np.uint8)))
    with pytest.raises(DataError, match=r"50 images but .*49 labels"):
        load_dataset("fashion-mnist", "train", d)


def test_idx_label_out_of_range(tmp_path):
    d = tmp_path / "fm"
    write_fashion_mnist(d)
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_labels(np.full(20, 10, np.uint8)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has label 10"):
        load_dataset("fashion-mnist", "test", d)


def test_idx_corrupt_gzip(tmp_path):
    d = tmp_path / "fm"
    write_fashion_mnist(d, gz=True)
    path = d / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30] + b"garbage" * 10)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz is not a valid gzip"):
        load_dataset("fashion-mnist", "test", d)


def test_idx_missing_one_file(tmp_path):
    d = tmp_path / "fm"
    write_fashion_mnist(d)
    (d / "t10k-labels-idx1-ubyte").unlink()
    assert len(load_dataset("fashion-mnist", "train", d)) == 50
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte\.gz\) missing"):
        load_dataset("fashion-mnist", "test", d)


def test_fashion_mnist_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("PNNH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert "Fashion-MNIST not found" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "xdg-cache") in msg
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")  # explicit dir: only there


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ConfigError, match="fashion-mnist, cifar10, cifar100, imagefolder"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="'val'.*train, test"):
        load_dataset("fashion-mnist", "val", tmp_path)
    with pytest.raises(ConfigError, match="valid names"):
        find_data_dir("imagenet")
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "imagefolder")


def test_img_size_resizes_at_load(tmp_path):
    write_fashion_mnist(tmp_path / "fm", n_train=5)
    ds = load_dataset("fashion-mnist", "train", tmp_path / "fm", img_size=32)
    assert ds.images.shape == (5, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.img_size == 32
    with pytest.raises(ConfigError, match="img_size"):
        load_dataset("fashion-mnist", "train", tmp_path / "fm", img_size=0)


def test_real_fashion_mnist(monkeypatch):
    if not REAL_FASHION_MNIST.is_dir():
        pytest.skip(f"{REAL_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist to run this test)")
    monkeypatch.setattr(datasets_mod, "SYSTEM_DIRS", {"fashion-mnist": (REAL_FASHION_MNIST,)})
    assert find_data_dir("fashion-mnist") == REAL_FASHION_MNIST  # found by the default search
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.num_classes == 10 and train.img_size == 28
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert abs(train.images.float().mean().item() / 255 - train.mean[0]) < 1e-3


# --------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------


def cifar_batch(n: int, rng, labels_key=b"labels", num_classes=10) -> dict:
    return {
        b"batch_label": b"testing batch",
        labels_key: [int(v) for v in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar10(root: pathlib.Path, n_per_batch=4, protocol=2) -> dict[str, dict]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(n_per_batch, rng)
        (d / name).write_bytes(pickle.dumps(batches[name], protocol=protocol))
    meta = {b"label_names": [n.encode() for n in datasets_mod.CIFAR10_CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_real_format(tmp_path, protocol):
    batches = write_cifar10(tmp_path, protocol=protocol)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train = load_dataset("cifar10", "train", data_dir)
        assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
        want = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
        assert torch.equal(train.images, torch.from_numpy(want.reshape(-1, 3, 32, 32)))
        # Row layout of the official files: 1024 red, then 1024 green, then 1024 blue, row-major.
        assert train.images[5, 1, 2, 3].item() == batches["data_batch_2"][b"data"][1, 1024 + 2 * 32 + 3]
        want_lbl = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
        assert train.labels.tolist() == want_lbl
        assert train.classes == list(datasets_mod.CIFAR10_CLASSES)
        assert train.mean == (0.4914, 0.4822, 0.4465) and train.in_chans == 3
    test = load_dataset("cifar10", "test", tmp_path)
    assert test.labels.tolist() == batches["test_batch"][b"labels"] and test.split == "test"


def test_cifar100_real_format(tmp_path, monkeypatch):
    d = tmp_path / "data" / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = cifar_batch(7, rng, labels_key=b"fine_labels", num_classes=100)
    train[b"coarse_labels"] = [0] * 7
    (d / "train").write_bytes(pickle.dumps(train, protocol=2))
    (d / "test").write_bytes(pickle.dumps(cifar_batch(3, rng, b"fine_labels", 100), protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    monkeypatch.setenv("PNNH_DATA", str(tmp_path / "data"))  # $PNNH_DATA/cifar100/cifar-100-python
    ds = load_dataset("cifar100", "train")
    assert ds.images.shape == (7, 3, 32, 32) and ds.labels.tolist() == train[b"fine_labels"]
    assert ds.num_classes == 100 and ds.classes[42] == "c42"
    assert ds.std == (0.2673, 0.2564, 0.2762)
    assert len(load_dataset("cifar100", "test")) == 3


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch byte-for-byte as Python 2's cPickle (protocol 2) wrote the official CIFAR files.

    Python 3 cannot produce these (py2 ``str`` is BINSTRING, arrays reference the old
    ``numpy.core.multiarray`` path), so the opcodes are assembled by hand.
    """
    def s(b: bytes) -> bytes:  # py2 str: SHORT_BINSTRING / BINSTRING
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    n, d = data.shape
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b")
             + b"\x87R(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", d) + b"\x86" + dtype
             + b"\x89" + s(data.tobytes()) + b"tb")
    lbls = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + lbls + b"u."


def test_cifar10_python2_pickles(tmp_path):
    """The official files are Python 2 pickles: they must load through the restricted unpickler."""
    write_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    data = np.random.default_rng(5).integers(0, 256, (3, 3072), dtype=np.uint8)
    (d / "test_batch").write_bytes(py2_cifar_pickle(data, [7, 0, 9]))
    ds = load_dataset("cifar10", "test", d)
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(3, 3, 32, 32)))
    assert ds.labels.tolist() == [7, 0, 9]


class _Exploit:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": _Exploit(marker), b"labels": [0]}
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", "train", tmp_path)
    assert "refusing to unpickle" in str(e.value) and "system" in str(e.value)
    assert str(path) in str(e.value)
    assert not marker.exists(), "the crafted pickle was executed"


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found.*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", "train", tmp_path)
    write_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 missing from .*cifar-10-batches-py"):
        load_dataset("cifar10", "train", tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}))
    with pytest.raises(DataError, match=r"test_batch holds 2 images but 1 labels"):
        load_dataset("cifar10", "test", tmp_path)
    (d / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(DataError, match=r"test_batch is not a valid CIFAR pickle"):
        load_dataset("cifar10", "test", tmp_path)


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


def write_image(path: pathlib.Path, size=(12, 12), mode="RGB", value=None, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return arr


def make_folder(root: pathlib.Path, mode="RGB", test_name="test") -> None:
    layout = {"train": {"cat": 3, "ant": 2, "bee": 1}, test_name: {"bee": 1, "ant": 1}}
    seed = 0
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                seed += 1
                write_image(root / split / cls / f"{i}.png", mode=mode, seed=seed)


def test_imagefolder_rgb(tmp_path):
    make_folder(tmp_path)
    write_image(tmp_path / "train" / "bee" / "x.jpeg", value=128)  # JPEG too
    (tmp_path / "train" / "bee" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", "train", tmp_path)
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.images.shape == (7, 3, 12, 12) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    first = np.array(Image.open(tmp_path / "train" / "ant" / "0.png"))
    assert torch.equal(ds.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert (ds.images[3].float() - 128).abs().max() <= 3  # JPEG of a flat 128 image
    # mean/std are computed from the train split, and the test split reuses them
    x = ds.images.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(ds.std, x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).tolist(), atol=1e-6)
    test = load_dataset("imagefolder", "test", tmp_path)
    assert test.classes == ds.classes and test.labels.tolist() == [0, 1]  # train's class indices
    assert test.mean == ds.mean and test.std == ds.std


def test_imagefolder_grayscale_val_and_resize(tmp_path):
    make_folder(tmp_path, mode="L", test_name="val")
    write_image(tmp_path / "train" / "cat" / "big.png", size=(20, 16), mode="L")
    with pytest.raises(DataError, match=r"differ in size.*big\.png is 20×16.*--img-size"):
        load_dataset("imagefolder", "train", tmp_path)
    ds = load_dataset("imagefolder", "train", tmp_path, img_size=8)
    assert ds.images.shape == (7, 1, 8, 8) and ds.in_chans == 1 and len(ds.mean) == 1
    test = load_dataset("imagefolder", "test", tmp_path, img_size=8)  # val/ serves as test
    assert test.images.shape == (2, 1, 8, 8)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="ImageFolder data not found"):
        load_dataset("imagefolder", "train", tmp_path)
    make_folder(tmp_path)
    bad = tmp_path / "train" / "ant" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_dataset("imagefolder", "train", tmp_path)
    bad.unlink()
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folder .*dog has no \.png/\.jpg/\.jpeg images"):
        load_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train" / "dog").rmdir()
    write_image(tmp_path / "test" / "zebra" / "0.png")
    with pytest.raises(DataError, match=r"classes \['zebra'\]"):
        load_dataset("imagefolder", "test", tmp_path)


# --------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------


def test_array_dataset_subset_and_validation():
    ds = ArrayDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 3).clone(),
                      torch.arange(10), [str(i) for i in range(10)], "toy", (0.5,), (0.25,))
    sub = ds.subset(4)
    assert len(sub) == 4 and sub.labels.tolist() == [0, 1, 2, 3] and sub.mean == ds.mean
    assert len(ds.subset(100)) == 10
    assert ds.img_hw == (2, 3)
    with pytest.raises(ConfigError, match="not square"):
        ds.img_size
    with pytest.raises(ConfigError):
        ds.subset(0)
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), ["a"], "bad", (0.0,), (1.0,))
    with pytest.raises(DataError, match="one label per image"):
        ArrayDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"], "bad", (0.0,), (1.0,))
    with pytest.raises(DataError, match="3 channels"):
        ArrayDataset(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a"], "bad", (0.0,), (1.0,))
