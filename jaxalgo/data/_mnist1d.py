"""MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package and cached as a verified ``.npz``.

Only the package's generator is used (``mnist1d.data.make_dataset``): it builds the data from ten hand-made
1-D templates with numpy and scipy, and touches neither the network nor any file. Its download path
(``get_dataset(download=True)``) and its pickle cache (written to the working directory) are never called.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from jaxalgo.data._checks import check_int, check_seed

MNIST1D_NUM_CLASSES = 10
MNIST1D_LENGTH = 40
# The paper's standard data set: 5000 examples, the first 80% (4000) for training, generator seed 42.
MNIST1D_NUM_SAMPLES = 5000
MNIST1D_TRAIN_FRACTION = 0.8
MNIST1D_SEED = 42
_CACHE_SUBDIR = "mnist1d"
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")

MNIST1DArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _generator():
    """The ``mnist1d`` package's generator and its default arguments (imported here: it imports matplotlib)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "dataset: 'mnist1d' needs the mnist1d package, a dependency of jaxalgo (pip install mnist1d); "
            "it only generates the data, nothing is downloaded"
        ) from err
    return get_dataset_args, make_dataset


def generator_arguments(*, seed: int, num_samples: int) -> dict[str, Any]:
    """The generator's arguments: the package's defaults (the paper's) with ``seed`` and ``num_samples``.

    The package's download address is dropped: it is never used. ``train_split`` stays the paper's 0.8.
    """
    get_dataset_args, _ = _generator()
    arguments = get_dataset_args(as_dict=True)
    arguments.pop("url", None)
    arguments.update(seed=seed, num_samples=num_samples, train_split=MNIST1D_TRAIN_FRACTION)
    return arguments


def _generate(arguments: dict[str, Any]) -> MNIST1DArrays:
    """Runs the package's generator, restoring the global ``random`` / ``numpy.random`` state it reseeds."""
    get_dataset_args, make_dataset = _generator()
    args = get_dataset_args()  # the package's ObjectView, filled with our arguments
    args.__dict__.update(arguments)
    # the package draws from numpy's legacy global generator, which it reseeds: put the caller's state back
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        generated = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    return (
        np.asarray(generated["x"], dtype=np.float64),
        np.asarray(generated["y"], dtype=np.int32),
        np.asarray(generated["x_test"], dtype=np.float64),
        np.asarray(generated["y_test"], dtype=np.int32),
    )


def _digest(arrays: MNIST1DArrays) -> str:
    """SHA-256 over the arrays' dtypes, shapes and bytes."""
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(f"{array.dtype.str}{array.shape}".encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def _cache_key(arguments: dict[str, Any]) -> str:
    """The cache file's key: a digest of the generator's arguments and the package's version."""
    described = {"arguments": arguments, "mnist1d": metadata.version("mnist1d")}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(data_dir: str | os.PathLike, arguments: dict[str, Any]) -> Path:
    """Where the arrays of ``arguments`` are cached: ``data_dir/mnist1d/mnist1d-<key>.npz``."""
    return Path(data_dir) / _CACHE_SUBDIR / f"mnist1d-{_cache_key(arguments)}.npz"


def _expected_shapes(num_samples: int) -> dict[str, tuple[int, ...]]:
    num_train = int(num_samples * MNIST1D_TRAIN_FRACTION)
    num_test = num_samples - num_train
    return {
        "x_train": (num_train, MNIST1D_LENGTH),
        "y_train": (num_train,),
        "x_test": (num_test, MNIST1D_LENGTH),
        "y_test": (num_test,),
    }


def _read_cache(path: Path, num_samples: int) -> MNIST1DArrays | None:
    """The cached arrays if the file exists and its shapes, dtypes and digest check out; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = tuple(stored[name] for name in _ARRAYS)
            digest = str(stored["digest"])
    except (OSError, KeyError, ValueError):  # unreadable, truncated or not an npz: regenerate
        return None
    shapes = _expected_shapes(num_samples)
    for name, array in zip(_ARRAYS, arrays, strict=True):
        dtype = np.float64 if name.startswith("x") else np.int32
        if array.shape != shapes[name] or array.dtype != dtype:
            return None
    if digest != _digest(arrays):
        return None
    return arrays


def _write_cache(path: Path, arrays: MNIST1DArrays) -> None:
    """Writes the arrays and their digest atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            x_train, y_train, x_test, y_test = arrays
            digest = np.asarray(_digest(arrays))
            np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, digest=digest)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def mnist1d_arrays(
    *,
    seed: int = MNIST1D_SEED,
    num_samples: int = MNIST1D_NUM_SAMPLES,
    cache_dir: str | os.PathLike | None = None,
) -> MNIST1DArrays:
    r"""The raw MNIST-1D arrays, generated offline (the defaults give the paper's standard data set).

    Each example is one of ten 12-point digit templates, padded with 36..60 zeros, stretched, scaled by
    :math:`1 + 0.4(u - 1/2)`, circularly translated by up to 48 points, filled with correlated noise where the
    signal is zero, plus i.i.d. noise :math:`\mathcal N(0, 0.02^2)`, sheared, and resampled to 40 points; then
    the whole set is shifted and scaled to mean 0, standard deviation 1 (over train and test together, as the
    generator does). ``num_samples // 10`` examples per class, shuffled; the first 80% are the train split.

    With ``cache_dir`` the arrays are cached in ``cache_dir/mnist1d/`` under a key of the generator's
    arguments and the package's version; a cached file is used only if its shapes, dtypes and SHA-256 digest
    check out, otherwise it is regenerated.

    Args:
      seed: the generator's seed (42 is the paper's data set).
      num_samples: examples in all, a multiple of 10 that is at least 10 (5000 is the paper's).
      cache_dir: optional directory for the cache (jaxalgo's ``data_dir``); None generates every time.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: float64 ``(N, 40)`` signals and int32 labels in ``0..9``.

    Example:
      >>> x_train, y_train, x_test, y_test = mnist1d_arrays(num_samples=50)
      >>> x_train.shape, x_test.shape, sorted(set(y_train.tolist()) | set(y_test.tolist())) == list(range(10))
      ((40, 40), (10, 40), True)

    References:
      Greydanus, *Scaling down Deep Learning with MNIST-1D*, ICML 2024 (arXiv 2011.14439).
    """
    seed = check_seed(seed)
    num_samples = check_int("num_samples", num_samples, low=MNIST1D_NUM_CLASSES)
    if num_samples % MNIST1D_NUM_CLASSES:
        raise ValueError(f"num_samples: got {num_samples}; must be a multiple of {MNIST1D_NUM_CLASSES}")
    if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
        raise TypeError(f"cache_dir: expected a str, an os.PathLike or None, got {type(cache_dir).__name__}")
    arguments = generator_arguments(seed=seed, num_samples=num_samples)
    if cache_dir is None:
        return _generate(arguments)
    path = cache_path(cache_dir, arguments)
    cached = _read_cache(path, num_samples)
    if cached is not None:
        return cached
    arrays = _generate(arguments)
    _write_cache(path, arrays)
    return arrays
