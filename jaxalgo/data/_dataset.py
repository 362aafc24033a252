"""The :class:`Dataset` container: train/test arrays plus what a training loop needs to know about them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import numpy as np

Task = Literal["classification", "regression"]
"""What a data set's targets are: class labels, or real-valued regression targets."""
TASKS: tuple[Task, ...] = typing.get_args(Task)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split held in memory as numpy arrays.

    Attributes:
      name: the data set's name, as given to :func:`load_dataset`.
      task: ``"classification"`` or ``"regression"``.
      x_train: float32 inputs, shape ``(N_train, *input_shape)``; images are NHWC ``(N, H, W, C)``, signals
        ``(N, L, C)`` (mnist1d: ``(N, 40, 1)``).
      y_train: classification: int32 labels ``(N_train,)`` in ``[0, num_outputs)``; regression: float32
        targets ``(N_train, T)``, standardised with the train split's statistics.
      x_test: inputs of the test split, standardised with the TRAIN split's statistics.
      y_test: labels or (standardised) targets of the test split.
      num_outputs: number of classes (2 for binary classification) or of regression targets ``T``.
      target_mean: regression only: per-target mean of the train split, shape ``(T,)``.
      target_std: regression only: per-target standard deviation of the train split, shape ``(T,)``.
        Targets in original units are ``y * target_std + target_mean``; an error in standardised units
        times ``target_std`` is the error in original units (e.g. the MAE).
    """

    name: str
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: got {self.task!r}; allowed: {', '.join(TASKS)}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int | np.integer):
            raise TypeError(f"num_outputs: expected an int, got {type(self.num_outputs).__name__}")
        if self.num_outputs < 1:
            raise ValueError(f"num_outputs: got {self.num_outputs}; must be >= 1")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim < 2:
                raise ValueError(f"x_{split}: expected shape (N, *input_shape), got {x.shape}")
            if len(x) != len(y):
                raise ValueError(f"y_{split}: has {len(y)} rows but x_{split} has {len(x)}; they must match")
            expected_ndim = 1 if self.task == "classification" else 2
            if y.ndim != expected_ndim or (expected_ndim == 2 and y.shape[1] != self.num_outputs):
                want = "(N,)" if expected_ndim == 1 else f"(N, {self.num_outputs})"
                raise ValueError(f"y_{split}: for {self.task} expected shape {want}, got {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"x_test: input shape {self.x_test.shape[1:]} differs from x_train's {self.x_train.shape[1:]}"
            )
        if self.task == "regression":
            for field in ("target_mean", "target_std"):
                value = getattr(self, field)
                if value is not None and np.shape(value) != (self.num_outputs,):
                    raise ValueError(f"{field}: expected shape ({self.num_outputs},), got {np.shape(value)}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example, e.g. ``(28, 28, 1)`` or ``(30,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, input_shape={self.input_shape}, "
            f"num_outputs={self.num_outputs}, num_train={self.num_train}, num_test={self.num_test})"
        )
