"""Data sets as in-memory numpy arrays and reproducible, resumable mini-batch iteration.

Bundled sets (scikit-learn's digits, breast cancer and diabetes, and a synthetic regression task) need no
files; MNIST-1D is generated offline (:func:`mnist1d_arrays`); MNIST, Fashion-MNIST and CIFAR-10 are read from a
user's local directory and never downloaded. Inputs are standardised with the train split's statistics, in one of
the ways of :data:`STANDARDIZE`.
"""

from jaxalgo.data._batches import epoch_permutation, iterate_batches, steps_per_epoch, validate_batch_size
from jaxalgo.data._dataset import Dataset
from jaxalgo.data._load import DATASETS, load_dataset
from jaxalgo.data._mnist1d import mnist1d_arrays
from jaxalgo.data._split import STANDARDIZE

__all__ = [
    "DATASETS",
    "STANDARDIZE",
    "Dataset",
    "epoch_permutation",
    "iterate_batches",
    "load_dataset",
    "mnist1d_arrays",
    "steps_per_epoch",
    "validate_batch_size",
]
