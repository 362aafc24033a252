"""MNIST-1D, generated offline and cached; and the ``standardize`` setting (per channel, per feature, global)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import typing

import numpy as np
import pytest
from sklearn import datasets as skd

from jaxalgo import cli, data
from jaxalgo.checkpoint import CheckpointMismatchError
from jaxalgo.config import RunConfig
from jaxalgo.data import _mnist1d
from jaxalgo.data._split import split_indices, standardise_uint8_images, uint8_channel_stats, uint8_feature_stats
from jaxalgo.train import setup, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh process with an empty cache: every attempt to open a network connection is recorded and
# refused, then the standard data set is loaded (generated and cached) and summarised.
_OFFLINE_SCRIPT = """
import json, socket, sys
attempts = []
class NoNetwork(socket.socket):
    def connect(self, address):
        attempts.append(repr(address))
        raise OSError("network disabled by the test")
    def connect_ex(self, address):
        attempts.append(repr(address))
        return 1
socket.socket = NoNetwork
socket.create_connection = lambda address, *a, **k: (attempts.append(repr(address)), NoNetwork().connect(address))
from jaxalgo import data
ds = data.load_dataset("mnist1d", data_dir=sys.argv[1])
print(json.dumps({"attempts": attempts, "shape": list(ds.x_train.shape), "num_test": ds.num_test}))
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def offline_load(tmp_path_factory):
    """Generates the standard set once, in a subprocess without network (``unshare -n`` where permitted, and
    ``socket`` patched to refuse connections in every case), into an empty cache directory."""
    cache = tmp_path_factory.mktemp("mnist1d_cache")
    isolated = _unshare_works()
    command = [sys.executable, "-c", _OFFLINE_SCRIPT, str(cache)]
    if isolated:
        command = ["unshare", "-n", *command]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cache)
    return done, cache, isolated


@pytest.fixture(scope="module")
def mnist1d(offline_load):
    _, cache, _ = offline_load
    return data.load_dataset("mnist1d", data_dir=cache)


def test_loading_is_offline_and_writes_only_the_cache(offline_load):
    done, cache, _ = offline_load
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert report["shape"] == [4000, 40, 1] and report["num_test"] == 1000
    # the only file written (the working directory was the cache too) is the verified npz under mnist1d/
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert len(written) == 1 and written[0].startswith("mnist1d/mnist1d-") and written[0].endswith(".npz")


def test_loading_under_unshare_n(offline_load):
    done, _, isolated = offline_load
    if not isolated:
        pytest.skip("unshare -n is not permitted here; offline loading is checked with socket patched only")
    assert done.returncode == 0, done.stderr[-2000:]


def test_standard_split_shapes_dtypes_and_labels(mnist1d):
    assert data.DATASETS.count("mnist1d") == 1
    assert (mnist1d.task, mnist1d.num_outputs, mnist1d.input_shape) == ("classification", 10, (40, 1))
    assert (mnist1d.num_train, mnist1d.num_test) == (4000, 1000)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.x_test.dtype == np.float32
    assert mnist1d.y_train.dtype == np.int32 and mnist1d.y_test.dtype == np.int32
    assert np.all(np.isfinite(mnist1d.x_train)) and np.all(np.isfinite(mnist1d.x_test))


def test_class_balance(mnist1d):
    # the generator makes exactly num_samples / 10 = 500 examples per class, then shuffles before the split
    both = np.concatenate([mnist1d.y_train, mnist1d.y_test])
    np.testing.assert_array_equal(np.bincount(both, minlength=10), np.full(10, 500))
    train_counts = np.bincount(mnist1d.y_train, minlength=10)
    assert train_counts.min() >= 350 and train_counts.max() <= 450


def test_default_standardisation_is_one_global_pair_fitted_on_train(mnist1d, offline_load):
    x_train, _, x_test, _ = _mnist1d.mnist1d_arrays(cache_dir=offline_load[1])
    mean, std = x_train.mean(), x_train.std()
    np.testing.assert_allclose(mnist1d.x_train[..., 0], (x_train - mean) / std, atol=1e-5)
    np.testing.assert_allclose(mnist1d.x_test[..., 0], (x_test - mean) / std, atol=1e-5)
    # the generator itself scales the whole set (train and test) to mean 0, std 1
    both = np.concatenate([x_train, x_test])
    assert abs(both.mean()) < 1e-10 and abs(both.std() - 1.0) < 1e-10


def test_cache_is_used_verified_and_rebuilt(tmp_path, monkeypatch):
    first = _mnist1d.mnist1d_arrays(num_samples=60, seed=5, cache_dir=tmp_path)
    (path,) = (tmp_path / "mnist1d").iterdir()
    real_generate, calls = _mnist1d._generate, []

    def counting(arguments):
        calls.append(arguments)
        return real_generate(arguments)

    monkeypatch.setattr(_mnist1d, "_generate", counting)
    for array, again in zip(first, _mnist1d.mnist1d_arrays(num_samples=60, seed=5, cache_dir=tmp_path), strict=True):
        np.testing.assert_array_equal(array, again)
    assert calls == []  # the second load read the cache
    with np.load(path) as stored:
        tampered = {name: stored[name] for name in stored.files}
    tampered["x_train"] = tampered["x_train"].copy()
    tampered["x_train"][0, 0] += 1.0  # same shape and dtype, stale digest
    np.savez(path, **tampered)
    rebuilt = _mnist1d.mnist1d_arrays(num_samples=60, seed=5, cache_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(rebuilt[0], first[0])
    path.write_bytes(b"not an npz")
    _mnist1d.mnist1d_arrays(num_samples=60, seed=5, cache_dir=tmp_path)
    assert len(calls) == 2
    # another seed is another cache file
    _mnist1d.mnist1d_arrays(num_samples=60, seed=6, cache_dir=tmp_path)
    assert len(calls) == 3 and len(list((tmp_path / "mnist1d").iterdir())) == 2


def test_generation_is_deterministic_and_leaves_global_random_state_alone():
    # the package draws from numpy's legacy global generator: the caller's global state must survive
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    before_numpy, before_python = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    a = _mnist1d.mnist1d_arrays(num_samples=50, seed=3)
    b = _mnist1d.mnist1d_arrays(num_samples=50, seed=3)
    c = _mnist1d.mnist1d_arrays(num_samples=50, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(np.random.get_state()[1], before_numpy)  # noqa: NPY002
    assert random.getstate() == before_python


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 55}, "num_samples: got 55; must be a multiple of 10"),
        ({"num_samples": 0}, "num_samples: got 0; allowed range"),
        ({"seed": -1}, "seed: got -1; allowed range"),
    ],
)
def test_mnist1d_arrays_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _mnist1d.mnist1d_arrays(**kwargs)


# --- standardize ------------------------------------------------------------------------------------------


def test_standardize_choices_match_the_config_field():
    assert typing.get_args(typing.get_type_hints(RunConfig)["standardize"]) == data.STANDARDIZE
    assert RunConfig().standardize == "channel"


def _raw_digits_split(seed=0, test_fraction=0.2):
    bunch = skd.load_digits()
    x, y = bunch.images[..., None].astype(np.float64), bunch.target
    train, test = split_indices(len(x), test_fraction=test_fraction, seed=seed, labels=y)
    return x[train], x[test]


def test_feature_standardisation_closed_form():
    ds = data.load_dataset("digits", standardize="feature")
    raw_train, raw_test = _raw_digits_split()
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    varying = std > 0
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0)[varying], 1.0, atol=1e-4)
    assert np.all(ds.x_train[:, ~varying] == 0.0)  # a constant pixel maps to 0
    # the test split uses the train split's statistics (so its own are not 0 / 1)
    expected = (raw_test - mean) / np.where(varying, std, 1.0)
    np.testing.assert_allclose(ds.x_test, expected, atol=1e-5)
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3


def test_global_standardisation_closed_form():
    ds = data.load_dataset("breast_cancer", standardize="global")
    bunch = skd.load_breast_cancer()
    train, test = split_indices(len(bunch.data), test_fraction=0.2, seed=0, labels=bunch.target)
    mean, std = bunch.data[train].mean(), bunch.data[train].std()
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1.0) < 1e-5
    assert np.ptp(ds.x_train.std(axis=0)) > 1.0  # features keep their relative scales
    np.testing.assert_allclose(ds.x_test, (bunch.data[test] - mean) / std, rtol=1e-5, atol=1e-5)


def test_channel_default_is_global_for_one_channel_images_and_per_feature_for_tables():
    digits = data.load_dataset("digits")
    np.testing.assert_array_equal(digits.x_train, data.load_dataset("digits", standardize="global").x_train)
    table = data.load_dataset("breast_cancer")
    np.testing.assert_array_equal(table.x_test, data.load_dataset("breast_cancer", standardize="feature").x_test)


def test_uint8_image_statistics_match_float_formulas():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(37, 3, 4, 2), dtype=np.uint8)
    train[:, 0, 0, 0] = 7  # one constant pixel
    test = rng.integers(0, 256, size=(5, 3, 4, 2), dtype=np.uint8)
    as_float = train.astype(np.float64)
    mean, std = uint8_feature_stats(train, chunk=8)
    np.testing.assert_allclose(mean, as_float.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std[1:], as_float.std(axis=0)[1:], rtol=1e-10)
    assert std[0, 0, 0] == 1.0
    channel_mean, channel_std = uint8_channel_stats(train)
    np.testing.assert_allclose(channel_mean, as_float.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(channel_std, as_float.std(axis=(0, 1, 2)), rtol=1e-12)
    for mode, axes in (("channel", (0, 1, 2)), ("global", (0, 1, 2, 3)), ("feature", (0,))):
        m, s = as_float.mean(axis=axes, keepdims=True), as_float.std(axis=axes, keepdims=True)
        s = np.where(s > 0, s, 1.0)
        got_train, got_test = standardise_uint8_images(train, test, mode)
        np.testing.assert_allclose(got_train, (as_float - m) / s, atol=1e-5)
        np.testing.assert_allclose(got_test, (test - m) / s, atol=1e-5)


def test_bad_standardize_is_refused_before_any_work():
    with pytest.raises(ValueError, match="standardize: got 'pixel'; allowed: channel, feature, global"):
        data.load_dataset("digits", standardize="pixel")
    with pytest.raises(ValueError, match="standardize: got 'feature' for the user loader"):
        data.load_dataset("tests._user_plugins:blobs", standardize="feature")
    with pytest.raises(ValueError, match="standardize"):
        RunConfig.from_flags(standardize="pixel")
    with pytest.raises(ValueError, match="standardize: got 'global' for the user loader"):
        RunConfig.from_flags(dataset="tests._user_plugins:blobs", standardize="global")


def test_standardize_flag_reaches_the_data_through_the_cli(offline_load):
    cache = str(offline_load[1])
    argv = ["train", "--dataset", "mnist1d", "--data-dir", cache, "--model", "cnn1d", "--standardize", "feature"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert (config.standardize, config.dataset, config.model.name) == ("feature", "mnist1d", "cnn1d")
    x = setup(config).dataset.x_train
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-4)


def test_resume_refuses_another_standardize(tmp_path):
    config = RunConfig.from_flags(hidden=(8,), epochs=1, batch_size=256, quiet=True)
    train_and_evaluate(config, tmp_path)
    other = config.with_flags(standardize="feature", epochs=2)
    with pytest.raises(CheckpointMismatchError, match="standardize: checkpoint has 'channel', this run has 'feature'"):
        train_and_evaluate(other, tmp_path, resume=True)


def test_network_is_not_needed_in_process(monkeypatch, offline_load):
    """With the cache filled, loading in this process never opens a socket either."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert data.load_dataset("mnist1d", data_dir=offline_load[1]).num_train == 4000
