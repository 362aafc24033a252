"""A reproducible train/test split and standardisation fitted on the train split only."""

from __future__ import annotations

import numbers
import typing
from typing import Literal

import numpy as np

# Mixed into the split's seed so that the split's random stream differs from other uses of the same seed
# (e.g. the synthetic data generator or the epoch permutations).
_SPLIT_STREAM = 0x5B117


def check_test_fraction(test_fraction: float) -> float:
    """Returns ``test_fraction`` as a float if it lies strictly between 0 and 1."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise TypeError(
            f"test_fraction: expected a float in (0, 1), got {test_fraction!r} of type {type(test_fraction).__name__}"
        )
    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: got {test_fraction}; allowed range is the open interval (0, 1)")
    return test_fraction


def split_indices(
    num_examples: int, *, test_fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted train and test index arrays covering ``range(num_examples)``.

    The split is a pure function of its arguments. With ``labels`` it is stratified: each class sends
    ``round(test_fraction * n_c)`` of its ``n_c`` examples to the test split, so both splits keep the class
    proportions. Without labels, ``round(test_fraction * num_examples)`` examples go to the test split.

    Args:
      num_examples: number of examples ``N``.
      test_fraction: fraction of examples for the test split, in ``(0, 1)``.
      seed: non-negative seed of the split.
      labels: optional integer class labels, shape ``(N,)``, for a stratified split.

    Returns:
      ``(train_idx, test_idx)``, sorted int64 arrays.

    Raises:
      ValueError: if the fraction leaves the train or the test split empty.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    if labels is None:
        groups = [np.arange(num_examples)]
    else:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    test_parts = []
    for members in groups:
        shuffled = rng.permutation(members)
        test_parts.append(shuffled[: round(test_fraction * len(members))])
    test_idx = np.sort(np.concatenate(test_parts))
    is_test = np.zeros(num_examples, dtype=bool)
    is_test[test_idx] = True
    train_idx = np.flatnonzero(~is_test)
    if len(test_idx) == 0 or len(train_idx) == 0:
        empty = "test" if len(test_idx) == 0 else "train"
        raise ValueError(
            f"test_fraction: {test_fraction} leaves the {empty} split of {num_examples} examples empty; "
            "choose a value further from 0 and 1"
        )
    return train_idx, test_idx


Standardize = Literal["channel", "feature", "global"]
"""The ways of standardising inputs (the ``standardize`` argument; see :data:`STANDARDIZE`)."""
STANDARDIZE: tuple[Standardize, ...] = typing.get_args(Standardize)
"""How inputs are standardised: ``channel``: one mean / std per channel (the last axis), which is per feature
for tables ``(N, F)`` and one global pair for one-channel signals and images; ``feature``: one pair per input
element (per pixel of an image); ``global``: one pair over every element."""


def check_standardize(standardize: Standardize) -> Standardize:
    """Returns ``standardize`` if it is one of :data:`STANDARDIZE`, else raises naming the argument."""
    if not isinstance(standardize, str) or standardize not in STANDARDIZE:
        raise ValueError(f"standardize: got {standardize!r}; allowed: {', '.join(STANDARDIZE)}")
    return standardize


def standardizer_axes(standardize: Standardize, ndim: int) -> tuple[int, ...]:
    """The axes of ``(N, *input_shape)`` inputs (``ndim`` axes) that one mean / std is taken over.

    ``channel``: every axis but the last; ``feature``: the batch axis only; ``global``: every axis.
    """
    check_standardize(standardize)
    if standardize == "channel":
        return tuple(range(ndim - 1))
    if standardize == "feature":
        return (0,)
    return tuple(range(ndim))


def fit_standardiser(x_train: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``x_train`` over ``axes`` (float64, keepdims).

    A constant feature has standard deviation 0; its scale is set to 1 so that it maps to 0 rather than NaN.
    """
    mean = np.mean(x_train, axis=axes, dtype=np.float64, keepdims=True)
    std = np.std(x_train, axis=axes, dtype=np.float64, keepdims=True)
    return np.asarray(mean), np.where(std > 0, std, 1.0)


def apply_standardiser(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` as float32."""
    return ((x - mean) / std).astype(np.float32)


def uint8_channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and standard deviation of uint8 NHWC images, from per-channel histograms.

    Counting the 256 possible values per channel is exact and needs no float copy of the whole array.

    Returns:
      ``(mean, std)``, float64 arrays of shape ``(C,)``; a zero std is replaced by 1.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"images: expected uint8, got {images.dtype}")
    stats = [_histogram_stats(images[..., c]) for c in range(images.shape[-1])]
    return np.asarray([m for m, _ in stats]), np.asarray([s for _, s in stats])


def _histogram_stats(values: np.ndarray) -> tuple[float, float]:
    """Exact mean and standard deviation (1 if zero) of uint8 ``values``, from their 256-bin histogram."""
    levels = np.arange(256, dtype=np.float64)
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    mean = counts @ levels / counts.sum()
    var = counts @ (levels - mean) ** 2 / counts.sum()
    return float(mean), float(np.sqrt(var)) if var > 0 else 1.0


def uint8_feature_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-element mean and standard deviation of uint8 ``images`` ``(N, ...)`` over the batch axis.

    Sums of ``x`` and ``x^2`` are accumulated in int64 (exact) over chunks of ``chunk`` examples, so no float
    copy of the whole array is made; :math:`\\sigma^2 = E[x^2] - E[x]^2`.

    Returns:
      ``(mean, std)``, float64 arrays of shape ``images.shape[1:]``; a zero std is replaced by 1.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"images: expected uint8, got {images.dtype}")
    total = np.zeros(images.shape[1:], dtype=np.int64)
    squares = np.zeros(images.shape[1:], dtype=np.int64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].astype(np.int64)
        total += part.sum(axis=0)
        squares += (part * part).sum(axis=0)
    mean = total / len(images)
    var = np.maximum(squares / len(images) - mean**2, 0.0)
    std = np.sqrt(var)
    return mean, np.where(std > 0, std, 1.0)


def standardise_uint8_images(
    train: np.ndarray, test: np.ndarray, standardize: Standardize = "channel"
) -> tuple[np.ndarray, np.ndarray]:
    """Standardises uint8 NHWC images with the train split's statistics (see :data:`STANDARDIZE`), giving
    float32."""
    standardize = check_standardize(standardize)
    if standardize == "channel":
        mean, std = uint8_channel_stats(train)
    elif standardize == "feature":
        mean, std = uint8_feature_stats(train)
    else:
        mean, std = (np.asarray(v) for v in _histogram_stats(train))
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    out = []
    for images in (train, test):
        x = images.astype(np.float32)
        x -= mean32
        x /= std32
        out.append(x)
    return out[0], out[1]
