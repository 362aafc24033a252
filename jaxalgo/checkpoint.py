"""Checkpoints of a whole training state with orbax, verified on restore, complete or absent.

A checkpoint holds the train state pytree (step, parameters, estimator state, optimizer state) and a JSON
record (the run configuration, the metrics written so far, elapsed time). orbax writes each checkpoint to a
temporary directory and renames it when complete, so a process killed mid-save leaves the previous checkpoint as
the latest one.

Each checkpoint is also verified end to end:

- the record carries the SHA-256 of every array of the state (``state_sha256``, one digest per leaf, computed from
  the values that were saved) and of its own canonical JSON (``record_sha256``);
- :meth:`Checkpointer.restore` recomputes the digests from the restored values, so a flipped byte, a truncated or
  deleted file, or anything orbax would fill in silently is refused instead of restored as garbage;
- :meth:`Checkpointer.restore_newest` walks from the newest checkpoint to the oldest, reports each one that
  fails in one line naming its step, moves it aside (to ``corrupt_checkpoints/`` beside the checkpoint directory)
  and restores the newest that verifies.

Restoring always goes into an abstract target built from a freshly initialised state, so the restored structure,
shapes and dtypes are checked against what the current configuration expects.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CORRUPT_DIR = "corrupt_checkpoints"
MANIFEST = "jaxalgo_manifest.json"  # SHA-256 of every file of a checkpoint, written once it is complete


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run whose configuration differs from the current one."""


class CheckpointCorruptError(ValueError):
    """A checkpoint cannot be read, is incomplete, or its contents differ from the checksums it was saved with."""


def _host_value(leaf: Any) -> np.ndarray:
    """The global value of an array leaf on this host (gathered across processes when it is not addressable)."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        if not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
    return np.asarray(leaf)


def state_digests(state: Any) -> dict[str, str]:
    """``{leaf path: SHA-256 of its dtype, shape and bytes}`` of every leaf of ``state``."""
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        value = np.ascontiguousarray(_host_value(leaf))
        digest = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
        digests[jax.tree_util.keystr(path)] = digest.hexdigest()
    return digests


def _file_digests(step_dir: str) -> dict[str, str]:
    """``{path relative to step_dir: SHA-256}`` of every file of a checkpoint directory but the manifest."""
    digests = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir)
            if relative.startswith(MANIFEST):
                continue
            with open(path, "rb") as f:
                digests[relative] = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(sorted(digests.items()))


def _record_digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _reason(error: BaseException) -> str:
    """One short line for an error raised while reading a checkpoint."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


class _DropReportsAbout(logging.Filter):
    """Drops log records that mention ``directory`` (orbax, tensorstore's unretrieved futures and asyncio log tens
    of lines and stack traces for one damaged checkpoint; the checkpointer reports it in one line instead)."""

    LOGGERS = ("absl", "asyncio", "orbax")

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return self.directory not in text and "Metadata file" not in text

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        gc.collect()  # unretrieved futures of a failed read log when collected: collect them while filtered
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


class Checkpointer:
    """Saves, verifies and restores train states in ``directory`` (kept: the ``max_to_keep`` newest).

    Args:
      directory: where the checkpoints go (created if missing).
      max_to_keep: how many checkpoints to keep (older ones are deleted after each save).
      report: called with one line for each checkpoint that fails verification (default: ignored).
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 2, report: Callable[[str], None] | None = None
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self._max_to_keep = max_to_keep
        self._report = report or (lambda line: None)
        self._quiet = _DropReportsAbout(self.directory)
        self._quiet.install()
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Saves ``state`` and ``record`` (with their checksums added) as checkpoint ``step``; waits until it is
        complete on disk."""
        record = {**record, "state_sha256": state_digests(state)}
        record["record_sha256"] = _record_digest(record)
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
            force=True,
        )
        self._manager.wait_until_finished()
        if jax.process_index() == 0:  # every process's files are complete once orbax has finalised the step
            step_dir = os.path.join(self.directory, str(int(step)))
            digests, tmp = _file_digests(step_dir), os.path.join(step_dir, MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(digests, f)
            os.replace(tmp, os.path.join(step_dir, MANIFEST))

    def verify_files(self, step: int) -> None:
        """Compares checkpoint ``step``'s files with its manifest, before orbax reads any of them (a damaged file
        is then reported in one line, not by the tens of log lines a failed read prints). A checkpoint written
        before manifests existed has none and is checked by its array checksums only.

        Raises:
          CheckpointCorruptError: a file is missing, added or changed, or the manifest cannot be read.
        """
        step_dir = os.path.join(self.directory, str(int(step)))
        path = os.path.join(step_dir, MANIFEST)
        if not os.path.exists(path):
            return
        try:
            with open(path) as f:
                expected = json.load(f)
        except (OSError, ValueError) as error:
            raise CheckpointCorruptError(f"checkpoint {step}: manifest unreadable ({_reason(error)})") from None
        actual = _file_digests(step_dir)
        missing = sorted(set(expected) - set(actual))
        changed = sorted(k for k in expected if k in actual and actual[k] != expected[k])
        if missing or changed or not isinstance(expected, dict):
            what = [f"{name} is missing" for name in missing[:2]] + [f"{name} changed" for name in changed[:2]]
            raise CheckpointCorruptError(f"checkpoint {step}: {', '.join(what) or 'manifest damaged'}")

    def read_record(self, step: int) -> dict[str, Any]:
        """The verified JSON record of checkpoint ``step``, without reading the arrays.

        Raises:
          CheckpointCorruptError: a file differs from the manifest, or the record cannot be read or differs from its
            checksum.
        """
        self.verify_files(step)
        try:
            restored = self._manager.restore(int(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
            record = dict(restored.record)
        except Exception as error:  # orbax and tensorstore raise many types for damaged files
            raise CheckpointCorruptError(f"checkpoint {step}: record unreadable ({_reason(error)})") from None
        saved = record.get("record_sha256")
        if saved is not None and saved != _record_digest(record):
            raise CheckpointCorruptError(f"checkpoint {step}: record differs from its checksum")
        return record

    def restore(self, step: int, like: Any, record: dict[str, Any] | None = None) -> Any:
        """Checkpoint ``step`` restored into the structure, shapes and dtypes of ``like``, and verified against the
        checksums of its record.

        Raises:
          CheckpointCorruptError: the arrays cannot be read or differ from the checksums they were saved with.
        """
        record = self.read_record(step) if record is None else record
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self._manager.restore(
                int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            ).state
        except Exception as error:
            raise CheckpointCorruptError(f"checkpoint {step}: arrays unreadable ({_reason(error)})") from None
        expected = record.get("state_sha256")
        if expected is not None:
            actual = state_digests(restored)
            wrong = [path for path in expected if actual.get(path) != expected[path]]
            if wrong or set(actual) != set(expected):
                names = ", ".join(wrong[:3]) or "the tree structure"
                raise CheckpointCorruptError(
                    f"checkpoint {step}: {len(wrong)} of {len(expected)} arrays differ from their checksums ({names})"
                )
        return restored

    def restore_newest(
        self, like_of: Callable[[dict[str, Any]], Any], *, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest checkpoint that verifies: ``(step, state, record)``, or ``None`` when there is none at all.

        Each checkpoint that fails verification is reported in one line, moved aside to ``corrupt_checkpoints/``
        and the next older one is tried.

        Args:
          like_of: the restore target for a record (:meth:`jaxalgo.runner.Runner.restore_target`).
          check: called with each verified record before its arrays are read (e.g. the configuration check); its
            errors propagate (a checkpoint of another configuration is not corrupt).

        Raises:
          CheckpointCorruptError: there were checkpoints, but none verifies.
        """
        steps = self.all_steps()
        failed = []
        for step in reversed(steps):
            try:
                record = self.read_record(step)
                if check is not None:
                    check(record)
                state = self.restore(step, like_of(record), record)
            except CheckpointCorruptError as error:
                failed.append(step)
                older = [s for s in steps if s < step]
                then = f"falling back to step {older[-1]}" if older else "no older checkpoint"
                self._report(f"{error}; moved to {CORRUPT_DIR}/, {then}")
                self._move_aside(step)
                continue
            return step, state, record
        if failed:
            raise CheckpointCorruptError(
                f"resume: no intact checkpoint in {self.directory} (steps {', '.join(map(str, sorted(failed)))} "
                f"failed verification; they are in {CORRUPT_DIR}/); start a new run with another --workdir"
            )
        return None

    def _move_aside(self, step: int) -> None:
        """Moves checkpoint ``step`` out of the managed directory (process 0 moves, every process reopens)."""
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target_dir = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            if os.path.exists(source):
                shutil.move(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxalgo-move-aside-{step}")
        self._manager.close()
        self._manager = self._open()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._quiet.remove()


def newest_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the newest checkpoint in ``directory`` whose record verifies, read from its file without
    jax or orbax (so that a command line can read a run's configuration before it starts jax); ``None`` when
    there is none."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    steps = sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(directory, str(step), "record", "metadata")
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("record_sha256") == _record_digest(record):
            return record
    return None


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
            + "). These fields change the model, the data or the estimator's maths, so they cannot change on "
            "resume; use a new --workdir, or leave them as they were."
        )


__all__ = [
    "CORRUPT_DIR",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "Checkpointer",
    "check_record_matches",
    "newest_record",
    "state_digests",
]
