"""Whole-dataset-in-memory loading for Fashion-MNIST, CIFAR-10/100 and image folders.

Every dataset pnnh trains on is small enough to live in memory as one ``uint8``
tensor (Fashion-MNIST: 47 MB, CIFAR: 150 MB), so instead of a per-sample
``Dataset``/``DataLoader`` pipeline we decode the files once into an
:class:`ArrayDataset` and let :class:`pnnh.data.loader.InMemoryLoader` slice,
augment and normalise whole batches with tensor ops.

Files are parsed in their original distribution formats (IDX for Fashion-MNIST,
the python-pickle batches for CIFAR, PNG/JPEG trees for ``imagefolder``) and are
never written back or cached on disk. CIFAR pickles are read with a restricted
unpickler that only reconstructs numpy arrays: a crafted file cannot run code.

Where a dataset is looked for (:func:`find_data_dir`):

1. the explicit ``data_dir`` (``--data-dir``) -- if given, *only* there;
2. ``$PNNH_DATA`` itself, then ``$PNNH_DATA/<name>``;
3. a system directory (Fashion-MNIST only: ``/usr/share/datasets/fashion-mnist``,
   installed by the Debian package ``dataset-fashion-mnist``);
4. the user cache ``${XDG_CACHE_HOME:-~/.cache}/pnnh/<name>``.

In each place the official sub-folder (``cifar-10-batches-py``,
``cifar-100-python``, ``fashion-mnist``) is accepted too.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import io
import math
import os
import pathlib
import pickle
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

__all__ = ["ArrayDataset", "DATASETS", "SPLITS", "load_dataset", "find_data_dir"]

DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
SPLITS: tuple[str, ...] = ("train", "test")

#: Per-channel mean/std of the *train* split in [0, 1] units (the usual published values).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: System-wide install locations (module-level so tests can monkeypatch them).
SYSTEM_DIRS: dict[str, tuple[pathlib.Path, ...]] = {
    "fashion-mnist": (pathlib.Path("/usr/share/datasets/fashion-mnist"),),
}

#: Official sub-folder names accepted below any searched directory.
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("fashion-mnist",),
    "cifar10": ("cifar-10-batches-py",),
    "cifar100": ("cifar-100-python",),
    "imagefolder": (),
}

_IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim

_CIFAR_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "cifar10": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "cifar100": {"train": ("train",), "test": ("test",)},
}
_CIFAR_META: dict[str, tuple[str, bytes, bytes, int]] = {
    # name: (meta file, class-names key, labels key, number of classes)
    "cifar10": ("batches.meta", b"label_names", b"labels", 10),
    "cifar100": ("meta", b"fine_label_names", b"fine_labels", 100),
}
_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


# --------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------


@dataclass(eq=False)  # tensors: element-wise ==, no meaningful dataclass equality
class ArrayDataset:
    """A whole dataset held in memory as uint8 images N×C×H×W and int64 labels N.

    ``mean``/``std`` are the per-channel statistics of the *train* split in [0, 1]
    units (also on a test split), which is what the loader normalises with.
    """

    images: torch.Tensor  # uint8, N×C×H×W, contiguous
    labels: torch.Tensor  # int64, N
    classes: list[str]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str = "train"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be a uint8 N×C×H×W tensor, "
                f"got {self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}; need one label per image"
            )
        c = self.images.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(
                f"{self.name}: mean/std have {len(self.mean)}/{len(self.std)} entries "
                f"but the images have {c} channels"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"{self.name}: std must be positive, got {self.std}")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One ``(uint8 C×H×W image, label)`` pair (for inspection, not for training)."""
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (
            f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={n}, "
            f"shape={c}×{h}×{w}, num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_hw(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def img_size(self) -> int:
        """Side length of the (square) images; see :attr:`img_hw` for non-square ones."""
        h, w = self.img_hw
        if h != w:
            raise ConfigError(
                f"{self.name}: images are {h}×{w}, not square, so there is no single img_size; "
                f"reload with img_size=... (--img-size) to resize them to a square"
            )
        return h

    def subset(self, n: int) -> "ArrayDataset":
        """The first ``n`` samples (all of them if ``n >= len(self)``), as a new dataset.

        The tensors are copied so the subset does not keep the full dataset alive.
        """
        if n < 1:
            raise ConfigError(f"subset size must be >= 1, got {n}")
        n = min(int(n), len(self))
        return ArrayDataset(
            images=self.images[:n].clone(),
            labels=self.labels[:n].clone(),
            classes=list(self.classes),
            name=self.name,
            mean=self.mean,
            std=self.std,
            split=self.split,
        )


# --------------------------------------------------------------------------------------
# Locating data
# --------------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def _cache_dir(name: str) -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "pnnh" / name


def _search_roots(name: str, data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
    """Directories to look in, in order (before expanding the official sub-folders)."""
    if data_dir is not None:
        return [pathlib.Path(data_dir).expanduser()]
    roots: list[pathlib.Path] = []
    env = os.environ.get("PNNH_DATA")
    if env:
        roots += [pathlib.Path(env).expanduser(), pathlib.Path(env).expanduser() / name]
    roots += list(SYSTEM_DIRS.get(name, ()))
    roots.append(_cache_dir(name))
    return roots


def _has_idx(d: pathlib.Path) -> bool:
    files = [f for pair in _IDX_FILES.values() for f in pair]
    return any((d / f).is_file() or (d / (f + ".gz")).is_file() for f in files)


def _has_cifar(name: str) -> Callable[[pathlib.Path], bool]:
    def check(d: pathlib.Path) -> bool:
        split_files = _CIFAR_FILES[name]
        return any((d / f).is_file() for files in split_files.values() for f in files)

    return check


def _has_imagefolder(d: pathlib.Path) -> bool:
    return any((d / s).is_dir() for s in ("train", "test", "val"))


def _not_found_message(name: str, looked: list[pathlib.Path]) -> str:
    where = ", ".join(str(p) for p in looked)
    if name == "fashion-mnist":
        what = "Fashion-MNIST not found"
        fix = (
            "Install it with `apt-get install dataset-fashion-mnist` or put the four IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte, raw or .gz) in one of those directories / pass --data-dir"
        )
    elif name in _CIFAR_URLS:
        sub = _SUBDIRS[name][0]
        what = f"{name.upper().replace('CIFAR', 'CIFAR-')} not found"
        fix = (
            f"Download {_CIFAR_URLS[name]}, extract it so that {sub}/ lies in one of those "
            f"directories (or $PNNH_DATA/{name}), or pass --data-dir pointing at {sub}/ or its parent"
        )
    else:
        what = "ImageFolder data not found"
        fix = (
            "Pass --data-dir pointing at a folder holding train/<class>/*.png|jpg and "
            "test/<class>/... (or val/)"
        )
    return f"{what} (looked in: {where}). {fix}"


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory that holds dataset ``name``'s files (see the module docstring for the order).

    Raises :class:`~pnnh.errors.DataError` listing every place looked in when none matches.
    An explicit ``data_dir`` is authoritative: if the files are not there (or in its official
    sub-folder) we fail instead of silently using another copy.
    """
    _check_name(name)
    if name == "fashion-mnist":
        has: Callable[[pathlib.Path], bool] = _has_idx
    elif name == "imagefolder":
        has = _has_imagefolder
    else:
        has = _has_cifar(name)
    looked: list[pathlib.Path] = []
    for root in _search_roots(name, data_dir):
        for d in (root, *(root / s for s in _SUBDIRS[name])):
            if d in looked:
                continue
            looked.append(d)
            if d.is_dir() and has(d):
                return d
    raise DataError(_not_found_message(name, looked))


# --------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------


def _read_maybe_gz(directory: pathlib.Path, filename: str, dataset: str) -> tuple[bytes, pathlib.Path]:
    """Bytes of ``filename`` or, failing that, of ``filename.gz`` (decompressed)."""
    raw, gz = directory / filename, directory / (filename + ".gz")
    if raw.is_file():
        return raw.read_bytes(), raw
    if gz.is_file():
        try:
            return gzip.decompress(gz.read_bytes()), gz
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{gz} is not a valid gzip file ({e}); re-download it or replace it with the "
                f"uncompressed {filename}"
            ) from None
    raise DataError(
        f"{dataset}: {filename} (or {filename}.gz) missing from {directory}; "
        f"put the file there or pass --data-dir pointing at a complete copy"
    )


def _parse_idx(data: bytes, path: pathlib.Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX ``unsigned byte`` file (big-endian header) into a uint8 array."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: {len(data)} bytes, shorter than the {header}-byte IDX header; "
            f"re-download it"
        )
    got_magic, *dims = (int(v) for v in np.frombuffer(data, dtype=">u4", count=1 + ndim))
    if got_magic != magic:
        raise DataError(
            f"{path} is not an IDX file of the expected kind: magic number {got_magic}, "
            f"expected {magic}; check that the file is not swapped or corrupt and re-download it"
        )
    if any(d == 0 for d in dims[1:]):
        raise DataError(f"{path}: invalid IDX dimensions {dims}; re-download it")
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: header dims {dims} need {expected} bytes, file has "
            f"{len(data)} bytes; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(directory: pathlib.Path, split: str) -> ArrayDataset:
    img_name, lbl_name = _IDX_FILES[split]
    img_bytes, img_path = _read_maybe_gz(directory, img_name, "Fashion-MNIST")
    lbl_bytes, lbl_path = _read_maybe_gz(directory, lbl_name, "Fashion-MNIST")
    images = _parse_idx(img_bytes, img_path, _IDX_IMAGES_MAGIC, 3)
    labels = _parse_idx(lbl_bytes, lbl_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} "
            f"labels; the two files do not belong together -- re-download them"
        )
    n_cls = len(FASHION_MNIST_CLASSES)
    if labels.size and int(labels.max()) >= n_cls:
        raise DataError(f"{lbl_path} has label {int(labels.max())}, expected labels 0..{n_cls - 1}")
    mean, std = _STATS["fashion-mnist"]
    return ArrayDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),  # copy: frombuffer is read-only
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
        name="fashion-mnist",
        mean=mean,
        std=std,
        split=split,
    )


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# --------------------------------------------------------------------------------------


def _numpy_attr(*candidates: str) -> Any:
    """The first importable ``module:attr`` among ``candidates`` (numpy 1.x vs 2.x layouts)."""

    for cand in candidates:
        mod, attr = cand.split(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` limited to the latin-1 round trip pickle uses for ``bytes``."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle may reference: numpy array/dtype reconstruction.

    Names are resolved here (not by importing what the pickle asks for), so e.g. the
    deprecated ``numpy.core`` alias written by old pickles never gets imported.
    """
    reconstruct = _numpy_attr("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    frombuffer = _numpy_attr("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # how py3 protocol-2 pickles store bytes
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if reconstruct is not None:
            allowed[(mod, "_reconstruct")] = reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if frombuffer is not None:
            allowed[(mod, "_frombuffer")] = frombuffer  # protocol 5 pickles of arrays
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dicts, lists, bytes, str and numbers."""

    def __init__(self, file: io.BufferedIOBase, path: pathlib.Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._path}: a CIFAR batch file only "
                f"contains numpy arrays and lists; the file is corrupt or malicious -- delete it "
                f"and re-download the official archive"
            ) from None


def _safe_unpickle(path: pathlib.Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means a bad file
        raise DataError(
            f"{path} is not a valid CIFAR pickle ({type(e).__name__}: {e}); re-download it"
        ) from None


def _cifar_batch(path: pathlib.Path, labels_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    obj = _safe_unpickle(path)
    if not isinstance(obj, dict) or b"data" not in obj or labels_key not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path} is not a CIFAR batch: expected a dict with keys b'data' and {labels_key!r}, "
            f"got {keys}; check that you extracted the python version of the archive"
        )
    data, labels = obj[b"data"], obj[labels_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 N×3072 array, got {desc}; re-download it")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {labels_key!r} is not a list of integers; re-download it") from None
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels; re-download it"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path} has labels in [{labels.min()}, {labels.max()}], expected 0..{num_classes - 1}"
        )
    return data, labels


def _cifar_classes(directory: pathlib.Path, name: str) -> list[str]:
    meta_file, names_key, _, num_classes = _CIFAR_META[name]
    path = directory / meta_file
    if not path.is_file():
        if name == "cifar10":
            return list(CIFAR10_CLASSES)
        raise DataError(
            f"CIFAR-100: {meta_file} (class names) missing from {directory}; extract the complete "
            f"archive {_CIFAR_URLS[name]}"
        )
    meta = _safe_unpickle(path)
    names = meta.get(names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(f"{path}: expected {names_key!r} listing {num_classes} class names; re-download it")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar(directory: pathlib.Path, name: str, split: str) -> ArrayDataset:
    _, _, labels_key, num_classes = _CIFAR_META[name]
    files = _CIFAR_FILES[name][split]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise DataError(
            f"{name}: {', '.join(missing)} missing from {directory}; extract the complete archive "
            f"{_CIFAR_URLS[name]} there"
        )
    parts = [_cifar_batch(directory / f, labels_key, num_classes) for f in files]
    data = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    mean, std = _STATS[name]
    return ArrayDataset(
        images=torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32))),
        labels=torch.from_numpy(labels),
        classes=_cifar_classes(directory, name),
        name=name,
        mean=mean,
        std=std,
        split=split,
    )


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


def _split_dir(root: pathlib.Path, split: str) -> pathlib.Path | None:
    candidates = ("train",) if split == "train" else ("test", "val")
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    return None


def _list_images(split_dir: pathlib.Path) -> tuple[list[str], list[tuple[pathlib.Path, str]]]:
    """Sorted class folder names and ``(file, class_name)`` pairs, sorted by class then file."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{split_dir} has no class sub-folders; expected {split_dir}/<class>/*.png|jpg|jpeg"
        )
    samples: list[tuple[pathlib.Path, str]] = []
    for cls in classes:
        files = sorted(
            p for p in (split_dir / cls).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"class folder {split_dir / cls} has no .png/.jpg/.jpeg images; "
                f"add images or remove the folder"
            )
        samples += [(f, cls) for f in files]
    return classes, samples


def _open_image(path: pathlib.Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:  # a header claiming more pixels than Pillow decodes safely
        raise DataError(f"image {path} is too large to decode ({str(e).split(' could be')[0]}); "
                        "remove or shrink the file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None


def _image_modes(samples: list[tuple[pathlib.Path, str]]) -> set[str]:
    """Pillow modes of ``samples``, reading only the file headers."""
    modes = set()
    for path, _ in samples:
        with _open_image(path) as im:
            modes.add(im.mode)
    return modes


def _decode_images(
    samples: list[tuple[pathlib.Path, str]], mode: str, img_size: int | None
) -> np.ndarray:
    """Decode, convert and (optionally) bilinearly resize every image into one uint8 N×H×W×C array."""
    from PIL import Image

    arrays: list[np.ndarray] = []
    first: tuple[pathlib.Path, tuple[int, int]] | None = None
    for path, _ in samples:
        try:
            with _open_image(path) as im:
                im = im.convert(mode)
                if img_size is not None and im.size != (img_size, img_size):
                    im = im.resize((img_size, img_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot decode image {path} ({e}); remove or replace the file") from None
        if first is None:
            first = (path, arr.shape[:2])
        elif arr.shape[:2] != first[1]:
            (h0, w0), (h1, w1) = first[1], arr.shape[:2]
            raise DataError(
                f"images differ in size: {first[0]} is {w0}×{h0} but {path} is {w1}×{h1}; "
                f"pass img_size=... (--img-size) to resize all images at load time"
            )
        arrays.append(arr.reshape(arr.shape[0], arr.shape[1], -1))
    return np.stack(arrays)


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 N×C×H×W images in [0, 1] units (float64 sums, chunked)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-3)  # a constant channel would otherwise divide by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def _load_imagefolder_split(
    root: pathlib.Path, split: str, img_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode one split; labels index the *train* class list so train and test agree on them."""
    listings = {s: _list_images(d) for s in SPLITS if (d := _split_dir(root, s)) is not None}
    if split not in listings:
        want = "train/" if split == "train" else "test/ or val/"
        raise DataError(
            f"ImageFolder: {root} has no {want} folder; expected {root}/{want}<class>/*.png|jpg"
        )
    classes, samples = listings[split]
    if split != "train" and "train" in listings:
        train_classes = listings["train"][0]
        extra = sorted(set(classes) - set(train_classes))
        if extra:
            raise DataError(
                f"ImageFolder: {_split_dir(root, split)} has classes {extra} that "
                f"{root / 'train'} lacks; every test class needs a train folder of the same name"
            )
        classes = train_classes
    # One colour mode for all splits, so train and test have the same number of channels.
    modes = _image_modes([sample for _, split_samples in listings.values() for sample in split_samples])
    mode = "L" if modes <= _GRAYSCALE_MODES else "RGB"
    arr = _decode_images(samples, mode, img_size)
    index = {c: i for i, c in enumerate(classes)}
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([index[c] for _, c in samples], dtype=torch.int64)
    return images, labels, classes


def _load_imagefolder(root: pathlib.Path, split: str, img_size: int | None) -> ArrayDataset:
    images, labels, classes = _load_imagefolder_split(root, split, img_size)
    if split == "train" or _split_dir(root, "train") is None:
        stats_images = images  # no train split: fall back to the split's own statistics
    else:
        stats_images = _load_imagefolder_split(root, "train", img_size)[0]
    mean, std = _channel_stats(stats_images)
    return ArrayDataset(images, labels, classes, "imagefolder", mean, std, split)


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 N×C×H×W images to size×size, once at load time."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    img_size: int | None = None,
) -> ArrayDataset:
    """Load split ``split`` of dataset ``name`` fully into memory.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (``imagefolder`` also accepts a ``val/`` folder as test).
        data_dir: where the files are; ``None`` searches ``$PNNH_DATA``, system dirs and the
            user cache (see :func:`find_data_dir`).
        img_size: resize images to ``img_size``×``img_size`` once at load time (bilinear).
            ``None`` keeps the native size (``imagefolder`` then requires equal sizes).

    Raises:
        ConfigError: unknown ``name``/``split`` or invalid ``img_size``.
        DataError: files missing, truncated, corrupt or unsafe.
    """
    _check_name(name)
    _check_split(split)
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise ConfigError(f"img_size must be a positive integer, got {img_size!r}")
    directory = find_data_dir(name, data_dir)
    if name == "fashion-mnist":
        ds = _load_fashion_mnist(directory, split)
    elif name == "imagefolder":
        return _load_imagefolder(directory, split, img_size)
    else:
        ds = _load_cifar(directory, name, split)
    if img_size is not None and ds.img_hw != (img_size, img_size):
        ds.images = _resize_uint8(ds.images, img_size)
    return ds
