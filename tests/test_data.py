"""Tests of jaxalgo.data: loading, splitting, standardisation, local-file readers and batch iteration."""

from __future__ import annotations

import collections
import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import datasets as skd

from jaxalgo import data
from jaxalgo.data import _bundled
from jaxalgo.data._split import split_indices

BUNDLED = ("digits", "breast_cancer", "diabetes", "synthetic_regression")
EXPECTED = {  # name: (task, total examples, input shape, num_outputs)
    "digits": ("classification", 1797, (8, 8, 1), 10),
    "breast_cancer": ("classification", 569, (30,), 2),
    "diabetes": ("regression", 442, (10,), 1),
    "synthetic_regression": ("regression", 4000, (16,), 1),
}


def test_public_names():
    assert data.DATASETS == (
        "digits",
        "breast_cancer",
        "diabetes",
        "synthetic_regression",
        "mnist1d",
        "mnist",
        "fashion_mnist",
        "cifar10",
    )
    assert set(data.__all__) >= {
        "Dataset",
        "DATASETS",
        "load_dataset",
        "steps_per_epoch",
        "iterate_batches",
        "epoch_permutation",
        "validate_batch_size",
    }


# --- bundled data sets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_shapes_dtypes(name):
    task, total, input_shape, num_outputs = EXPECTED[name]
    ds = data.load_dataset(name, seed=3, test_fraction=0.25)
    assert (ds.name, ds.task, ds.num_outputs, ds.input_shape) == (name, task, num_outputs, input_shape)
    assert ds.num_train + ds.num_test == total
    assert abs(ds.num_test - 0.25 * total) <= len(np.unique(ds.y_train)) if task == "classification" else True
    assert ds.x_train.shape == (ds.num_train, *input_shape) and ds.x_test.shape == (ds.num_test, *input_shape)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    if task == "classification":
        assert ds.y_train.dtype == np.int32 and ds.y_train.shape == (ds.num_train,)
        assert ds.y_test.dtype == np.int32 and ds.y_test.shape == (ds.num_test,)
        assert set(np.unique(ds.y_train)) == set(range(num_outputs)) == set(np.unique(ds.y_test))
        assert ds.target_mean is None and ds.target_std is None
    else:
        assert ds.y_train.dtype == np.float32 and ds.y_train.shape == (ds.num_train, 1)
        assert ds.y_test.dtype == np.float32 and ds.y_test.shape == (ds.num_test, 1)
        assert ds.target_mean.shape == (1,) and ds.target_std.shape == (1,)
    assert all(np.isfinite(a).all() for a in (ds.x_train, ds.x_test, ds.y_train, ds.y_test))
    assert name in repr(ds) and "num_train" in repr(ds)


def test_split_indices_disjoint_cover_stratified():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = split_indices(100, test_fraction=0.2, seed=7, labels=labels)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    np.testing.assert_array_equal(np.bincount(labels[test]), [10, 6, 4])  # class proportions kept
    train2, test2 = split_indices(100, test_fraction=0.2, seed=7, labels=labels)
    np.testing.assert_array_equal(test, test2)
    np.testing.assert_array_equal(train, train2)
    _, test3 = split_indices(100, test_fraction=0.2, seed=8, labels=labels)
    assert not np.array_equal(test, test3)
    _, test4 = split_indices(100, test_fraction=0.3, seed=7)
    assert len(test4) == 30


@pytest.mark.parametrize("name", ["breast_cancer", "synthetic_regression"])
def test_split_reproducible_and_disjoint(name):
    a = data.load_dataset(name, seed=5)
    b = data.load_dataset(name, seed=5)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = data.load_dataset(name, seed=6)
    assert not np.array_equal(a.y_test, c.y_test)
    # Disjoint: no test row equals a train row (rows of these sets are distinct).
    train_rows = {row.tobytes() for row in a.x_train}
    assert not any(row.tobytes() in train_rows for row in a.x_test)
    assert len(train_rows) == a.num_train


def _raw(name, seed):
    if name == "digits":
        bunch = skd.load_digits()
        return bunch.images[..., None], bunch.target
    if name == "breast_cancer":
        bunch = skd.load_breast_cancer()
        return bunch.data, bunch.target
    bunch = skd.load_diabetes(scaled=False)
    return bunch.data, bunch.target[:, None]


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes"])
def test_bundled_files_read_as_scikit_learn_loads_them_and_its_loader_is_the_fallback(name, monkeypatch):
    """The arrays read from scikit-learn's data files are its loaders' arrays, value for value and in dtype; with
    the files not found, the loader itself gives them."""
    expected = _raw(name, 0)
    for x, y in (_bundled.raw_arrays(name, 0), _bundled._read_bundled_files(name)):
        for got, want in ((x, expected[0]), (y, expected[1])):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(_bundled, "_scikit_learn_data_file", lambda filename: None)
    assert _bundled._read_bundled_files(name) is None
    for got, want in zip(_bundled.raw_arrays(name, 0), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_loading_a_bundled_set_does_not_import_scikit_learn():
    """Importing scikit-learn costs seconds at every start of ``jaxalgo train``; the files are read without it."""
    script = (
        "import sys\n"
        "from jaxalgo import data\n"
        "for name in ('digits', 'breast_cancer', 'diabetes'):\n"
        "    data.load_dataset(name, seed=0)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes"])
def test_standardisation_uses_train_split_only(name):
    seed, frac = 2, 0.3
    ds = data.load_dataset(name, seed=seed, test_fraction=frac)
    x, y = _raw(name, seed)
    classification = ds.task == "classification"
    train, test = split_indices(len(x), test_fraction=frac, seed=seed, labels=y if classification else None)
    axes = tuple(range(x.ndim - 1))
    # Train split: mean 0, std 1 per feature (per channel for images).
    np.testing.assert_allclose(ds.x_train.mean(axis=axes), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=axes), 1.0, atol=1e-4)
    # Test split: transformed with the train statistics (an independent recomputation from the raw data).
    mean, std = x[train].mean(axis=axes), x[train].std(axis=axes)
    np.testing.assert_allclose(ds.x_test, (x[test] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_train, (x[train] - mean) / std, rtol=1e-5, atol=1e-5)
    # ... which is not what standardising the test split on its own would give.
    assert np.abs(ds.x_test.mean(axis=axes)).max() > 1e-5
    if classification:
        np.testing.assert_array_equal(ds.y_test, y[test])
    else:
        np.testing.assert_allclose(ds.target_mean, y[train].mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(ds.target_std, y[train].std(axis=0), rtol=1e-6)
        np.testing.assert_allclose(ds.y_train.mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(ds.y_train.std(), 1.0, atol=1e-5)


def test_regression_target_round_trip_and_mae():
    ds = data.load_dataset("diabetes", seed=1)
    raw = skd.load_diabetes().target
    original = lambda y: y * ds.target_std + ds.target_mean
    recovered = np.concatenate([original(ds.y_train), original(ds.y_test)])[:, 0]
    # The splits partition the data set, and mapping back recovers the original targets.
    np.testing.assert_allclose(np.sort(recovered), np.sort(raw), atol=1e-3)
    # MAE of a prediction, in original units, equals the standardised MAE times target_std.
    rng = np.random.default_rng(0)
    pred = rng.normal(size=ds.y_test.shape).astype(np.float32)
    mae_original = np.abs(original(pred) - original(ds.y_test)).mean()
    np.testing.assert_allclose(mae_original, np.abs(pred - ds.y_test).mean() * ds.target_std[0], rtol=1e-5)
    assert 30 < mae_original < 200  # diabetes targets range 25..346


def test_synthetic_regression_is_a_function_of_seed():
    a = data.load_dataset("synthetic_regression", seed=0)
    b = data.load_dataset("synthetic_regression", seed=0)
    c = data.load_dataset("synthetic_regression", seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.allclose(a.target_mean, c.target_mean)
    # Learnable: the target depends on the inputs (a least-squares fit explains part of its variance).
    coef, *_ = np.linalg.lstsq(a.x_train, a.y_train, rcond=None)
    assert 0.1 < 1 - np.mean((a.x_train @ coef - a.y_train) ** 2) < 0.99


# --- MNIST / Fashion-MNIST IDX files ---------------------------------------------------------------------

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """Independent IDX writer: magic 0x0000 08 ndim, big-endian int32 dims, then the raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_arrays(seed=0, n_train=12, n_test=5):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def _write_mnist(folder: Path, arrays, *, gz=False, override=None):
    folder.mkdir(parents=True, exist_ok=True)
    for role, name in IDX_NAMES.items():
        raw = (override or {}).get(role, _idx_bytes(arrays[role]))
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_reader_round_trip(tmp_path, gz, name):
    arrays = _mnist_arrays()
    _write_mnist(tmp_path, arrays, gz=gz)
    ds = data.load_dataset(name, data_dir=tmp_path, test_fraction=0.5)  # test_fraction is ignored
    assert (ds.task, ds.num_outputs, ds.input_shape) == ("classification", 10, (28, 28, 1))
    assert (ds.num_train, ds.num_test) == (12, 5)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    raw_train = arrays["train_images"].astype(np.float64)
    mean, std = raw_train.mean(), raw_train.std()  # one channel: statistics of the train split
    np.testing.assert_allclose(ds.x_train[..., 0] * std + mean, arrays["train_images"], atol=1e-3)
    np.testing.assert_allclose(ds.x_test[..., 0] * std + mean, arrays["test_images"], atol=1e-3)


def _corrupt_cases(arrays):
    good_images = _idx_bytes(arrays["train_images"])
    good_labels = _idx_bytes(arrays["train_labels"])
    bad_labels = arrays["train_labels"].copy()
    bad_labels[3] = 10
    return {
        "bad_magic_images": ({"train_images": b"\x00\x00\x08\x01" + good_images[4:]}, "magic"),
        "labels_as_images": ({"train_images": good_labels}, "magic"),
        "truncated_images": ({"train_images": good_images[:-7]}, "truncated"),
        "too_long_labels": ({"train_labels": good_labels + b"\x00"}, "bytes"),
        "short_header": ({"test_labels": b"\x00\x00"}, "too short"),
        "wrong_dims": ({"train_images": _idx_bytes(arrays["train_images"][:, :27])}, "dimensions"),
        "label_out_of_range": ({"train_labels": _idx_bytes(bad_labels)}, "0..9"),
        "count_mismatch": ({"train_labels": _idx_bytes(arrays["train_labels"][:-1])}, "must be equal"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "bad_magic_images",
        "labels_as_images",
        "truncated_images",
        "too_long_labels",
        "short_header",
        "wrong_dims",
        "label_out_of_range",
        "count_mismatch",
    ],
)
def test_mnist_reader_rejects_corrupt_files(tmp_path, case):
    arrays = _mnist_arrays()
    override, fragment = _corrupt_cases(arrays)[case]
    _write_mnist(tmp_path, arrays, override=override)
    with pytest.raises(ValueError, match="data_dir") as info:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert fragment in str(info.value)
    assert any(IDX_NAMES[role] in str(info.value) for role in override)


def test_mnist_reader_rejects_bad_gzip_and_missing_files(tmp_path):
    arrays = _mnist_arrays()
    _write_mnist(tmp_path, arrays, gz=True)
    good = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"data_dir: t10k-images-idx3-ubyte\.gz is not a valid gzip"):
        data.load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        data.load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="data_dir") as info:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert "train-labels-idx1-ubyte" in str(info.value) and "t10k-images-idx3-ubyte" in str(info.value)
    assert "t10k-labels-idx1-ubyte[" not in str(info.value)  # present files are not reported missing


# --- CIFAR-10 python batches -----------------------------------------------------------------------------

CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_batches(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return {
        name: {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(n + (name == "test_batch"), 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n + (name == "test_batch"))],
        }
        for name in CIFAR_NAMES
    }


def _write_cifar(folder: Path, batches, protocol=pickle.DEFAULT_PROTOCOL, old_numpy_names=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        payload = pickle.dumps(batch, protocol=protocol)
        if old_numpy_names:  # as in files written with numpy < 2, such as the official CIFAR-10 batches
            assert protocol == 2 and b"numpy._core.multiarray" in payload
            payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(payload)


@pytest.mark.parametrize("layout", ["direct", "subfolder"])
def test_cifar_reader_round_trip(tmp_path, layout):
    batches = _cifar_batches()
    folder = tmp_path / "cifar-10-batches-py" if layout == "subfolder" else tmp_path
    if layout == "direct":
        _write_cifar(folder, batches, protocol=2, old_numpy_names=True)
    else:
        _write_cifar(folder, batches, protocol=5)
    ds = data.load_dataset("cifar10", data_dir=tmp_path)
    assert (ds.task, ds.num_outputs, ds.input_shape, ds.num_train, ds.num_test) == (
        "classification",
        10,
        (32, 32, 3),
        15,
        4,
    )
    train_data = np.concatenate([batches[n][b"data"] for n in CIFAR_NAMES[:5]])
    np.testing.assert_array_equal(ds.y_train, [v for n in CIFAR_NAMES[:5] for v in batches[n][b"labels"]])
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    # Per-channel statistics of the train split: channel c is the slice [c*1024, (c+1)*1024) of a row.
    planes = train_data.reshape(-1, 3, 1024).astype(np.float64)
    mean, std = planes.mean(axis=(0, 2)), planes.std(axis=(0, 2))
    np.testing.assert_allclose(ds.x_train.reshape(-1, 3).mean(axis=0), 0.0, atol=1e-5)
    # Pixel (h, w) of channel c is byte c*1024 + h*32 + w of the row (CHW order); x is NHWC.
    rng = np.random.default_rng(1)
    for n, h, w, c in zip(*(rng.integers(0, k, size=50) for k in (15, 32, 32, 3)), strict=True):
        expected = (train_data[n, c * 1024 + h * 32 + w] - mean[c]) / std[c]
        np.testing.assert_allclose(ds.x_train[n, h, w, c], expected, rtol=1e-5, atol=1e-5)
    test_row = batches["test_batch"][b"data"][2]
    np.testing.assert_allclose(ds.x_test[2, 5, 7, 2], (test_row[2048 + 5 * 32 + 7] - mean[2]) / std[2], atol=1e-5)


def test_cifar_reader_rejects_corrupt_batches(tmp_path):
    batches = _cifar_batches()
    _write_cifar(tmp_path, batches)
    good = (tmp_path / "data_batch_2").read_bytes()

    def check(payload: bytes, fragment: str):
        (tmp_path / "data_batch_2").write_bytes(payload)
        with pytest.raises(ValueError, match="data_dir: data_batch_2") as info:
            data.load_dataset("cifar10", data_dir=tmp_path)
        assert fragment in str(info.value)

    check(b"garbage, not a pickle", "not a readable CIFAR-10 batch")
    check(good[: len(good) // 2], "not a readable CIFAR-10 batch")
    check(pickle.dumps([1, 2, 3]), "expected a dict")
    check(pickle.dumps({b"data": batches["data_batch_2"][b"data"]}), "labels")
    check(pickle.dumps({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}), "(N, 3072)")
    check(pickle.dumps({b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 1, 2]}), "uint8")
    check(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 12]}), "0..9")
    check(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}), "must be equal")
    # Pickles that would construct anything but numpy arrays are refused, not executed.
    check(pickle.dumps(collections.OrderedDict(a=1)), "only numpy arrays are allowed")


def test_cifar_reader_names_missing_files(tmp_path):
    batches = _cifar_batches()
    del batches["data_batch_4"]
    _write_cifar(tmp_path / "cifar-10-batches-py", batches)
    with pytest.raises(FileNotFoundError, match="data_dir") as info:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert "lacks the file(s) data_batch_4;" in str(info.value)  # only the missing file is named as missing


# --- bad arguments ---------------------------------------------------------------------------------------


def test_load_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"name: unknown dataset 'imagenet'.*digits.*cifar10"):
        data.load_dataset("imagenet")
    for name, expected_file in [("mnist", "train-images-idx3-ubyte"), ("cifar10", "data_batch_1")]:
        with pytest.raises(ValueError, match="data_dir: required") as info:
            data.load_dataset(name)
        assert expected_file in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"data_dir: directory .*does not exist"):
        data.load_dataset("mnist", data_dir=tmp_path / "nowhere")
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"data_dir: .*not a directory"):
        data.load_dataset("cifar10", data_dir=tmp_path / "a_file")
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"test_fraction: got {bad}.*\(0, 1\)"):
            data.load_dataset("digits", test_fraction=bad)
    # Checked before any work, even for sets that ignore it (nothing is read from the missing directory).
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_dataset("mnist", data_dir=tmp_path / "nowhere", test_fraction=2.0)
    with pytest.raises(TypeError, match="test_fraction"):
        data.load_dataset("digits", test_fraction="0.2")
    with pytest.raises(ValueError, match=r"test_fraction: 0\.001 leaves the test split"):
        data.load_dataset("breast_cancer", test_fraction=0.001)
    with pytest.raises(ValueError, match=r"seed: got -1; allowed range is \[0, "):
        data.load_dataset("digits", seed=-1)


def test_batch_size_validation():
    data.validate_batch_size(1, 10)
    data.validate_batch_size(10, 10)
    for bad in (0, -3, 11):
        with pytest.raises(ValueError, match=rf"batch_size: got {bad}; allowed range is \[1, 10\]"):
            data.validate_batch_size(bad, 10)
    with pytest.raises(TypeError, match="batch_size"):
        data.validate_batch_size(2.0, 10)
    ds = data.load_dataset("breast_cancer")
    with pytest.raises(ValueError, match=rf"batch_size: got {ds.num_train + 1}"):
        data.iterate_batches(ds, ds.num_train + 1, seed=0, epoch=0)  # raised on the call, not on next()
    with pytest.raises(ValueError, match="start_step: got 46"):
        data.iterate_batches(ds, 10, seed=0, epoch=0, start_step=46)
    with pytest.raises(ValueError, match="epoch: got -1"):
        data.iterate_batches(ds, 10, seed=0, epoch=-1)


def test_dataset_rejects_inconsistent_arrays():
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="task"):
        data.Dataset("t", "ranking", x, y, x, y, 2)
    with pytest.raises(ValueError, match="y_test: has 3 rows"):
        data.Dataset("t", "classification", x, y, x, y[:3], 2)
    with pytest.raises(ValueError, match=r"y_train: for regression expected shape \(N, 1\)"):
        data.Dataset("t", "regression", x, y.astype(np.float32), x, y, 1)
    with pytest.raises(ValueError, match="x_test: input shape"):
        data.Dataset("t", "classification", x, y, x[:, :2], y, 2)


# --- batches ---------------------------------------------------------------------------------------------


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 32) == 3
    assert data.steps_per_epoch(96, 32) == 3
    assert data.steps_per_epoch(10, 11) == 0
    with pytest.raises(ValueError, match="batch_size"):
        data.steps_per_epoch(10, 0)


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    p = data.epoch_permutation(50, seed=4, epoch=3)
    np.testing.assert_array_equal(np.sort(p), np.arange(50))
    np.testing.assert_array_equal(p, data.epoch_permutation(50, seed=4, epoch=3))  # no hidden state
    assert not np.array_equal(p, data.epoch_permutation(50, seed=4, epoch=2))
    assert not np.array_equal(p, data.epoch_permutation(50, seed=5, epoch=3))


def test_iterate_batches():
    ds = data.load_dataset("breast_cancer", seed=0)  # 456 training examples
    bs = 32
    steps = data.steps_per_epoch(ds.num_train, bs)
    batches = list(data.iterate_batches(ds, bs, seed=9, epoch=2))
    assert len(batches) == steps == 14
    idx = np.concatenate([b["idx"] for b in batches])
    assert len(np.unique(idx)) == len(idx) == steps * bs  # each index at most once; remainder dropped
    assert idx.min() >= 0 and idx.max() < ds.num_train
    for b in batches:
        assert b["idx"].dtype == np.int32 and b["x"].shape == (bs, 30) and b["y"].shape == (bs,)
        np.testing.assert_array_equal(b["x"], ds.x_train[b["idx"]])
        np.testing.assert_array_equal(b["y"], ds.y_train[b["idx"]])
    # Deterministic per (seed, epoch), different across epochs.
    again = np.concatenate([b["idx"] for b in data.iterate_batches(ds, bs, seed=9, epoch=2)])
    np.testing.assert_array_equal(idx, again)
    other = np.concatenate([b["idx"] for b in data.iterate_batches(ds, bs, seed=9, epoch=3)])
    assert not np.array_equal(idx, other)
    # Resuming at start_step yields exactly the tail of the uninterrupted stream.
    for start in (0, 5, steps - 1, steps):
        tail = list(data.iterate_batches(ds, bs, seed=9, epoch=2, start_step=start))
        assert len(tail) == steps - start
        for got, want in zip(tail, batches[start:], strict=True):
            for key in ("x", "y", "idx"):
                np.testing.assert_array_equal(got[key], want[key])


def test_iterate_batches_regression_rows():
    ds = data.load_dataset("diabetes", seed=0)
    (first,) = list(data.iterate_batches(ds, ds.num_train, seed=0, epoch=0))
    np.testing.assert_array_equal(np.sort(first["idx"]), np.arange(ds.num_train))
    np.testing.assert_array_equal(first["y"], ds.y_train[first["idx"]])
    assert first["y"].shape == (ds.num_train, 1)
