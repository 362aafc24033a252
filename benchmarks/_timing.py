"""Timing helpers shared by the benchmarks (medians: this is a shared, noisy machine)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def median_seconds(step: Callable[..., Any], state: Any, *args: Any, repeats: int) -> float:
    """The median time of ``state, loss = step(state, *args)`` after 3 warm-up calls. ``state`` is copied first, so
    a step that donates its state leaves the caller's intact."""
    state = jax.tree.map(lambda x: x.copy(), state)
    for _ in range(3):
        state, loss = step(state, *args)
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, loss = step(state, *args)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    compiled: Mapping[str, Callable[..., Any]], args_of_repeat: Callable[[int], tuple], repeats: int
) -> dict[str, float]:
    """The median time of each compiled step, the steps interleaved within every repeat (so a slow phase of the
    machine hits them all alike); repeat ``r`` calls each with ``args_of_repeat(r)``."""
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for r in range(repeats):
        args = args_of_repeat(r)
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
