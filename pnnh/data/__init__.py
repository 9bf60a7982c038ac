"""In-memory datasets and loaders.

``load_dataset`` decodes Fashion-MNIST (IDX), CIFAR-10/100 (python pickles, read with a
restricted unpickler) or an image-folder tree once into an :class:`ArrayDataset` of uint8
tensors; :class:`InMemoryLoader` then yields shuffled, augmented, normalised float batches
from it with whole-batch tensor ops, deterministically and DDP-sharded.
"""

from pnnh.data.datasets import DATASETS, SPLITS, ArrayDataset, find_data_dir, load_dataset
from pnnh.data.loader import InMemoryLoader, default_pad, random_crop_flip

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "SPLITS",
    "InMemoryLoader",
    "default_pad",
    "find_data_dir",
    "load_dataset",
    "random_crop_flip",
]
