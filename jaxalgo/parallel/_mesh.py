"""Device meshes with named hierarchy levels, array placement on them, and the ``jax.distributed`` start-up.

A data-parallel mesh has one axis per level of the hardware hierarchy: ``("node", "local")`` by default, where
``node`` runs across machines (slow network) and ``local`` across the devices of one machine (fast links). Devices
are ordered by ``(process_index, id)`` so that, in a multi-process run with one process per machine, each row of
the mesh (one ``node`` coordinate) is exactly one process's devices. Any other names work the same way (AB-training
uses ``("group", "dp")``): the first axis is always the outermost (cross-node) level.

Meshes use ``Explicit`` axes (jax's default), so arrays are placed with :func:`replicate` and :func:`shard` (or
``jax.device_put`` with a ``NamedSharding``) before they enter a step; both work unchanged with several processes,
as long as every process passes the same global values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalgo.parallel import _cluster

NODE_AXIS = "node"
LOCAL_AXIS = "local"
DATA_AXES: tuple[str, str] = (NODE_AXIS, LOCAL_AXIS)


def parse_mesh_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"2x4"`` -> ``(2, 4)``; a sequence of positive integers is returned as a tuple.

    Raises:
      ValueError: naming ``mesh`` if the text is not positive integers joined by ``x``.
    """
    if isinstance(text, str):
        parts = text.lower().replace("*", "x").split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"mesh: expected sizes joined by 'x' such as '2x4', got {text!r}") from None
    else:
        shape = tuple(int(p) for p in text)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"mesh: every size must be an integer >= 1, got {text!r}")
    return shape


def make_mesh(
    shape: str | Sequence[int] | None = None,
    axis_names: Sequence[str] = DATA_AXES,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes) with one named axis per hierarchy level.

    Args:
      shape: sizes per axis, e.g. ``(2, 4)`` or ``"2x4"``; the product must equal the number of devices. Default:
        ``(process_count, devices per process)``, i.e. one ``node`` per process.
      axis_names: one name per axis, outermost (cross-node) first.
      devices: the devices to use; they are ordered by ``(process_index, id)``.

    Returns:
      A ``jax.sharding.Mesh`` with ``Explicit`` axes.

    Raises:
      ValueError: the shape does not match the device count or the names, naming both.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    axis_names = tuple(axis_names)
    if shape is None:
        processes = len({d.process_index for d in devices})
        shape = (processes, len(devices) // processes) if len(axis_names) == 2 else (len(devices),)
    shape = parse_mesh_shape(shape)
    if len(set(axis_names)) != len(axis_names) or not all(isinstance(n, str) and n for n in axis_names):
        raise ValueError(f"axis_names: expected distinct non-empty strings, got {axis_names!r}")
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh: shape {shape} has {len(shape)} axes but axis_names {axis_names} has {len(axis_names)}")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh: shape {'x'.join(map(str, shape))} needs {int(np.prod(shape))} devices, but {len(devices)} "
            f"are available; choose sizes whose product is {len(devices)} (on CPU, simulate more devices with "
            "--devices N or XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    axis_types = (jax.sharding.AxisType.Explicit,) * len(shape)
    return Mesh(grid.reshape(shape), axis_names, axis_types=axis_types)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (same value everywhere)."""
    return place(tree, mesh, P())


def shard(tree: Any, mesh: Mesh, axes: str | Sequence[str] | None = None) -> Any:
    """Splits the leading dimension of every leaf over the mesh axes ``axes`` (default: all, outermost first)."""
    axes = tuple(mesh.axis_names) if axes is None else axes
    return place(tree, mesh, P(axes))


def place(tree: Any, mesh: Mesh, spec: P) -> Any:
    """Places every leaf with ``NamedSharding(mesh, spec)``; works in single- and multi-process runs.

    Every process must pass the same global values (each keeps only the pieces its devices hold). PRNG key arrays
    are placed through their key data. The result never aliases the input, so it can be donated to a step.
    """
    sharding = NamedSharding(mesh, spec)

    def put(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=impl)
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if jax.process_count() == 1:
            # a fresh copy: the placed array may be donated to a step without deleting the caller's array
            return jax.device_put(jnp.array(leaf, copy=True), sharding)
        host = np.asarray(jax.device_get(leaf) if isinstance(leaf, jax.Array) else leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def check_divisible(batch_size: int, mesh: Mesh, axes: Sequence[str] | None = None, *, name: str = "batch_size"):
    """Raises ValueError unless ``batch_size`` splits evenly over the mesh axes ``axes`` (default: all)."""
    axes = tuple(mesh.axis_names) if axes is None else tuple(axes)
    count = int(np.prod([mesh.shape[a] for a in axes]))
    if batch_size % count:
        raise ValueError(
            f"{name}: the global batch of {batch_size} examples does not split evenly over {count} devices "
            f"(mesh axes {axes}); use a multiple of {count}"
        )


def detect_cluster() -> str | None:
    """``"slurm"`` or ``"openmpi"`` when this process was started by one with several tasks, else ``None``."""
    return _cluster.detect_cluster(os.environ)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_seconds: float = _cluster.DEFAULT_INIT_TIMEOUT,
    peer_timeout_seconds: float = _cluster.DEFAULT_PEER_TIMEOUT,
    supervise: bool = False,
) -> dict[str, Any]:
    """Starts ``jax.distributed`` from explicit arguments or a SLURM / Open MPI environment, with a watchdog.

    Must run before any other JAX call that touches devices. With explicit arguments all three of
    ``coordinator_address`` (``"host:port"`` of process 0), ``num_processes`` and ``process_id`` are needed.
    Without them, a SLURM job step (``srun``) or an Open MPI <= 4 launch (``mpirun``) gives them
    (:func:`jaxalgo.parallel.resolve_processes`). With neither, nothing starts (a single-process run).

    The processes first meet at the coordinator's port (:func:`jaxalgo.parallel.rendezvous`): a process whose
    peers do not all arrive within ``timeout_seconds`` raises :class:`jaxalgo.parallel.ClusterError` naming the
    processes that never connected. Once ``jax.distributed`` runs, a :class:`jaxalgo.parallel.Watchdog` ends this
    process with one line and exit status ``PEER_LOST_EXIT_STATUS`` (69) when another process has sent no heartbeat
    for ``peer_timeout_seconds``; jax's own heartbeat timeout is set to ``2 * peer_timeout_seconds + 10``, so the
    watchdog speaks first.

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: total number of processes (>= 1).
      process_id: this process, ``0 <= process_id < num_processes``.
      local_device_count: on CPU, how many devices each process simulates (sets ``jax_num_cpu_devices``).
      timeout_seconds: how long the processes have to find each other.
      peer_timeout_seconds: how long a process may stay silent before the others stop.
      supervise: fork, and return only in the child, which runs ``jax.distributed``; the parent supervises it and
        ends with its exit status, or with one line and exit status 69 when another process is lost, even when jax
        or gloo abort the child from C++ (``jaxalgo.parallel._cluster.run_supervised``; what the ``jaxalgo`` command
        does). Only for a program's main process: the parent never returns.

    Returns:
      ``{"method", "process_id", "num_processes", "coordinator"}`` describing the run.

    Raises:
      ValueError: incomplete, inconsistent or malformed arguments or environment, naming them.
      ClusterError: not every process connected within ``timeout_seconds``.
    """
    for name, value in (("timeout_seconds", timeout_seconds), ("peer_timeout_seconds", peer_timeout_seconds)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name}: must be a number of seconds > 0, got {value!r}")
    plan = _cluster.resolve_processes(
        coordinator_address, num_processes, process_id, coordinator_name="coordinator_address"
    )
    if local_device_count is not None:
        if isinstance(local_device_count, bool) or local_device_count < 1:
            raise ValueError(f"local_device_count: must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    info = {"method": plan.method, "process_id": plan.process_id, "num_processes": plan.num_processes}
    if not plan.multi_process:
        return {**info, "coordinator": None}
    if supervise:
        _cluster.run_supervised(plan, init_timeout=timeout_seconds, peer_timeout=peer_timeout_seconds)
    else:
        _cluster.start_distributed(plan, init_timeout=timeout_seconds, peer_timeout=peer_timeout_seconds)
    return {**info, "coordinator": plan.coordinator}


def local_batch_rows(mesh: Mesh, global_batch_size: int, *, devices: Sequence[jax.Device] | None = None) -> slice:
    """The rows of a global batch that ``devices`` hold when :func:`shard` splits it over all axes of ``mesh``.

    The rows are read from the mesh (``NamedSharding(mesh, P(all axes)).devices_indices_map``), not assumed. With the
    devices ordered by ``(process_index, id)``, as :func:`make_mesh` orders them, the ``D`` devices of each of the
    ``P`` processes are consecutive in the mesh, so process ``i`` holds the block of rows
    ``[i * B / P, (i + 1) * B / P)``; a mesh whose order splits a process's rows into pieces is refused.

    Args:
      mesh: the mesh the batch's leading dimension is split over (all axes, outermost first).
      global_batch_size: rows ``B`` of the global batch, divisible by the number of devices of ``mesh``.
      devices: whose rows; default: this process's devices in ``mesh``.

    Returns:
      ``slice(start, stop)``: the contiguous rows those devices hold; ``slice(0, B)`` in a single process.

    Raises:
      ValueError: ``global_batch_size`` does not split over the mesh, ``devices`` are not devices of the mesh, or
        the rows they hold are not one contiguous block (naming the devices and their rows).

    Example:
      >>> mesh = make_mesh((2, 4))
      >>> local_batch_rows(mesh, 64, devices=mesh.devices[1])
      slice(32, 64, None)
    """
    check_divisible(global_batch_size, mesh, name="global_batch_size")
    in_mesh = list(mesh.devices.flat)
    if devices is None:
        devices = [d for d in in_mesh if d.process_index == jax.process_index()]
        if not devices:
            raise ValueError(f"mesh: holds none of the devices of process {jax.process_index()}")
    else:
        devices = list(np.asarray(devices, dtype=object).flat)
        outside = [d for d in devices if d not in set(in_mesh)]
        if not devices or outside:
            raise ValueError(f"devices: expected a non-empty subset of the mesh's devices, got {outside or devices}")
    index_map = NamedSharding(mesh, P(tuple(mesh.axis_names))).devices_indices_map((global_batch_size,))
    spans = sorted({index_map[d][0].indices(global_batch_size)[:2] for d in devices})
    start, stop = spans[0]
    for low, high in spans[1:]:
        if low != stop:
            ids = sorted(d.id for d in devices)
            raise ValueError(
                f"mesh: devices {ids} hold rows {[f'{a}:{b}' for a, b in spans]} of the global batch of "
                f"{global_batch_size}, not one contiguous block; order the mesh's devices by (process_index, id), "
                "as make_mesh does"
            )
        stop = high
    return slice(start, stop)


def shard_local(batch: Any, mesh: Mesh, global_batch_size: int) -> Any:
    """Builds the global batch, split like :func:`shard`, from the rows of it this process holds.

    Each process passes only its own rows, ``local_batch_rows(mesh, global_batch_size)`` of the global batch (e.g.
    from ``jaxalgo.data.iterate_batches(..., rows=...)``), and gets global arrays of ``global_batch_size`` rows
    with ``NamedSharding(mesh, P(all axes))``, made with ``jax.make_array_from_process_local_data``: no process
    holds, reads or copies the other processes' rows. A leaf holding the whole global batch is accepted too (this
    process's rows are cut from it first), so in a single process the result equals ``shard(batch, mesh)``.

    Args:
      batch: a pytree of host arrays (numpy, or fully addressable jax arrays) whose leading dimension is this
        process's rows or the whole global batch.
      mesh: the mesh whose axes (all of them, outermost first) split the leading dimension.
      global_batch_size: rows of the global batch, divisible by the number of devices of ``mesh``.

    Returns:
      The pytree of global ``jax.Array`` s of leading dimension ``global_batch_size``.

    Raises:
      ValueError: a leaf's leading dimension is neither this process's row count nor ``global_batch_size``
        (naming the leaf, its shape and both counts), or the errors of :func:`local_batch_rows`.
    """
    rows = local_batch_rows(mesh, global_batch_size)
    count = rows.stop - rows.start
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))

    def put(path, leaf):
        host = np.asarray(leaf)
        if host.ndim == 0 or host.shape[0] not in (count, global_batch_size):
            local = f"{count} (this process's rows {rows.start}:{rows.stop} of the global batch) or "
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)}: expected a leading dimension of "
                f"{local if count < global_batch_size else ''}{global_batch_size} (the whole global batch), "
                f"got shape {host.shape}"
            )
        if host.shape[0] != count:
            host = host[rows]
        return jax.make_array_from_process_local_data(sharding, host, (global_batch_size, *host.shape[1:]))

    return jax.tree_util.tree_map_with_path(put, batch)
