"""A reproducible train/test split and standardisation fitted on the train split only."""

from __future__ import annotations

import numbers

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


def fit_standardiser(x_train: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of ``x_train`` over ``axes`` (float64, keepdims).

    A constant feature has standard deviation 0; its scale is set to 1 so that it maps to 0 rather than NaN.
    """
    mean = np.mean(x_train, axis=axes, dtype=np.float64, keepdims=True)
    std = np.std(x_train, axis=axes, dtype=np.float64, keepdims=True)
    return mean, np.where(std > 0, std, 1.0)


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
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.shape[-1]):
        counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = counts @ values / total
        var = counts @ (values - mean) ** 2 / total
        means.append(mean)
        stds.append(np.sqrt(var) if var > 0 else 1.0)
    return np.asarray(means), np.asarray(stds)


def standardise_uint8_images(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardises uint8 NHWC images per channel with the train split's statistics, giving float32."""
    mean, std = uint8_channel_stats(train)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    out = []
    for images in (train, test):
        x = images.astype(np.float32)
        x -= mean32
        x /= std32
        out.append(x)
    return out[0], out[1]
