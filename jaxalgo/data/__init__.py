"""Data sets as in-memory numpy arrays and reproducible, resumable mini-batch iteration.

Bundled sets (scikit-learn's digits, breast cancer and diabetes, and a synthetic regression task) need no
files; MNIST, Fashion-MNIST and CIFAR-10 are read from a user's local directory and never downloaded.
"""

from jaxalgo.data._batches import epoch_permutation, iterate_batches, steps_per_epoch, validate_batch_size
from jaxalgo.data._dataset import Dataset
from jaxalgo.data._load import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "Dataset",
    "epoch_permutation",
    "iterate_batches",
    "load_dataset",
    "steps_per_epoch",
    "validate_batch_size",
]
