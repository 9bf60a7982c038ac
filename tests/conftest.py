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
