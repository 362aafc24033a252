"""Argument checks shared by the data module: each error names the argument, its value and what is allowed."""

from __future__ import annotations

import numbers
from typing import Any


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Returns ``value`` as an int if it is an integer in ``[low, high]``; else raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"{name}: got {value}; allowed range is [{lo}, {hi}]")
    return value


# numpy's Generator and scikit-learn both take seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """Returns a seed usable by ``np.random.default_rng``; raises naming ``name`` otherwise."""
    return check_int(name, value, low=0, high=MAX_SEED)
