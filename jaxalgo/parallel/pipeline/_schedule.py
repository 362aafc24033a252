r"""The schedules the pipelines run, as stage-by-tick tables: idle fractions, and a text chart.

The figures come from the ``busy`` masks the programs return (``[S, T]`` per call: the schedule that actually
ran). For comparison, the closed forms:

- GPipe, every step: each wave has :math:`S (M + S - 1)` stage-ticks of which :math:`S (S - 1)` are idle, a
  fraction :math:`(S - 1) / (M + S - 1)` (Huang et al. 2019);
- the feedback pipeline, per epoch of ``K`` calls of ``M`` microbatches that fills and drains once:
  :math:`S (KM + S - 1)` stage-ticks, :math:`S (S - 1)` idle, a fraction :math:`(S - 1) / (KM + S - 1)`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def idle_ticks(busy: Iterable[object]) -> tuple[int, int]:
    """``(idle, total)`` stage-ticks over ``busy`` masks (each ``[S, T]``, host or device arrays)."""
    idle = total = 0
    for mask in busy:
        mask = np.asarray(mask, bool)
        idle += int(mask.size - mask.sum())
        total += int(mask.size)
    return idle, total


def gpipe_idle_fraction(num_stages: int, num_microbatches: int) -> float:
    """``(S - 1) / (M + S - 1)``: the idle share of each GPipe wave."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def feedback_idle_fraction(num_stages: int, num_microbatches: int, calls_per_epoch: int) -> float:
    """``(S - 1) / (K M + S - 1)``: the idle share of an epoch of the feedback pipeline (one fill, one drain)."""
    return (num_stages - 1) / (calls_per_epoch * num_microbatches + num_stages - 1)


def schedule_chart(busy: np.ndarray, microbatch: np.ndarray | None = None) -> str:
    """A text chart of one ``[S, T]`` busy mask: one row per stage, ``.`` for an idle tick, else the microbatch's
    number (mod 10) when ``microbatch`` (``[S, T]``) is given, or ``#``."""
    busy = np.asarray(busy, bool)
    rows = []
    for s in range(busy.shape[0]):
        cells = [
            ("." if not busy[s, t] else ("#" if microbatch is None else str(int(microbatch[s, t]) % 10)))
            for t in range(busy.shape[1])
        ]
        rows.append(f"stage {s} " + "".join(cells))
    return "\n".join(rows)


__all__ = ["feedback_idle_fraction", "gpipe_idle_fraction", "idle_ticks", "schedule_chart"]
