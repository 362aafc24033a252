"""Checkpoints of a whole training state with orbax, complete or absent.

A checkpoint holds the train state pytree (step, parameters, estimator state, optimizer state) and a JSON
record (the run configuration and elapsed time). orbax writes each checkpoint to a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous checkpoint as the latest one.
Restoring always goes into an abstract target built from a freshly initialised state, so the restored
structure, shapes and dtypes are checked against what the current configuration expects.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run whose configuration differs from the current one."""


class Checkpointer:
    """Saves and restores train states in ``directory`` (kept: the ``max_to_keep`` newest)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Saves ``state`` and ``record`` as checkpoint ``step`` and waits until it is complete on disk."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_record(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint ``step``, without reading the arrays."""
        restored = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
        return dict(restored.record)

    def restore(self, step: int, like: Any) -> Any:
        """Checkpoint ``step`` restored into the structure, shapes and dtypes of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored.state

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_record_matches(record: dict[str, Any], fingerprint: dict[str, Any], directory: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming each field where ``record`` and ``fingerprint`` differ."""
    saved = record.get("config_fingerprint")
    if saved is None:
        raise CheckpointMismatchError(f"checkpoint in {directory} has no configuration record; cannot resume it")
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {fingerprint.get(key)!r}"
        for key in sorted(set(saved) | set(fingerprint))
        if saved.get(key) != fingerprint.get(key)
    ]
    if differences:
        raise CheckpointMismatchError(
            f"resume: the checkpoint in {directory} was written by a different configuration ("
            + "; ".join(differences)
            + "). Use a new --workdir, or the original configuration."
        )
