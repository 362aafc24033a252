"""Data sets that need no files: the ones bundled with scikit-learn and a synthetic regression task."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from jaxalgo.data._dataset import Dataset, Task
from jaxalgo.data._split import Standardize, apply_standardiser, fit_standardiser, split_indices, standardizer_axes

# Shape of the synthetic regression task (see :func:`synthetic_regression_arrays`).
SYNTHETIC_NUM_EXAMPLES = 4000
SYNTHETIC_NUM_FEATURES = 16
SYNTHETIC_HIDDEN = 32
SYNTHETIC_NOISE_STD = 0.1
_SYNTHETIC_STREAM = 0x7EAC4E2


def synthetic_regression_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of the synthetic regression task, a pure function of ``seed``.

    A random one-hidden-layer tanh teacher network with additive Gaussian noise:

    .. math::
      x \\sim \\mathcal N(0, I_D), \\qquad
      y = v^\\top \\tanh(W x + b) + \\varepsilon, \\qquad \\varepsilon \\sim \\mathcal N(0, 0.1^2),

    with ``N = 4000`` examples, ``D = 16`` features, ``H = 32`` hidden units,
    ``W_{hd} ~ N(0, 1/D)``, ``b_h ~ N(0, 0.1^2)`` and ``v_h ~ N(0, 1/H)``.

    Returns:
      ``(x, y)``: float64 arrays of shapes ``(N, D)`` and ``(N, 1)``.
    """
    rng = np.random.default_rng([seed, _SYNTHETIC_STREAM])
    n, d, h = SYNTHETIC_NUM_EXAMPLES, SYNTHETIC_NUM_FEATURES, SYNTHETIC_HIDDEN
    w = rng.normal(0.0, 1.0 / np.sqrt(d), size=(d, h))
    b = rng.normal(0.0, 0.1, size=(h,))
    v = rng.normal(0.0, 1.0 / np.sqrt(h), size=(h, 1))
    x = rng.normal(size=(n, d))
    y = np.tanh(x @ w + b) @ v + rng.normal(0.0, SYNTHETIC_NOISE_STD, size=(n, 1))
    return x, y


def _scikit_learn_data_file(filename: str) -> pathlib.Path | None:
    """The path of one of scikit-learn's bundled data files, found without importing scikit-learn (which takes
    longer than loading the file: seconds at every start of the command line), or None where it is not there."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "datasets" / "data" / filename
    return path if path.is_file() else None


# The files of scikit-learn's bundled data sets, in its ``datasets/data`` folder.
_SCIKIT_LEARN_FILES: dict[str, tuple[str, ...]] = {
    "digits": ("digits.csv.gz",),
    "breast_cancer": ("breast_cancer.csv",),
    "diabetes": ("diabetes_data_raw.csv.gz", "diabetes_target.csv.gz"),
}


def _read_bundled_files(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x, y)`` read straight from scikit-learn's data files (the arrays its loaders return), or None where a
    file is missing, so that the loader itself is used."""
    found = [_scikit_learn_data_file(filename) for filename in _SCIKIT_LEARN_FILES[name]]
    paths = [path for path in found if path is not None]
    if len(paths) < len(found):
        return None
    if name == "digits":
        table = np.loadtxt(paths[0], delimiter=",")  # 64 pixel values 0..16, then the digit
        return table[:, :-1].reshape(-1, 8, 8, 1), table[:, -1].astype(int)
    if name == "breast_cancer":
        table = np.loadtxt(paths[0], delimiter=",", skiprows=1)  # header: rows, columns, class names
        return table[:, :-1], table[:, -1].astype(int)
    features, targets = paths
    return np.loadtxt(features), np.loadtxt(targets)[:, None]


def _load_with_scikit_learn(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd  # imported here: scikit-learn is slow to import

    if name == "digits":
        bunch = skd.load_digits()
        return bunch.images[..., None], bunch.target
    if name == "breast_cancer":
        bunch = skd.load_breast_cancer()
        return bunch.data, bunch.target
    bunch = skd.load_diabetes(scaled=False)
    return bunch.data, bunch.target[:, None]


def raw_arrays(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unprocessed ``(x, y)`` of a bundled data set: digits as (N, 8, 8, 1) images with values 0..16,
    tabular features as (N, F), classification labels as integers, regression targets as (N, T).

    The scikit-learn sets are read from the files scikit-learn ships (the same arrays as its ``load_digits``,
    ``load_breast_cancer`` and ``load_diabetes(scaled=False)``, which are used where a file is not found).
    """
    if name == "synthetic_regression":
        return synthetic_regression_arrays(seed)
    if name not in _SCIKIT_LEARN_FILES:
        raise ValueError(f"name: {name!r} is not a bundled data set")
    arrays = _read_bundled_files(name)
    return arrays if arrays is not None else _load_with_scikit_learn(name)


_TASKS: dict[str, tuple[Task, int]] = {
    "digits": ("classification", 10),
    "breast_cancer": ("classification", 2),
    "diabetes": ("regression", 1),
    "synthetic_regression": ("regression", 1),
}
BUNDLED: tuple[str, ...] = tuple(_TASKS)


def load_bundled(name: str, *, seed: int, test_fraction: float, standardize: Standardize = "channel") -> Dataset:
    """Splits a bundled data set and standardises it with statistics of the train split only.

    Inputs are standardised as ``standardize`` says (:data:`jaxalgo.data._split.STANDARDIZE`; ``channel`` is
    per feature for tables and per channel for images); regression targets per target. Classification splits
    are stratified by class.
    """
    task, num_outputs = _TASKS[name]
    x, y = raw_arrays(name, seed)
    classification = task == "classification"
    train_idx, test_idx = split_indices(
        len(x), test_fraction=test_fraction, seed=seed, labels=y if classification else None
    )
    mean, std = fit_standardiser(x[train_idx], standardizer_axes(standardize, x.ndim))
    x_train, x_test = (apply_standardiser(x[i], mean, std) for i in (train_idx, test_idx))
    if classification:
        return Dataset(
            name=name,
            task=task,
            x_train=x_train,
            y_train=y[train_idx].astype(np.int32),
            x_test=x_test,
            y_test=y[test_idx].astype(np.int32),
            num_outputs=num_outputs,
        )
    t_mean, t_std = fit_standardiser(y[train_idx], (0,))
    return Dataset(
        name=name,
        task=task,
        x_train=x_train,
        y_train=apply_standardiser(y[train_idx], t_mean, t_std),
        x_test=x_test,
        y_test=apply_standardiser(y[test_idx], t_mean, t_std),
        num_outputs=num_outputs,
        target_mean=t_mean[0].astype(np.float32),
        target_std=t_std[0].astype(np.float32),
    )
