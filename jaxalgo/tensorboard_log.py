"""TensorBoard event files that mirror a run's ``metrics.jsonl`` (``jaxalgo train --tensorboard``).

Each epoch line of the metrics file (a line with ``epoch``, neither ``final`` nor ``event``) becomes one scalar per
numeric field at the line's ``step``: ``train_loss``, ``test_loss``, ``test_accuracy`` or ``test_mae``, the bytes
sent per step, the trainable fractions, ... Nested dicts of numbers (OIALR's ``lowrank_ranks``, DASO's
``daso_phases``) become one scalar per key, tagged ``field/key``. Booleans, strings and ``None`` are not scalars
and are left out, as are ``step`` (the x axis) and ``epoch`` (a step count in other units). The wall time of a point
is the run's (virtual) start plus the line's ``seconds``, so TensorBoard's "relative" axis shows the training time
of an uninterrupted run, resumes included.

A resumed run rewrites its metrics file from the checkpoint it restores; points written after that checkpoint by
the interrupted run (an epoch it finished but did not checkpoint) would then be in the event files twice, once
from each attempt. TensorBoard reads every event file of a directory and, for one tag, shows every point it reads:
two points at one step draw a zig-zag (or, after its purge of "orphaned" data, only some of them). So
:meth:`TensorBoardWriter.rewrite` replaces the event files with one that holds exactly the given lines, and
:meth:`TensorBoardWriter.add` then appends as the run goes on: the event files always hold the metrics file's
epoch lines, each once.

Written with tensorboardX (``pip install jaxalgo[tensorboard]``), imported only when a writer is made.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

TENSORBOARD_DIR = "tensorboard"
EVENT_FILE_PREFIX = "events.out.tfevents."
_NOT_SCALARS = frozenset({"step", "epoch", "seconds"})


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of the feature asked for is not installed; the message names the ``pip install``
    that brings it. A ValueError too, so that the command line reports it in one line with exit status 2."""


def require(module: str, extra: str) -> Any:
    """Imports ``module`` (an optional dependency), or raises :class:`MissingExtraError` saying
    ``pip install jaxalgo[extra]``."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{extra}: needs the package {module}, which is not installed; pip install jaxalgo[{extra}]"
        )
    return importlib.import_module(module)


def is_epoch_line(line: Mapping[str, Any]) -> bool:
    """Whether a metrics line is an epoch's evaluation (not the final line, not an event such as a resume)."""
    return "epoch" in line and "step" in line and not line.get("final") and "event" not in line


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def epoch_scalars(line: Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of one epoch line's numeric fields (see the module docstring); ``{}`` for other lines.

    >>> epoch_scalars({"step": 22, "epoch": 1, "train_loss": 0.5, "lowrank_ranks": {"0": 8}, "converted": True})
    {'train_loss': 0.5, 'lowrank_ranks/0': 8.0}
    """
    if not is_epoch_line(line):
        return {}
    scalars = {}
    for key, value in line.items():
        if key in _NOT_SCALARS:
            continue
        if _is_number(value):
            scalars[key] = float(value)
        elif isinstance(value, Mapping):
            scalars.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
    return scalars


class TensorBoardWriter:
    """The event files of one run directory's ``tensorboard/`` folder, kept equal to its metrics file's epoch lines.

    Args:
      directory: the folder of the event files (created if missing).
      started: the run's start as a Unix time (for a resumed run: now minus the elapsed seconds it restored); a
        point's wall time is ``started + line["seconds"]``.

    Raises:
      MissingExtraError: tensorboardX is not installed.
    """

    def __init__(self, directory: str | os.PathLike, *, started: float):
        self._tensorboardx = require("tensorboardX", "tensorboard")
        self.directory = os.fspath(directory)
        self.started = float(started)
        self._writer: Any = None

    def event_files(self) -> list[str]:
        """The event files in the directory, oldest name first."""
        if not os.path.isdir(self.directory):
            return []
        names = sorted(n for n in os.listdir(self.directory) if n.startswith(EVENT_FILE_PREFIX))
        return [os.path.join(self.directory, n) for n in names]

    def rewrite(self, lines: Iterable[Mapping[str, Any]]) -> None:
        """Replaces every event file of the directory by one holding exactly the epoch lines of ``lines``."""
        self.close()
        for path in self.event_files():
            os.remove(path)
        os.makedirs(self.directory, exist_ok=True)
        self._writer = self._tensorboardx.SummaryWriter(logdir=self.directory, flush_secs=3600)
        self.add(lines)

    def add(self, lines: Iterable[Mapping[str, Any]]) -> None:
        """Appends the scalars of the epoch lines among ``lines`` and flushes them to disk."""
        if self._writer is None:
            raise RuntimeError("TensorBoardWriter.add before rewrite: call rewrite(lines_so_far) first")
        for line in lines:
            walltime = self.started + float(line.get("seconds", 0.0))
            for tag, value in epoch_scalars(line).items():
                self._writer.add_scalar(tag, value, global_step=int(line["step"]), walltime=walltime)
        self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the current event file (a no-op when none is open)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = [
    "EVENT_FILE_PREFIX",
    "TENSORBOARD_DIR",
    "MissingExtraError",
    "TensorBoardWriter",
    "epoch_scalars",
    "is_epoch_line",
    "require",
]
