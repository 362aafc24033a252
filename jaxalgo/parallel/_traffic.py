"""Bytes sent per step during training, for the metrics line of the data-parallel runners.

Each program a runner runs (a step of some phase, a sync) is measured once per set of argument shapes with
:func:`jaxalgo.parallel.comm_report` (the compiled HLO, bytes per device at the requested dtypes) and then counted
every time it runs. The metrics line of an epoch reports the mean over the steps of the epoch:

- ``comm_bytes_per_step``: everything a device sends, at every mesh level;
- ``comm_cross_node_bytes_per_step``: the part whose replica groups span the mesh's outermost axis (``"node"``
  for DDP and DASO, ``"group"`` for AB-training), i.e. the network traffic when that axis is the node axis.

The final metrics line reports the same two means over the whole run. The sums go into each checkpoint's record
(:meth:`TrafficMeter.totals`, :meth:`TrafficMeter.load`), so a resumed run reports the uninterrupted run's figures.

Measuring lowers and compiles the program before its first run; JAX's compilation cache then serves the run
itself (and a measurement after a run), so nothing is compiled twice.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from jaxalgo.parallel._comm import CommReport


class TrafficMeter:
    """Accumulates the bytes of the programs a runner runs; see the module docstring."""

    def __init__(self) -> None:
        self._cache: dict[Hashable, Any] = {}
        self._epoch = [0.0, 0.0, 0]  # bytes, cross-node bytes, steps since the last metrics line
        self._run = [0.0, 0.0, 0]  # the same since the start of the run

    def measured(self, key: Hashable, measure: Callable[[], Any]) -> Any:
        """``measure()`` on the first call with ``key``, the cached value afterwards."""
        if key not in self._cache:
            self._cache[key] = measure()
        return self._cache[key]

    def add(self, total: float, cross_node: float) -> None:
        """Counts one run of a program that sends ``total`` bytes per device, ``cross_node`` of them across nodes."""
        for sums in (self._epoch, self._run):
            sums[0] += total
            sums[1] += cross_node

    def add_report(self, report: CommReport) -> None:
        self.add(report.total(requested=True), report.requested_cross_node_bytes)

    def end_step(self) -> None:
        self._epoch[2] += 1
        self._run[2] += 1

    def metrics(self) -> dict[str, float]:
        """The means per step since the last call (empty if no step ran), then starts counting anew."""
        out = _means(self._epoch)
        self._epoch = [0.0, 0.0, 0]
        return out

    def run_metrics(self) -> dict[str, float]:
        """The means per step over the whole run."""
        return _means(self._run)

    def totals(self) -> dict[str, list[float]]:
        """The sums so far (JSON-able), for a checkpoint's record."""
        return {"epoch": list(self._epoch), "run": list(self._run)}

    def load(self, totals: dict[str, list[float]] | None) -> None:
        """Continues from the sums of :meth:`totals` (a resumed run); ``None`` (an older record) keeps zeros."""
        if totals:
            self._epoch = [float(totals["epoch"][0]), float(totals["epoch"][1]), int(totals["epoch"][2])]
            self._run = [float(totals["run"][0]), float(totals["run"][1]), int(totals["run"][2])]


def _means(sums: list) -> dict[str, float]:
    total, cross_node, steps = sums
    if not steps:
        return {}
    return {"comm_bytes_per_step": total / steps, "comm_cross_node_bytes_per_step": cross_node / steps}
