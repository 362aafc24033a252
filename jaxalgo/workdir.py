"""A run directory's files other than checkpoints: the writer's lock and the metrics file.

- :class:`WorkdirLock`: one writer per run directory. An ``fcntl`` lock on ``WORKDIR/lock`` is held for the whole
  run; the file names the holder (pid, host, start time). The operating system drops the lock when the holder
  dies, however it dies, so a killed run's lock is taken over by the next run (which says so).
- :func:`read_metrics` and :func:`write_metrics`: ``metrics.jsonl`` read with errors naming the file and line, and
  written atomically (a temporary file renamed over the old one).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

LOCK_FILE = "lock"


class WorkdirBusyError(OSError):
    """Another live process holds the run directory's lock."""


class WorkdirLock:
    """The lock of one run directory (``with WorkdirLock(workdir) as lock: ...``).

    Attributes:
      path: the lock file.
      took_over: the holder a previous, no longer running process left in the lock file (``None`` if none).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock, or raises :class:`WorkdirBusyError` naming the live holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir: {os.path.dirname(self.path)!r} is in use by {describe_holder(holder)} (lock file "
                f"{self.path}); wait for that run to end, or choose another --workdir"
            ) from None
        previous = _read_holder(fd)
        self.took_over = previous or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and drops the lock (a no-op when not held)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {"unreadable": text[:80]}
    return holder if isinstance(holder, dict) else {"unreadable": text[:80]}


def describe_holder(holder: dict[str, Any]) -> str:
    """``process 123 on host h (since ...)`` for a holder recorded in a lock file."""
    if "pid" in holder:
        return f"process {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('started', '?')})"
    return "another process"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (blank lines skipped).

    Raises:
      ValueError: naming the file and the line number of a line that is not a JSON object.
    """
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"metrics: {os.fspath(path)} line {number} is not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"metrics: {os.fspath(path)} line {number} is not a JSON object")
            records.append(record)
    return records


def write_metrics(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replaces ``path`` by ``records``, one JSON line each, atomically."""
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_metrics(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Appends ``records`` to ``path``, one JSON line each."""
    with open(path, "a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


__all__ = [
    "LOCK_FILE",
    "WorkdirBusyError",
    "WorkdirLock",
    "append_metrics",
    "describe_holder",
    "read_metrics",
    "write_metrics",
]
