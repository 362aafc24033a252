"""``load_dataset``: one entry point for every data set, with all arguments checked before any work."""

from __future__ import annotations

import os

from jaxalgo.data import _files
from jaxalgo.data._bundled import BUNDLED, load_bundled
from jaxalgo.data._checks import check_seed
from jaxalgo.data._dataset import Dataset
from jaxalgo.data._split import check_test_fraction, standardise_uint8_images
from jaxalgo.options import import_object

FILE_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10")
DATASETS: tuple[str, ...] = (*BUNDLED, *FILE_DATASETS)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Loads a data set as a standardised train/test :class:`Dataset`.

    Bundled (no files needed, ``data_dir`` is ignored):

    - ``digits``: scikit-learn's 1797 8x8 handwritten digits, x ``(N, 8, 8, 1)``, 10 classes.
    - ``breast_cancer``: scikit-learn's Wisconsin breast cancer set, 569 x 30 features, 2 classes (0/1).
    - ``diabetes``: scikit-learn's diabetes set (unscaled), 442 x 10 features, 1 regression target.
    - ``synthetic_regression``: 4000 x 16 Gaussian inputs, 1 target from a random tanh teacher network
      plus noise, generated from ``seed`` (see ``_bundled.synthetic_regression_arrays``).

    These are split into train and test by ``seed`` and ``test_fraction`` (stratified by class for
    classification); the split is the same for the same arguments.

    From files in ``data_dir`` (never downloaded), with their own official train/test split, so
    ``test_fraction`` is checked but ignored and ``seed`` does not affect them:

    - ``mnist``, ``fashion_mnist``: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
      ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``; x ``(N, 28, 28, 1)``.
    - ``cifar10``: python batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, directly in
      ``data_dir`` or in its ``cifar-10-batches-py`` subfolder; x ``(N, 32, 32, 3)``. Batches are unpickled
      with a loader that accepts numpy arrays and plain containers only.

    Standardisation is fitted on the train split only and applied to both splits: per feature for tables,
    per channel for images, and per target for regression targets, whose train mean and standard deviation
    are kept in ``target_mean`` / ``target_std`` to map predictions back to original units.

    A user's own loader: ``name = "package.module:function"`` calls ``function(seed=seed,
    test_fraction=test_fraction, data_dir=data_dir)``, which returns a :class:`Dataset`.

    Args:
      name: one of :data:`DATASETS`, or ``module:function``.
      data_dir: directory holding the files of ``mnist``, ``fashion_mnist`` or ``cifar10``.
      seed: non-negative int seed of the split (and of the synthetic data).
      test_fraction: fraction of a bundled set held out for testing, in ``(0, 1)``.

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: unknown ``name``, ``test_fraction`` outside ``(0, 1)``, missing ``data_dir``, corrupt files.
      FileNotFoundError: ``data_dir`` or one of its expected files does not exist.
    """
    if isinstance(name, str) and ":" in name:
        return _imported(name, data_dir=data_dir, seed=seed, test_fraction=test_fraction)
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    seed = check_seed(seed)
    test_fraction = check_test_fraction(test_fraction)

    if name in BUNDLED:
        return load_bundled(name, seed=seed, test_fraction=test_fraction)

    if name == "cifar10":
        folder = _files.check_data_dir(data_dir, name, _files.expected_cifar_files())
        train_files, test_file = _files.locate_cifar_files(folder)
        x_train, y_train, x_test, y_test = _files.read_cifar(train_files, test_file)
    else:
        folder = _files.check_data_dir(data_dir, name, _files.expected_idx_files())
        idx_files = _files.locate_idx_files(folder)
        x_train, y_train = _files.read_mnist_split(idx_files, "train")
        x_test, y_test = _files.read_mnist_split(idx_files, "test")
    x_train, x_test = standardise_uint8_images(x_train, x_test)
    return Dataset(
        name=name,
        task="classification",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_outputs=_files.NUM_CLASSES,
    )


def _imported(target: str, **arguments) -> Dataset:
    """The :class:`Dataset` a user's loader ``module:function`` returns."""
    dataset = import_object(target, argument="dataset")(**arguments)
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset: {target!r} returned a {type(dataset).__name__}; expected a jaxalgo.data.Dataset")
    return dataset
