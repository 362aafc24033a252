"""Shuffled mini-batches whose order is a pure function of (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np

from jaxalgo.data._checks import check_int, check_seed
from jaxalgo.data._dataset import Dataset


def validate_batch_size(batch_size: int, num_train: int) -> None:
    """Raises unless ``1 <= batch_size <= num_train`` (every epoch must yield at least one full batch).

    Args:
      batch_size: examples per batch.
      num_train: number of training examples.

    Raises:
      TypeError: if ``batch_size`` is not an int.
      ValueError: naming ``batch_size``, its value and the allowed range.
    """
    num_train = check_int("num_train", num_train, low=1)
    check_int("batch_size", batch_size, low=1, high=num_train)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches in one epoch: ``num_examples // batch_size`` (drop the partial last one).

    Args:
      num_examples: number of examples, ``>= 0``.
      batch_size: examples per batch, ``>= 1``.

    Returns:
      The number of steps; 0 if ``batch_size > num_examples``.
    """
    num_examples = check_int("num_examples", num_examples, low=0)
    batch_size = check_int("batch_size", batch_size, low=1)
    return num_examples // batch_size


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the examples: a pure function of ``(seed, epoch)``.

    It is ``np.random.default_rng([seed, epoch]).permutation(num_examples)``, so any epoch's order can be
    recomputed without replaying the earlier ones (needed to resume a run).

    Args:
      num_examples: number of examples ``N``.
      seed: non-negative int seed of the run.
      epoch: non-negative int epoch number.

    Returns:
      An int64 permutation of ``range(N)``.
    """
    num_examples = check_int("num_examples", num_examples, low=0)
    seed = check_seed(seed)
    epoch = check_int("epoch", epoch, low=0)
    return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int64)


def _row_bounds(rows: slice | None, batch_size: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rows``, a slice of the ``batch_size`` rows of a batch (``None``: all of them).

    Args:
      rows: ``None`` or a ``slice(start, stop)`` with step ``None`` or 1 and ``0 <= start < stop <= batch_size``
        (``None`` bounds mean ``0`` and ``batch_size``; negative bounds are refused, not counted from the end).
      batch_size: rows per batch, ``>= 1``.

    Returns:
      The bounds ``(start, stop)``.

    Raises:
      TypeError: naming ``rows`` if it is not a slice (or ``None``) of ints.
      ValueError: naming ``rows``, its value and the allowed bounds.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    if rows is None:
        return 0, batch_size
    if not isinstance(rows, slice):
        raise TypeError(f"rows: expected a slice of the batch's rows or None, got {type(rows).__name__} {rows!r}")
    bounds = (rows.start, rows.stop, rows.step)
    if not all(b is None or (isinstance(b, numbers.Integral) and not isinstance(b, bool)) for b in bounds):
        raise TypeError(f"rows: expected a slice of ints, got {rows!r}")
    start = 0 if rows.start is None else int(rows.start)
    stop = batch_size if rows.stop is None else int(rows.stop)
    if rows.step not in (None, 1) or not 0 <= start < stop <= batch_size:
        raise ValueError(
            f"rows: expected slice(start, stop) with step 1 and 0 <= start < stop <= batch_size ({batch_size}), "
            f"got {rows!r}"
        )
    return start, stop


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    rows: slice | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of training batches in :func:`epoch_permutation` order, dropping the remainder.

    Batch ``s`` of epoch ``e`` holds the train examples at positions ``perm[s * B : (s + 1) * B]`` of
    ``perm = epoch_permutation(N_train, seed=seed, epoch=e)``. Each example appears at most once per epoch and
    every batch has exactly ``batch_size`` rows. Starting at ``start_step = s`` yields exactly the batches
    ``s, s + 1, ...`` of the uninterrupted epoch, so a run resumed mid-epoch sees the same data.

    With ``rows = slice(a, b)`` each yielded batch holds only the rows ``a:b`` of that global batch (positions
    ``perm[s * B + a : s * B + b]``), and only those rows are gathered from the dataset's arrays: in a multi-process
    run each process builds the rows its devices hold (``batch_rows`` of :class:`jaxalgo.runner.Runner`). The
    permutation, and so the order and content of the global batches, do not depend on ``rows``.

    Arguments are checked when this function is called, before the first batch is requested.

    Args:
      dataset: the :class:`Dataset` whose train split is iterated.
      batch_size: examples per batch, in ``[1, dataset.num_train]``.
      seed: non-negative int seed of the run.
      epoch: non-negative int epoch number.
      start_step: index of the first batch to yield, in ``[0, steps_per_epoch]``.
      rows: the rows of each global batch to build, ``slice(start, stop)`` with ``0 <= start < stop <=
        batch_size`` (step 1, non-negative bounds); default ``None``: all ``batch_size`` rows.

    Returns:
      An iterator of dicts ``{"x": inputs, "y": labels or targets, "idx": int32 positions in the train
      split}`` with ``stop - start`` rows each; ``idx`` indexes per-sample state such as F3's error buffer of
      shape ``[N_train, C]``.

    Example:
      Two processes, each building half of every global batch of 64::

        >>> halves = [iterate_batches(ds, 64, seed=0, epoch=0, rows=slice(32 * p, 32 * (p + 1))) for p in (0, 1)]
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset: expected a jaxalgo.data.Dataset, got {type(dataset).__name__}")
    validate_batch_size(batch_size, dataset.num_train)
    num_steps = steps_per_epoch(dataset.num_train, batch_size)
    start_step = check_int("start_step", start_step, low=0, high=num_steps)
    if dataset.num_train > np.iinfo(np.int32).max:
        raise ValueError(f"dataset: {dataset.num_train} training examples do not fit int32 sample indices")
    first, last = _row_bounds(rows, batch_size)
    perm = epoch_permutation(dataset.num_train, seed=seed, epoch=epoch)
    return _batches(dataset, perm, batch_size, start_step, num_steps, first, last)


def _batches(
    dataset: Dataset, perm: np.ndarray, batch_size: int, start_step: int, num_steps: int, first: int, last: int
) -> Iterator[dict[str, np.ndarray]]:
    for step in range(start_step, num_steps):
        idx = perm[step * batch_size + first : step * batch_size + last]
        yield {"x": dataset.x_train[idx], "y": dataset.y_train[idx], "idx": idx.astype(np.int32)}
