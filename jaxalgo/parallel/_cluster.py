"""Multi-process runs: where the processes come from, how they meet, and what happens when one of them is lost.

- **Who runs.** :func:`resolve_processes` turns explicit arguments (``--coordinator``, ``--num-processes``,
  ``--process-id``) and a scheduler's environment into a :class:`ProcessPlan`, refusing bad input in one line before
  anything starts. Under SLURM (``srun``) the number of processes is ``SLURM_NTASKS``, this process is
  ``SLURM_PROCID``, the coordinator is the first host of ``SLURM_STEP_NODELIST`` (compressed lists such as
  ``node[01-02]`` or ``a1,b[2-3]`` are expanded by :func:`expand_nodelist`) on a port derived from the job id
  exactly as jax's own SLURM detection derives it (:func:`slurm_port`), and the local devices follow from
  ``SLURM_LOCALID`` and the GPUs per task. Open MPI (``mpirun``, <= 4) is read the way jax reads it.
- **Meeting.** :func:`rendezvous` runs before ``jax.distributed.initialize``: process 0 listens on the coordinator's
  port, every other process checks in with its id, and when all are there the port is released to jax's
  coordination service. A process whose peers never arrive stops after the initialization timeout with a
  :class:`ClusterError` that names the processes that never connected (jax itself aborts after its timeout with a
  C++ stack trace that names nobody).
- **Losing a peer.** jax 0.10 notices a dead process only through its coordination service's heartbeats (100 s by
  default) and then aborts every other process from C++ (SIGABRT and a stack dump; a Python callback cannot replace
  that: the callback's ``absl::Status`` argument has no Python binding). When process 0, which hosts the service,
  dies, the others abort at once; a gloo collective whose peer dies mid-transfer aborts at once too
  (``gloo::EnforceNotMet``). Two answers:

  - the :class:`Watchdog` (every multi-process run) sends heartbeats through the coordination service's key-value
    store with a timeout shorter than the one jax is given, and ends the process with one line naming the lost
    process and the exit status :data:`PEER_LOST_EXIT_STATUS`; it catches silent (hung) processes;
  - :func:`run_supervised` (the ``jaxalgo`` command) forks after the rendezvous: the child trains, the parent keeps
    the rendezvous connections open, learns at once when any process ends, and reports it in one line even when the
    child was aborted from C++, whose output it holds back and drops (:class:`_StderrRelay`).

Checkpoints are written by orbax into a temporary directory that is renamed when complete, so stopping a process at
any moment leaves the last complete checkpoint resumable.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import pty
import re
import selectors
import signal
import socket
import sys
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax._src import distributed as _distributed

PEER_LOST_EXIT_STATUS = 69
"""Exit status of a process that stopped because another process of its run died, hung, or never connected
(``EX_UNAVAILABLE`` of ``sysexits.h``)."""

DEFAULT_PEER_TIMEOUT = 30.0
"""Seconds without a heartbeat after which a process of the run counts as lost."""

DEFAULT_INIT_TIMEOUT = 300.0
"""Seconds the processes of a run have to find each other (jax's own default)."""

_KEY_PREFIX = "jaxalgo/watchdog/"


class ClusterError(RuntimeError):
    """The processes of a multi-process run could not all meet, or disagree about the run; one line."""


@dataclasses.dataclass(frozen=True)
class ProcessPlan:
    """Who runs: this process, the number of processes and where they meet.

    Attributes:
      method: where the values came from: ``"single"``, ``"explicit"``, ``"slurm"`` or ``"openmpi"``.
      num_processes: processes of the run (1: no ``jax.distributed``).
      process_id: this process, ``0 <= process_id < num_processes``.
      coordinator: ``"host:port"`` of process 0 (``None`` for a single process).
      local_device_ids: the accelerators this process drives (``None``: every visible one).
    """

    method: str
    num_processes: int
    process_id: int
    coordinator: str | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def _coordinator(plan: ProcessPlan) -> str:
    """The ``host:port`` of a multi-process plan (a plan of one process has none)."""
    if plan.coordinator is None:
        raise ValueError(f"coordinator: a plan of {plan.num_processes} processes needs host:port, got None")
    return plan.coordinator


def parse_coordinator(address: str, *, name: str = "coordinator") -> tuple[str, int]:
    """``"host:port"`` (or ``"[ipv6]:port"``) -> ``(host, port)``, refusing anything else in one line.

    Raises:
      ValueError: naming ``name``, the value and what is allowed (a non-empty host, a port in 1..65535).
    """
    expected = "expected HOST:PORT such as 127.0.0.1:12345, with PORT in 1..65535"
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"{name}: {address!r} has no port; {expected}")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{name}: {address!r} is ambiguous; write an IPv6 host in brackets, e.g. [::1]:12345")
    if not host or any(c.isspace() for c in host) or "[" in host or "]" in host:
        raise ValueError(f"{name}: {address!r} has no valid host; {expected}")
    if not port_text.isdigit():
        raise ValueError(f"{name}: port {port_text!r} in {address!r} is not an integer; {expected}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{name}: port {port} in {address!r} is out of range; {expected}")
    return host, port


def check_resolvable(address: str, *, name: str = "coordinator") -> None:
    """Raises ValueError (one line) unless the host of ``address`` resolves to an address of this machine's network."""
    host, port = parse_coordinator(address, name=name)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ValueError(f"{name}: host {host!r} of {address!r} does not resolve ({error.strerror or error})") from None


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_brackets(inside: str, text: str, name: str) -> list[str]:
    """``"01-03,7"`` -> ``["01", "02", "03", "7"]`` (zero padding kept from the lower bound)."""
    values = []
    for part in inside.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"{name}: {text!r} has the range {part!r}; expected numbers such as 3 or 01-16")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"{name}: {text!r} has the range {part!r} whose end is below its start")
        width = len(low) if low.startswith("0") else 0
        values.extend(str(i).zfill(width) for i in range(int(low), int(high) + 1))
    return values


def _split_top_level(text: str, name: str) -> list[str]:
    """Splits at the commas that are not inside brackets, checking that brackets balance."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{name}: {text!r} has nested brackets")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{name}: {text!r} has a ']' without '['")
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{name}: {text!r} has a '[' without ']'")
    items.append(text[start:])
    return items


def expand_nodelist(text: str, *, name: str = "SLURM_STEP_NODELIST") -> list[str]:
    """SLURM's compressed host list -> the host names, in order.

    ``"node[01-03]"`` -> ``["node01", "node02", "node03"]``; ``"gpu[1-3,7]"`` -> ``gpu1 gpu2 gpu3 gpu7``;
    ``"a1,b[2-3]"`` -> ``a1 b2 b3``; several bracket groups in one name give every combination
    (``"r[1-2]n[1-2]"`` -> ``r1n1 r1n2 r2n1 r2n2``). Zero padding follows the lower bound (``[08-10]`` -> 08 09 10).

    Raises:
      ValueError: naming ``name`` and the list, for empty names, unbalanced brackets or malformed ranges.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name}: expected a host list such as node[01-04], got {text!r}")
    hosts: list[str] = []
    for item in _split_top_level(text.strip(), name):
        if not item.strip():
            raise ValueError(f"{name}: {text!r} has an empty host name")
        names = [""]
        for literal, inside in re.findall(r"([^\[]*)(\[[^\]]*\])?", item):
            names = [n + literal for n in names]
            if inside == "[]":
                raise ValueError(f"{name}: {text!r} has an empty range []")
            if inside:
                values = _expand_brackets(inside[1:-1], text, name)
                names = [n + v for n in names for v in values]
        hosts.extend(names)
    return hosts


def expand_tasks_per_node(text: str, *, name: str = "SLURM_STEP_TASKS_PER_NODE") -> list[int]:
    """SLURM's compressed tasks-per-node list -> one count per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    Raises:
      ValueError: naming ``name`` and the text when it is not counts with optional ``(xN)`` repeats.
    """
    counts = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"{name}: expected counts such as 2(x3),1, got {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_port(job_id: int | str) -> int:
    """The coordinator port of SLURM job ``job_id``: ``job_id % 4096 + 61440``, in 61440..65535.

    This is the formula of jax's own SLURM detection (``jax._src.clusters.slurm_cluster``), so a run started by
    jaxalgo and one started by ``jax.distributed.initialize()`` in the same job agree on the port. The range is
    above Linux's default ephemeral ports (32768..60999), where other programs rarely listen.
    """
    return int(job_id) % 2**12 + (65535 - 2**12 + 1)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {value!r}") from None


def _gpus_per_task(environ: Mapping[str, str]) -> int | None:
    """``SLURM_GPUS_PER_TASK`` (``"2"`` or typed ``"a100:2"``), else ``None``."""
    value = environ.get("SLURM_GPUS_PER_TASK", "").strip()
    if not value:
        return None
    match = re.fullmatch(r"(?:[\w.-]+:)?(\d+)", value)
    if match is None:
        raise ValueError(f"SLURM_GPUS_PER_TASK: expected a count such as 2 or a100:2, got {value!r}")
    return int(match.group(1))


def slurm_local_device_ids(environ: Mapping[str, str]) -> tuple[int, ...] | None:
    """The GPUs this SLURM task drives (``None``: all it sees), from ``SLURM_LOCALID`` and the GPUs per task.

    With ``--gpus-per-task=G`` task ``SLURM_LOCALID = l`` takes GPUs ``l*G .. l*G+G-1`` of its node, unless SLURM
    already bound it (``CUDA_VISIBLE_DEVICES`` lists just ``G`` devices: then it uses those). Without a GPU count,
    several tasks on one node take one GPU each (jax's own rule); a task alone on its node takes all of them.
    """
    local_id = _env_int(environ, "SLURM_LOCALID")
    if local_id is None:
        return None
    per_task = _gpus_per_task(environ)
    visible = [v for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if per_task is not None:
        if visible and len(visible) <= per_task:
            return None
        return tuple(range(local_id * per_task, (local_id + 1) * per_task))
    tasks_text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = _env_int(environ, "SLURM_NODEID") or 0
    if tasks_text:
        counts = expand_tasks_per_node(tasks_text)
        if node < len(counts) and counts[node] == 1:
            return None
    elif local_id == 0:
        return None
    return (local_id,)


def slurm_plan(environ: Mapping[str, str] | None = None) -> ProcessPlan | None:
    """The run of a SLURM job step with several tasks (``srun``), or ``None`` outside one.

    Reads ``SLURM_NTASKS`` (or ``SLURM_NPROCS``), ``SLURM_PROCID``, ``SLURM_JOB_ID``, the node list
    (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``) and the local devices
    (:func:`slurm_local_device_ids`).

    Raises:
      ValueError: naming the variable, when one that is needed is missing or malformed.
    """
    environ = os.environ if environ is None else environ
    tasks = _env_int(environ, "SLURM_NTASKS") or _env_int(environ, "SLURM_NPROCS")
    if tasks is None or tasks < 2 or "SLURM_PROCID" not in environ:
        return None
    process_id = _env_int(environ, "SLURM_PROCID")
    if process_id is None:
        raise ValueError("SLURM_PROCID: set but empty; start the job with srun")
    job_id = _env_int(environ, "SLURM_JOB_ID") or _env_int(environ, "SLURM_JOBID")
    if job_id is None:
        raise ValueError("SLURM_JOB_ID: not set, but SLURM_NTASKS and SLURM_PROCID are; start the job with srun")
    for variable in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(variable):
            first = expand_nodelist(environ[variable], name=variable)[0]
            break
    else:
        raise ValueError("SLURM_STEP_NODELIST: not set (nor SLURM_JOB_NODELIST); start the job with srun")
    host = f"[{first}]" if ":" in first else first
    return ProcessPlan("slurm", tasks, process_id, f"{host}:{slurm_port(job_id)}", slurm_local_device_ids(environ))


def openmpi_plan(environ: Mapping[str, str] | None = None) -> ProcessPlan | None:
    """The run of an Open MPI (<= 4) launch with several ranks (``mpirun``), or ``None`` outside one.

    The coordinator is the launcher's host from ``OMPI_MCA_orte_hnp_uri`` on a port derived from its job id, as
    jax's Open MPI detection computes them.
    """
    environ = os.environ if environ is None else environ
    size = _env_int(environ, "OMPI_COMM_WORLD_SIZE")
    if size is None or size < 2:
        return None
    uri = environ.get("OMPI_MCA_orte_hnp_uri", "")
    match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    if match is None:
        raise ValueError(f"OMPI_MCA_orte_hnp_uri: cannot read the launcher's address from {uri!r}")
    job = int(uri.split(".", 1)[0]) // 2**12 if uri.split(".", 1)[0].isdigit() else 0
    host = match.group(1) or f"[{match.group(2)}]"
    local = _env_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
    return ProcessPlan(
        "openmpi",
        size,
        _env_int(environ, "OMPI_COMM_WORLD_RANK") or 0,
        f"{host}:{slurm_port(job)}",
        None if local is None else (local,),
    )


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """``"slurm"`` or ``"openmpi"`` when this process was started by one with several tasks, else ``None``."""
    environ = os.environ if environ is None else environ
    tasks = _env_int(environ, "SLURM_NTASKS") or _env_int(environ, "SLURM_NPROCS") or 1
    if tasks > 1 and "SLURM_PROCID" in environ:
        return "slurm"
    if (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    return None


def resolve_processes(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    coordinator_name: str = "coordinator",
) -> ProcessPlan:
    """The :class:`ProcessPlan` of explicit values and, where they are not given, the scheduler's environment.

    Under SLURM or Open MPI the environment gives all three; an explicit ``coordinator`` replaces the derived one,
    and an explicit count or id must agree with the environment. Outside a scheduler, a run of several processes
    needs all three; ``num_processes=1`` alone is a single process.

    Args:
      coordinator, num_processes, process_id: the explicit values (``None``: not given).
      environ: the environment to read (default ``os.environ``).
      coordinator_name: how errors name the coordinator argument.

    Raises:
      ValueError: one line naming the argument, its value and what is allowed.
    """
    environ = os.environ if environ is None else environ
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise ValueError(f"num_processes: must be an integer >= 1, got {num_processes}")
    if process_id is not None and (isinstance(process_id, bool) or process_id < 0):
        raise ValueError(f"process_id: must be an integer >= 0, got {process_id}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"process_id: must be in [0, {num_processes}), got {process_id}")
    if coordinator is not None:
        parse_coordinator(coordinator, name=coordinator_name)
    method = detect_cluster(environ)
    cluster = slurm_plan(environ) if method == "slurm" else openmpi_plan(environ) if method == "openmpi" else None
    if cluster is not None:
        source = "SLURM_NTASKS" if method == "slurm" else "OMPI_COMM_WORLD_SIZE"
        if num_processes is not None and num_processes != cluster.num_processes:
            raise ValueError(
                f"num_processes: {num_processes} is given but {source} says {cluster.num_processes}; drop the flag"
            )
        if process_id is not None and process_id != cluster.process_id:
            raise ValueError(
                f"process_id: {process_id} is given but the {method} environment says {cluster.process_id}"
            )
        plan = dataclasses.replace(cluster, coordinator=coordinator or cluster.coordinator)
    elif num_processes == 1 and process_id in (None, 0):
        return ProcessPlan("single", 1, 0)
    else:
        explicit = {coordinator_name: coordinator, "num_processes": num_processes, "process_id": process_id}
        given = {k for k, v in explicit.items() if v is not None}
        if not given:
            return ProcessPlan("single", 1, 0)
        if given != set(explicit):
            missing = sorted(set(explicit) - given)
            raise ValueError(
                f"{', '.join(missing)}: needed together with {', '.join(sorted(given))} (give all three, or start "
                "the processes with srun or mpirun)"
            )
        assert num_processes is not None and process_id is not None  # all three are given (checked above)
        plan = ProcessPlan("explicit", num_processes, process_id, coordinator)
    if not 0 <= plan.process_id < plan.num_processes:
        raise ValueError(f"process_id: must be in [0, {plan.num_processes}), got {plan.process_id}")
    if plan.num_processes == 1:
        return ProcessPlan("single", 1, 0)
    return plan


def format_ids(ids: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    ids = sorted(set(ids))
    runs: list[str] = []
    start = prev = None
    for i in [*ids, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ", ".join(runs)


def _processes(ids: Sequence[int]) -> str:
    return f"process {format_ids(ids)}" if len(ids) == 1 else f"processes {format_ids(ids)}"


# ---- the rendezvous --------------------------------------------------------------------------------------------


class _Link:
    """A connection to another process of the run carrying one JSON object per line (a protocol of jaxalgo's own:
    ``{"jaxalgo": 1, ...}``)."""

    def __init__(self, sock: socket.socket, peer: int | None = None):
        self.sock, self.peer, self._buffer = sock, peer, b""

    def send(self, **message: Any) -> bool:
        """Sends ``message``; False if the connection is gone."""
        try:
            self.sock.sendall((json.dumps({"jaxalgo": 1, **message}) + "\n").encode())
        except OSError:
            return False
        return True

    def _pop(self) -> dict[str, Any] | None:
        if b"\n" not in self._buffer:
            if len(self._buffer) > 65536:
                raise ValueError("not a jaxalgo peer")
            return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line.decode())
        if not isinstance(message, dict) or message.get("jaxalgo") != 1:
            raise ValueError("not a jaxalgo peer")
        return message

    def receive(self, deadline: float, clock: Callable[[], float]) -> dict[str, Any]:
        """The next message before ``deadline`` (TimeoutError if late, ValueError if the peer is not ours or left)."""
        while (message := self._pop()) is None:
            remaining = deadline - clock()
            if remaining <= 0:
                raise TimeoutError("no answer")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise ValueError("connection closed")
            self._buffer += chunk
        return message

    def poll(self) -> tuple[list[dict[str, Any]], bool]:
        """The messages that have arrived, without waiting, and whether the connection has closed."""
        closed = False
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                self._buffer += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            closed = True
        messages = []
        try:
            while (message := self._pop()) is not None:
                messages.append(message)
        except ValueError:
            closed = True
        return messages, closed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _listen(port: int, address: str) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as error:
        raise ValueError(
            f"coordinator: process 0 cannot listen on port {port} of {address!r} ({error.strerror or error}); "
            "choose a free port with --coordinator HOST:PORT"
        ) from None


def _host(plan: ProcessPlan, timeout: float, clock: Callable[[], float]) -> dict[int, _Link]:
    """Process 0: waits for every other process to check in, then tells them all to go (or who is missing)."""
    _, port = parse_coordinator(_coordinator(plan))
    deadline = clock() + timeout
    server = _listen(port, _coordinator(plan))
    peers: dict[int, _Link] = {}
    problem = None
    try:
        server.settimeout(0.2)
        while len(peers) < plan.num_processes - 1 and problem is None and clock() < deadline:
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            link = _Link(sock)
            try:
                hello = link.receive(min(deadline, clock() + 5.0), clock)
                peer = int(hello["process_id"])
            except (OSError, ValueError, KeyError, TypeError):
                link.close()  # not one of ours (a port scanner, another program): ignored
                continue
            count = hello.get("num_processes")
            if count != plan.num_processes:
                problem = (
                    f"num_processes: process {peer} was started with {count} processes, process 0 with "
                    f"{plan.num_processes}; start every process with the same --num-processes"
                )
            elif peer in peers or not 0 < peer < plan.num_processes:
                problem = (
                    f"process_id: two processes claim id {peer}"
                    if peer in peers
                    else f"process_id: a process claims id {peer}, outside 1..{plan.num_processes - 1}"
                ) + "; give each process its own --process-id"
            if problem is not None:
                link.send(error=problem)
                link.close()
                break
            link.peer = peer
            peers[peer] = link
        missing = sorted(set(range(1, plan.num_processes)) - set(peers))
        if problem is None and missing:
            problem = (
                f"{_processes(missing)} of {plan.num_processes} never connected to the coordinator "
                f"{plan.coordinator} within {timeout:g} s; start every process with the same --coordinator and "
                f"--num-processes (ids 0-{plan.num_processes - 1}), or raise --init-timeout"
            )
        for link in peers.values():
            if problem:
                link.send(error=problem)
            else:
                link.send(go=True)
    finally:
        server.close()  # the port is jax's from now on; the links themselves stay open
        if problem is not None:
            for link in peers.values():
                link.close()
    if problem is not None:
        raise ClusterError(problem)
    return peers


def _join(plan: ProcessPlan, timeout: float, clock: Callable[[], float]) -> dict[int, _Link]:
    """Process k > 0: checks in with process 0 and waits for the word to go."""
    host, port = parse_coordinator(_coordinator(plan))
    deadline = clock() + timeout
    while clock() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - clock())))
        except OSError:
            time.sleep(0.2)
            continue
        link = _Link(sock, peer=0)
        try:
            link.send(process_id=plan.process_id, num_processes=plan.num_processes)
            answer = link.receive(deadline + 3.0, clock)  # process 0 answers at its own deadline at the latest
        except TimeoutError:
            link.close()
            break
        except (OSError, ValueError):
            link.close()
            time.sleep(0.2)  # something else holds the port, or process 0 restarted: try again
            continue
        if answer.get("go"):
            return {0: link}
        link.close()
        raise ClusterError(str(answer.get("error", "process 0 refused this process")))
    raise ClusterError(
        f"the coordinator {plan.coordinator} (process 0) did not let process {plan.process_id} of "
        f"{plan.num_processes} start within {timeout:g} s: process 0 never answered or other processes never "
        "connected (see process 0's message); start every process, or raise --init-timeout"
    )


def rendezvous(
    plan: ProcessPlan, timeout: float, *, keep: bool = False, clock: Callable[[], float] = time.monotonic
) -> dict[int, _Link]:
    """Brings the processes of ``plan`` together before ``jax.distributed`` starts, or stops within ``timeout``.

    Process 0 listens on the coordinator's port; every other process connects, sends its id and the number of
    processes it was started with, and waits. When all have checked in, process 0 answers "go" and stops
    listening, so that jax's coordination service can take the port. Nothing is sent but ids and counts.

    Args:
      plan: the processes (a single-process plan returns at once).
      timeout: seconds every process has to check in.
      keep: keep the connections open and return them (process 0: one per peer; the others: one to process 0),
        as the supervisor of the command line does to learn at once when a process ends; else they are closed.
      clock: a monotonic clock, in seconds.

    Raises:
      ClusterError: not every process checked in within ``timeout`` seconds (process 0 names the missing ones and
        tells the others), or two processes claim the same id, or they disagree on the number of processes.
      ValueError: process 0 cannot listen on the coordinator's port.
    """
    if not timeout > 0:
        raise ValueError(f"init_timeout: must be > 0 seconds, got {timeout}")
    if not plan.multi_process:
        return {}
    links = (_host if plan.process_id == 0 else _join)(plan, timeout, clock)
    if not keep:
        for link in links.values():
            if plan.process_id == 0:  # the peers close first, so that the port is not left in TIME_WAIT here
                link.sock.settimeout(2.0)
                with contextlib.suppress(OSError):
                    link.sock.recv(1)
            link.close()
        return {}
    return links


# ---- the watchdog ----------------------------------------------------------------------------------------------


def _write_line(text: str) -> None:
    """Writes one line to stderr without Python's buffers or locks (the main thread may hold them)."""
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass


def _stop_process(message: str, status: int = PEER_LOST_EXIT_STATUS) -> None:
    _write_line(message)
    os._exit(status)


class Watchdog:
    """Heartbeats between the processes of a run, through the ``jax.distributed`` key-value store.

    Every ``interval`` seconds each process writes a counter under ``jaxalgo/watchdog/beat/<id>`` and reads the
    others'. A peer whose counter has not moved for ``timeout`` seconds (measured on this process's own clock) is
    lost; so is the coordinator when the store itself has not answered for ``timeout`` seconds. Then ``on_lost``
    receives one line naming the lost processes; the default prints it and ends the process with
    :data:`PEER_LOST_EXIT_STATUS` (``os._exit``: a thread blocked in a collective with a dead peer never returns).

    A process that stops normally calls :meth:`stop` (or just exits: the start-up registers it with ``atexit``),
    which ends the judging but keeps the heartbeat going until ``jax.distributed`` shuts down, so that peers still
    finishing their work do not count it as lost.

    Args:
      client: the distributed runtime client (``key_value_set``, ``key_value_dir_get``).
      process_id, num_processes: this process and the size of the run.
      timeout: seconds without a heartbeat after which a peer is lost.
      interval: seconds between heartbeats (default ``min(1, timeout / 5)``).
      on_lost: called with the message (and must not return to the watchdog's loop); default: print and exit.
      alive: ``alive()`` is False once the client is shut down (the heartbeat then stops quietly).
      clock: a monotonic clock, in seconds.
    """

    def __init__(
        self,
        client: Any,
        process_id: int,
        num_processes: int,
        timeout: float,
        *,
        interval: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        alive: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if timeout <= 0:
            raise ValueError(f"peer_timeout: must be > 0 seconds, got {timeout}")
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout = float(timeout)
        self.interval = float(interval) if interval is not None else min(1.0, self.timeout / 5)
        self.on_lost = on_lost or _stop_process
        self.alive = alive or (lambda: True)
        self.clock = clock
        now = clock()
        self._seen: dict[int, tuple[str | None, float]] = {
            p: (None, now) for p in range(num_processes) if p != process_id
        }
        self._store_answered = now
        self._judging = threading.Event()
        self._judging.set()
        self._closed = threading.Event()
        self._count = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def beat(self) -> None:
        """One heartbeat: writes this process's counter and records which peers' counters moved."""
        self._count += 1
        self.client.key_value_set(f"{_KEY_PREFIX}beat/{self.process_id}", str(self._count), allow_overwrite=True)
        entries = self.client.key_value_dir_get(f"{_KEY_PREFIX}beat/")
        now = self.clock()
        with self._lock:
            self._store_answered = now
            for key, value in entries:
                try:
                    peer = int(key.rstrip("/").rsplit("/", 1)[-1])
                except ValueError:
                    continue
                if peer in self._seen and self._seen[peer][0] != value:
                    self._seen[peer] = (value, now)

    def verdict(self) -> str | None:
        """The message naming the lost processes, or ``None`` while every peer is alive."""
        now = self.clock()
        with self._lock:
            store_silent = now - self._store_answered
            silent = {p: now - t for p, (_, t) in self._seen.items()}
        lost = sorted(p for p, s in silent.items() if s > self.timeout)
        if self.process_id != 0 and store_silent > self.timeout:
            return (
                f"jaxalgo: error: lost the coordinator (process 0 of {self.num_processes}): its key-value store has "
                f"not answered for {store_silent:.0f} s; process {self.process_id} stops (exit status "
                f"{PEER_LOST_EXIT_STATUS}). Resume from the last checkpoint with --resume once every process runs."
            )
        if not lost:
            return None
        return (
            f"jaxalgo: error: lost {_processes(lost)} of {self.num_processes}: no heartbeat for "
            f"{max(silent[p] for p in lost):.0f} s (--peer-timeout {self.timeout:g}; it died, hung or is "
            f"unreachable); process {self.process_id} stops (exit status {PEER_LOST_EXIT_STATUS}). Resume from the "
            "last checkpoint with --resume once every process runs."
        )

    def _beat_loop(self) -> None:
        while not self._closed.is_set() and self.alive():
            try:
                self.beat()
            except Exception:  # the store did not answer this time: the verdict counts how long it has been silent
                if not self.alive():
                    return
            self._closed.wait(self.interval)

    def _judge_loop(self) -> None:
        while not self._closed.wait(self.interval):
            if not self.alive():
                return
            if not self._judging.is_set():
                continue
            message = self.verdict()
            if message is not None and self._judging.is_set():
                self._judging.clear()
                self.on_lost(message)
                return

    def start(self) -> Watchdog:
        """Starts the heartbeat and the judge as daemon threads."""
        for target, name in ((self._beat_loop, "beat"), (self._judge_loop, "judge")):
            thread = threading.Thread(target=target, name=f"jaxalgo-watchdog-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stops judging (this process is finishing); the heartbeat goes on until the client is shut down."""
        self._judging.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Stops both threads and waits for them."""
        self._judging.clear()
        self._closed.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)


def deadline_guard(seconds: float, message: str) -> threading.Event:
    """Ends the process with ``message`` and :data:`PEER_LOST_EXIT_STATUS` unless the returned event is set within
    ``seconds`` (for a blocking call such as ``jax.distributed.initialize`` that would otherwise abort from C++)."""
    done = threading.Event()

    def guard():
        if not done.wait(seconds):
            _stop_process(message)

    threading.Thread(target=guard, name="jaxalgo-deadline", daemon=True).start()
    return done


def jax_heartbeat_seconds(peer_timeout: float) -> int:
    """The heartbeat timeout jax is given: ``2 * peer_timeout + 10`` s, so that the :class:`Watchdog` (which stops
    after ``peer_timeout``) always speaks before jax aborts from C++ (jax notices a dead peer after 70-100% of its
    timeout)."""
    return math.ceil(2 * peer_timeout) + 10


def start_distributed(plan: ProcessPlan, *, init_timeout: float, peer_timeout: float, meet: bool = True) -> Watchdog:
    """Meets the other processes, starts ``jax.distributed`` and the :class:`Watchdog`; returns the watchdog.

    Args:
      plan: the processes (several).
      init_timeout: seconds the processes have to find each other.
      peer_timeout: seconds of silence after which a peer is lost.
      meet: run the :func:`rendezvous` first (False when it has already happened, in the command line's
        supervisor).

    Raises:
      ValueError: the coordinator's host does not resolve, or process 0 cannot listen on its port.
      ClusterError: not every process checked in within ``init_timeout`` seconds.
    """
    if not plan.multi_process:
        raise ValueError(f"plan: expected several processes, got num_processes={plan.num_processes}")
    if not peer_timeout > 0:
        raise ValueError(f"peer_timeout: must be > 0 seconds, got {peer_timeout}")
    started = time.monotonic()
    if meet:
        check_resolvable(_coordinator(plan))
        rendezvous(plan, init_timeout)
    # Every process has checked in; jax's connect takes well under a second unless one dies right now.
    remaining = max(10.0, init_timeout - (time.monotonic() - started))
    connected = deadline_guard(
        remaining,
        f"jaxalgo: error: jax.distributed did not start within {remaining:.0f} s although all {plan.num_processes} "
        f"processes met at {plan.coordinator} (did one die?); process {plan.process_id} stops (exit status "
        f"{PEER_LOST_EXIT_STATUS})",
    )
    jax.distributed.initialize(
        coordinator_address=plan.coordinator,
        num_processes=plan.num_processes,
        process_id=plan.process_id,
        local_device_ids=None if plan.local_device_ids is None else list(plan.local_device_ids),
        cluster_detection_method="deactivate",
        initialization_timeout=math.ceil(remaining) + 15,
        heartbeat_timeout_seconds=jax_heartbeat_seconds(peer_timeout),
    )
    connected.set()
    client = _distributed.global_state.client
    watchdog = Watchdog(
        client,
        plan.process_id,
        plan.num_processes,
        peer_timeout,
        alive=lambda: _distributed.global_state.client is client,
    ).start()
    atexit.register(watchdog.stop)  # runs before jax's own exit hook, which shuts jax.distributed down
    return watchdog


# ---- the supervisor of the command line ------------------------------------------------------------------------

# Lines written by native code: absl / glog log lines, their check-failure stack traces, and C++ terminate messages.
_NATIVE_LINE = re.compile(
    rb"^\r?(?:[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^\]\s]+:\d+\]|\*\*\* |terminate called |  what\(\): "
    rb"|    @ +0x|\[enforce fail)"
)
_FATAL_LINE = re.compile(rb"^\r?(?:F\d{4} |\*\*\* Check failure|terminate called )")
# The first line of a Python traceback: a worker whose collective failed because a peer died raises (gloo's
# "Connection closed by peer") and prints one, a moment before its supervisor hears of the lost peer.
_TRACEBACK_LINE = re.compile(rb"^\r?Traceback \(most recent call last\):")


class _StderrRelay:
    """Copies a worker's stderr to this process's stderr, holding native (C++) output back for a moment.

    A native log or crash line or a Python traceback, and whatever follows it, waits up to ``hold`` seconds (a fatal
    one: until the worker ends), so that the crash output of a worker that died only because a peer was lost can be
    dropped; everything else passes at once, progress bars (which end in a carriage return) included.
    """

    def __init__(self, out_fd: int = 2, *, hold: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.out_fd, self.hold, self.clock = out_fd, hold, clock
        self.held: list[bytes] = []
        self.since = 0.0
        self.fatal = False
        self.partial = b""
        self.partial_since: float | None = None

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.out_fd, view) :]
            except InterruptedError:
                continue
            except OSError:
                return

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(lines):
            self.partial_since = None
        for line in lines:
            line += b"\n"
            if self.held or _NATIVE_LINE.match(line) or _TRACEBACK_LINE.match(line):
                if not self.held:
                    self.since = self.clock()
                self.held.append(line)
                self.fatal = self.fatal or bool(_FATAL_LINE.match(line))
            else:
                self._write(line)
        if self.partial and not self.held:
            if self.partial.startswith(b"\r") and not _NATIVE_LINE.match(self.partial):
                self._write(self.partial)  # a progress bar's carriage-return update
                self.partial = b""
            elif self.partial_since is None:
                self.partial_since = self.clock()  # native code writes a line in pieces: wait for its end

    def tick(self) -> None:
        """Lets held output through once it has waited ``hold`` seconds (unless it is fatal)."""
        now = self.clock()
        if self.held and not self.fatal and now - self.since > self.hold:
            self.release()
        elif self.partial and not self.held and self.partial_since is not None and now - self.partial_since > self.hold:
            self._write(self.partial)
            self.partial, self.partial_since = b"", None

    def release(self) -> None:
        self._write(b"".join(self.held) + self.partial)
        self.held.clear()
        self.partial, self.partial_since, self.fatal = b"", None, False

    def drop(self) -> None:
        self.held.clear()
        self.partial, self.partial_since, self.fatal = b"", None, False


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Supervisor:
    """Watches this process's worker and, over the rendezvous links, the other processes' supervisors.

    The links carry heartbeats and one report per process whose worker ended (``exit``: its status or the signal
    that killed it); process 0 relays every report to the others and announces what it alone can see (``lost``: a
    link that closed without a report, or fell silent for ``peer_timeout``). When another process is lost, the
    worker is killed and one line names the lost process (:data:`PEER_LOST_EXIT_STATUS`). When the worker itself
    fails, killed by a signal or ended by an exception, the supervisor waits a moment for news of a lost peer (a
    worker dies from C++, SIGABRT, when a collective or jax's coordination service loses a peer, or raises from a
    gloo collective whose peer has gone): with such news it reports the peer, without it the worker's own output and
    its status (``128 + signal`` for a signal).
    """

    SETTLE = 0.5  # seconds to wait, after a first cause, for a likelier root cause (a kill before an abort)

    def __init__(
        self,
        plan: ProcessPlan,
        links: dict[int, _Link],
        child: int,
        stderr_fd: int,
        *,
        peer_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.plan, self.links, self.child, self.stderr_fd = plan, dict(links), child, stderr_fd
        self.me = plan.process_id
        self.peer_timeout, self.clock = float(peer_timeout), clock
        self.interval = min(1.0, self.peer_timeout / 5)
        self.relay = _StderrRelay(clock=clock)
        now = clock()
        self.heard = dict.fromkeys(self.links, now)
        self.finished: dict[int, dict[str, Any]] = {}
        self.causes: list[tuple[int, float, int, str]] = []  # (priority, time, process, reason)
        self.ended_early: dict[int, tuple[float, Any]] = {}
        self.child_result: tuple[int | None, str | None, int] | None = None
        self.child_ended = 0.0
        self.stderr_open = True

    def _cause(self, process: int, reason: str, priority: int = 0) -> None:
        if process != self.me and all(c[2] != process for c in self.causes):
            self.causes.append((priority, self.clock(), process, reason))

    def _broadcast(self, exclude: int | None = None, **message: Any) -> None:
        for peer, link in self.links.items():
            if peer != exclude:
                link.send(**message)

    def _on_message(self, link: _Link, message: dict[str, Any]) -> None:
        assert link.peer is not None  # the supervisor's links are registered under their peer
        self.heard[link.peer] = self.clock()
        if "exit" in message:
            report = message["exit"]
            process = int(report["process"])
            self.finished[process] = report
            if self.me == 0:
                self._broadcast(exclude=link.peer, exit=report)
            if report.get("lost"):  # it stopped because another process was lost
                message = {"lost": report["lost"]}
            elif report.get("signal"):
                likely_a_consequence = report["signal"] == "SIGABRT"
                self._cause(process, f"it was killed by {report['signal']}", 1 if likely_a_consequence else 0)
            elif self.child_result is None:
                self.ended_early[process] = (self.clock() + self.peer_timeout, report.get("code"))
        if "lost" in message:
            lost = message["lost"]
            self._cause(int(lost["process"]), str(lost["reason"]), int(lost.get("priority", 0)))

    def _on_closed(self, link: _Link) -> None:
        assert link.peer is not None  # the supervisor's links are registered under their peer
        self.links.pop(link.peer, None)
        link.close()
        if link.peer not in self.finished:
            self._cause(link.peer, "it ended without a word (killed, or its machine or the network failed)")

    def _read_stderr(self) -> None:
        try:
            data = os.read(self.stderr_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # a pseudo-terminal whose worker has gone
            data = b""
        if data:
            self.relay.feed(data)
        else:
            self.stderr_open = False

    def _drain_stderr(self) -> None:
        os.set_blocking(self.stderr_fd, False)
        while self.stderr_open:
            try:
                data = os.read(self.stderr_fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.stderr_open = False
                return
            self.relay.feed(data)

    def _reap(self) -> None:
        pid, status = os.waitpid(self.child, os.WNOHANG)
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        signame = _signal_name(-code) if code < 0 else None
        self.child_result = (None if code < 0 else code, signame, code)
        self.child_ended = self.clock()
        self._broadcast(exit={"process": self.me, "code": self.child_result[0], "signal": signame})

    def _lost_line(self, process: int, reason: str) -> str:
        return (
            f"jaxalgo: error: lost process {process} of {self.plan.num_processes}: {reason}; process {self.me} stops "
            f"(exit status {PEER_LOST_EXIT_STATUS}). Resume from the last checkpoint with --resume once every "
            "process runs."
        )

    def _report_stop(self) -> tuple[int, str]:
        """The root cause (a kill before an abort, then the earliest), told to every other process."""
        priority, _, process, reason = min(self.causes)
        lost = {"process": process, "reason": reason, "priority": priority}
        self._broadcast(exit={"process": self.me, "code": PEER_LOST_EXIT_STATUS, "signal": None, "lost": lost})
        return process, reason

    def _decide(self) -> int | None:
        now = self.clock()
        settled = bool(self.causes) and now - min(c[1] for c in self.causes) >= self.SETTLE
        if self.child_result is None:
            if not settled:
                return None
            process, reason = self._report_stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
            os.waitpid(self.child, 0)
            self._drain_stderr()
            self.relay.drop()
            _write_line(self._lost_line(process, reason))
            return PEER_LOST_EXIT_STATUS
        code, signame, raw = self.child_result
        if signame is None and code == 0:  # the worker finished: its output and its status stand
            self._drain_stderr()
            self.relay.release()
            return code
        # The worker failed, by an exception (a collective whose peer died raises) or a signal: a lost peer explains
        # it when news of one arrives within a moment; without such news the worker's own output and status stand.
        if settled:
            process, reason = self._report_stop()
            self._drain_stderr()
            self.relay.drop()
            _write_line(self._lost_line(process, reason))
            return PEER_LOST_EXIT_STATUS
        if self.causes or now - self.child_ended < min(3.0, self.peer_timeout):
            return None  # news of a lost peer may still be on its way
        self._drain_stderr()
        crash_output = bool(self.relay.held)
        self.relay.release()
        if signame is None:
            return code
        _write_line(f"jaxalgo: error: process {self.me} was killed by {signame}{' (see above)' * crash_output}")
        return 128 - raw

    def run(self) -> int:
        """Supervises until the worker has ended; returns this process's exit status."""
        selector = selectors.DefaultSelector()
        selector.register(self.stderr_fd, selectors.EVENT_READ, None)
        for link in self.links.values():
            selector.register(link.sock, selectors.EVENT_READ, link)
        next_beat = 0.0
        while True:
            for key, _ in selector.select(timeout=0.1):
                if key.data is None:
                    self._read_stderr()
                    if not self.stderr_open:
                        selector.unregister(self.stderr_fd)
                    continue
                messages, closed = key.data.poll()
                for message in messages:
                    self._on_message(key.data, message)
                if closed:
                    selector.unregister(key.data.sock)
                    self._on_closed(key.data)
            now = self.clock()
            if self.child_result is None:  # once the worker has ended, _decide lets its held output through or not
                self.relay.tick()
            if now >= next_beat:
                self._broadcast(beat=True)
                next_beat = now + self.interval
            for peer, heard in list(self.heard.items()):
                if peer in self.links and peer not in self.finished and now - heard > self.peer_timeout:
                    self._cause(
                        peer,
                        f"no heartbeat for {now - heard:.0f} s (--peer-timeout {self.peer_timeout:g}; it died, hung or "
                        "is unreachable)",
                    )
            for process, (deadline, code) in self.ended_early.items():
                if self.child_result is None and now > deadline:
                    self._cause(process, f"it ended with exit status {code} while this process still ran", 1)
            if self.child_result is None:
                self._reap()
            status = self._decide()
            if status is not None:
                for link in self.links.values():
                    link.close()
                return status


def _watch_supervisor(supervisor: int) -> None:
    """In the worker: ends the process when its supervisor is gone (the worker would otherwise be orphaned)."""
    while os.getppid() == supervisor:
        time.sleep(0.5)
    os._exit(PEER_LOST_EXIT_STATUS)


def run_supervised(plan: ProcessPlan, *, init_timeout: float, peer_timeout: float) -> None:
    """The command line's way to run one process of a multi-process run; returns only in the worker.

    After the :func:`rendezvous` (which keeps its links open) this process forks: the child (the worker) starts
    ``jax.distributed`` and returns to train; the parent supervises it (:class:`_Supervisor`), relaying its stderr
    and forwarding SIGTERM, SIGUSR1 and SIGHUP to it, and ends with its exit status, or with
    :data:`PEER_LOST_EXIT_STATUS` and one line when another process is lost. A separate supervisor is needed
    because jax and gloo end a process from C++ the moment a peer or the coordinator disappears (SIGABRT, with a
    stack dump), before any Python code of that process can speak.

    Raises:
      ValueError: the coordinator's host does not resolve, or process 0 cannot listen on its port.
      ClusterError: not every process checked in within ``init_timeout`` seconds.
    """
    if not plan.multi_process:
        raise ValueError(f"plan: expected several processes, got num_processes={plan.num_processes}")
    check_resolvable(_coordinator(plan))
    started = time.monotonic()
    links = rendezvous(plan, init_timeout, keep=True)
    remaining = init_timeout - (time.monotonic() - started)
    if os.isatty(2):  # a pseudo-terminal keeps the worker's progress bar
        read_fd, write_fd = pty.openpty()
        with contextlib.suppress(OSError):
            fcntl.ioctl(write_fd, termios.TIOCSWINSZ, fcntl.ioctl(2, termios.TIOCGWINSZ, b"\0" * 8))
    else:
        read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    supervisor = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        for link in links.values():
            link.close()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        threading.Thread(target=_watch_supervisor, args=(supervisor,), name="jaxalgo-supervisor", daemon=True).start()
        start_distributed(plan, init_timeout=remaining, peer_timeout=peer_timeout, meet=False)
        return
    os.close(write_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to the worker as well

    def forward(signum: int, frame: Any) -> None:
        del frame
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, forward)
    status = _Supervisor(plan, links, child, read_fd, peer_timeout=peer_timeout).run()
    os._exit(status)


__all__ = [
    "DEFAULT_INIT_TIMEOUT",
    "DEFAULT_PEER_TIMEOUT",
    "PEER_LOST_EXIT_STATUS",
    "ClusterError",
    "ProcessPlan",
    "Watchdog",
    "check_resolvable",
    "deadline_guard",
    "detect_cluster",
    "expand_nodelist",
    "expand_tasks_per_node",
    "format_ids",
    "jax_heartbeat_seconds",
    "openmpi_plan",
    "parse_coordinator",
    "rendezvous",
    "resolve_processes",
    "run_supervised",
    "slurm_local_device_ids",
    "slurm_plan",
    "slurm_port",
    "start_distributed",
]
