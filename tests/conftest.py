"""Shared test fixtures. The suite runs on 2 CPU cores: keep each test small."""

import os
from pathlib import Path

import pytest
import torch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fmnist_dir() -> Path:
    """The real Fashion-MNIST (Debian package dataset-fashion-mnist), required by the suite."""
    d = Path(os.environ.get("PNNH_DATA", FMNIST_DIR))
    if (d / "fashion-mnist").is_dir():
        d = d / "fashion-mnist"
    if not any(d.glob("train-images-idx3-ubyte*")):
        pytest.fail(f"Fashion-MNIST not found in {d}: run the README's setup (apt-get install dataset-fashion-mnist)")
    return d


def write_idx_subset(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    """Write the first images/labels of a Fashion-MNIST copy as raw IDX files (real data, fast to load)."""
    import gzip

    dst.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, item_bytes in (("images-idx3-ubyte", 28 * 28), ("labels-idx1-ubyte", 1)):
            name = f"{prefix}-{kind}"
            raw = (src / name).read_bytes() if (src / name).exists() else gzip.decompress((src / f"{name}.gz").read_bytes())
            header = bytearray(raw[: 16 if "images" in kind else 8])
            header[4:8] = n.to_bytes(4, "big")  # first dimension: the number of items
            (dst / name).write_bytes(bytes(header) + raw[len(header): len(header) + n * item_bytes])
    return dst


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> Path:
    """The first 1024 training and 256 test images of the real Fashion-MNIST, as a --data-dir."""
    d = Path(os.environ.get("PNNH_DATA", FMNIST_DIR))
    if (d / "fashion-mnist").is_dir():
        d = d / "fashion-mnist"
    if not any(d.glob("train-images-idx3-ubyte*")):
        pytest.fail(f"Fashion-MNIST not found in {d}")
    return write_idx_subset(d, tmp_path_factory.mktemp("fmnist-small"), 1024, 256)


@pytest.fixture
def check_cnn_interface():
    """The uniform CNN interface (timm style) on an eval-mode model: features of ``feat_shape``,
    ``forward_head`` equal to ``forward``, pooled pre-logits, and a working ``reset_classifier``."""

    def check(m, x, feat_shape):
        feats = m.forward_features(x)
        assert feats.shape == feat_shape
        assert torch.equal(m.forward_head(feats), m(x))
        assert m.forward_head(feats, pre_logits=True).shape == feat_shape[:2]
        m.reset_classifier(4)
        assert m(x).shape == (x.shape[0], 4) and m.get_classifier().out_features == 4

    return check
