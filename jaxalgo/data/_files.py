"""Readers for data sets stored in a user's local directory: MNIST-style IDX files and CIFAR-10 batches.

Nothing is ever downloaded. Every file is checked before its contents are used: IDX magic numbers,
dimensions and file length; CIFAR-10 batch keys, array shapes and dtypes; label ranges and counts.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

NUM_CLASSES = 10

# --- MNIST / Fashion-MNIST (IDX) -------------------------------------------------------------------------

IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Magic numbers of the IDX format: two zero bytes, a type byte (0x08 = unsigned byte) and the number of
# dimensions; 2051 = 0x00000803 for (N, rows, cols) images, 2049 = 0x00000801 for (N,) labels.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
MNIST_IMAGE_SIZE = (28, 28)


def check_data_dir(data_dir: str | os.PathLike | None, dataset: str, expected: str) -> Path:
    """Returns ``data_dir`` as a Path after checking that it was given and is an existing directory."""
    if data_dir is None:
        raise ValueError(
            f"data_dir: required for dataset {dataset!r} (nothing is downloaded); pass a directory holding {expected}"
        )
    if not isinstance(data_dir, str | os.PathLike):
        raise TypeError(f"data_dir: expected a str or os.PathLike, got {type(data_dir).__name__}")
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"data_dir: directory {str(path)!r} does not exist; it should hold {expected}")
    if not path.is_dir():
        raise NotADirectoryError(f"data_dir: {str(path)!r} is not a directory; it should hold {expected}")
    return path


def expected_idx_files() -> str:
    names = ", ".join(IDX_FILES.values())
    return f"the IDX files {names} (each plain or gzipped with a .gz suffix)"


def locate_idx_files(data_dir: Path) -> dict[str, Path]:
    """Finds the four IDX files in ``data_dir``, plain or ``.gz`` (plain first); raises naming any missing."""
    found, missing = {}, []
    for role, name in IDX_FILES.items():
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        raise FileNotFoundError(
            f"data_dir: {str(data_dir)!r} lacks the file(s) {', '.join(missing)}; expected {expected_idx_files()}"
        )
    return found


def _read_bytes(path: Path) -> bytes:
    """The file's contents, decompressed if its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a truncated stream raises EOFError
        raise ValueError(f"data_dir: {path.name} is not a valid gzip file ({err})") from err


def read_idx(path: Path, *, magic: int, trailing_dims: tuple[int, ...]) -> np.ndarray:
    """Reads an unsigned-byte IDX file and checks its magic number, dimensions and length.

    Args:
      path: the file (``.gz`` is decompressed).
      magic: the expected magic number (2051 for image files, 2049 for label files).
      trailing_dims: the expected dimensions after the leading count, e.g. ``(28, 28)`` or ``()``.

    Returns:
      A uint8 array of shape ``(N, *trailing_dims)``.
    """
    data = _read_bytes(path)
    ndim = 1 + len(trailing_dims)
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise ValueError(f"data_dir: {path.name} has {len(data)} bytes, too short for an IDX header")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise ValueError(
            f"data_dir: {path.name} has IDX magic number {found_magic:#010x}; expected {magic:#010x} "
            f"(unsigned bytes, {ndim} dimension(s)). Is it a {'n image' if ndim > 1 else ' label'} IDX file?"
        )
    if len(data) < header_len:
        raise ValueError(f"data_dir: {path.name} is truncated inside its IDX header ({len(data)} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != trailing_dims:
        raise ValueError(
            f"data_dir: {path.name} has dimensions {dims}; expected (N, {', '.join(map(str, trailing_dims))})"
            if trailing_dims
            else f"data_dir: {path.name} has dimensions {dims}; expected (N,)"
        )
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise ValueError(
            f"data_dir: {path.name} has {len(data)} bytes but its header {dims} implies {expected_len}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def check_labels(labels: np.ndarray, source: str, num_examples: int) -> np.ndarray:
    """Checks that labels lie in ``[0, 10)`` and match the number of images; returns them as int32."""
    if len(labels) != num_examples:
        raise ValueError(
            f"data_dir: {source} holds {len(labels)} labels but its images number {num_examples}; they must be equal"
        )
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"data_dir: {source} has labels in [{labels.min()}, {labels.max()}]; allowed are 0..{NUM_CLASSES - 1}"
        )
    return labels.astype(np.int32)


def read_mnist_split(files: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(N, 28, 28, 1)`` and int32 labels ``(N,)`` of the ``"train"`` or ``"test"`` split."""
    images = read_idx(files[f"{split}_images"], magic=_IDX_IMAGES_MAGIC, trailing_dims=MNIST_IMAGE_SIZE)
    labels = read_idx(files[f"{split}_labels"], magic=_IDX_LABELS_MAGIC, trailing_dims=())
    source = f"{files[f'{split}_labels'].name} (with {files[f'{split}_images'].name})"
    return images[..., None], check_labels(labels, source, len(images))


# --- CIFAR-10 (python batches) ---------------------------------------------------------------------------

CIFAR_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_PIXELS = 3 * 32 * 32


def expected_cifar_files() -> str:
    return (
        f"the CIFAR-10 python batches {', '.join(CIFAR_TRAIN_FILES)}, {CIFAR_TEST_FILE} "
        f"(directly or in a {CIFAR_SUBDIR} subfolder)"
    )


def locate_cifar_files(data_dir: Path) -> tuple[list[Path], Path]:
    """Finds the CIFAR-10 batches in ``data_dir`` or its ``cifar-10-batches-py`` subfolder."""
    names = (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)
    candidates = [data_dir, data_dir / CIFAR_SUBDIR]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return [folder / n for n in CIFAR_TRAIN_FILES], folder / CIFAR_TEST_FILE
    # Report what is missing from whichever folder holds more of the files.
    best = max(candidates, key=lambda f: sum((f / n).is_file() for n in names))
    missing = [n for n in names if not (best / n).is_file()]
    raise FileNotFoundError(
        f"data_dir: {str(best)!r} lacks the file(s) {', '.join(missing)}; expected {expected_cifar_files()}"
    )


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a batch file cannot run arbitrary code."""

    _ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        # Protocol-2 pickles written by Python 3 rebuild byte strings with _codecs.encode.
        ("_codecs", "encode"): ("_codecs", "encode"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        try:
            module_obj = importlib.import_module(target[0])
        except ImportError:  # numpy < 2 names its private core package ``numpy.core``
            module_obj = importlib.import_module(target[0].replace("numpy._core", "numpy.core"))
        return getattr(module_obj, target[1])


def _get(batch: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch: uint8 images ``(N, 32, 32, 3)`` (NHWC) and int32 labels ``(N,)``.

    The file is a pickled dict with ``b"data"``, a uint8 array ``(N, 3072)`` whose rows are the red, green and
    blue 32x32 planes in row-major order (CHW), and ``b"labels"``, N integers in ``[0, 10)``.
    """
    try:
        with path.open("rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:  # any failure to unpickle means a corrupt or foreign file
        raise ValueError(f"data_dir: {path.name} is not a readable CIFAR-10 batch ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"data_dir: {path.name} holds a {type(batch).__name__}; expected a dict")
    try:
        data, labels = _get(batch, "data"), _get(batch, "labels")
    except KeyError as err:
        raise ValueError(
            f"data_dir: {path.name} lacks the key b{err.args[0]!r}; expected keys b'data' and b'labels', "
            f"found {sorted(map(repr, batch))}"
        ) from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"data_dir: {path.name} has b'data' as {desc}; expected a uint8 array (N, {_CIFAR_PIXELS})")
    try:
        labels = np.asarray(labels)
    except Exception as err:
        raise ValueError(f"data_dir: {path.name} has unreadable b'labels' ({err})") from err
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"data_dir: {path.name} has b'labels' of dtype {labels.dtype} and shape {labels.shape}; expected N integers"
        )
    labels = check_labels(labels, path.name, len(data))
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar(train_files: list[Path], test_file: Path) -> tuple[np.ndarray, ...]:
    """uint8 NHWC train images, int32 train labels, test images and test labels of CIFAR-10."""
    train = [read_cifar_batch(p) for p in train_files]
    x_test, y_test = read_cifar_batch(test_file)
    return (
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        x_test,
        y_test,
    )
