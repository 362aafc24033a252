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


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def detect_cluster() -> str | None:
    """``"slurm"`` or ``"openmpi"`` when this process was started by one with several tasks, else ``None``."""
    if (_env_int("SLURM_NTASKS") or _env_int("SLURM_NPROCS") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_seconds: int = 300,
) -> dict[str, Any]:
    """Starts ``jax.distributed`` from explicit arguments, or from SLURM / Open MPI environment variables.

    Must run before any other JAX call that touches devices. With explicit arguments all three of
    ``coordinator_address`` (``"host:port"`` of process 0), ``num_processes`` and ``process_id`` are needed.
    Without them, a SLURM job step (``srun``) or Open MPI <= 4 launch (``mpirun``) is detected and jax reads the
    rest from the environment (Open MPI 5 needs ``cluster_detection_method="mpi4py"`` in
    ``jax.distributed.initialize``). With neither, nothing happens (a single-process run).

    Args:
      coordinator_address: ``"host:port"`` of process 0.
      num_processes: total number of processes (>= 1).
      process_id: this process, ``0 <= process_id < num_processes``.
      local_device_count: on CPU, how many devices each process simulates (sets ``jax_num_cpu_devices``).
      timeout_seconds: how long to wait for the other processes.

    Returns:
      ``{"method", "process_id", "num_processes"}`` describing the run.

    Raises:
      ValueError: incomplete or inconsistent arguments, naming them.
    """
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    given = {k for k, v in explicit.items() if v is not None}
    if given and given != set(explicit):
        missing = sorted(set(explicit) - given)
        raise ValueError(f"{', '.join(missing)}: needed together with {', '.join(sorted(given))} (give all three)")
    if given:
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator_address: expected 'host:port', got {coordinator_address!r}")
        if num_processes < 1:
            raise ValueError(f"num_processes: must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id: must be in [0, {num_processes}), got {process_id}")
    if local_device_count is not None:
        if local_device_count < 1:
            raise ValueError(f"local_device_count: must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    if given:
        if num_processes > 1:
            jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=timeout_seconds,
            )
        return {"method": "explicit", "process_id": process_id, "num_processes": num_processes}
    method = detect_cluster()
    if method is None:
        return {"method": "single", "process_id": 0, "num_processes": 1}
    jax.distributed.initialize(initialization_timeout=timeout_seconds)
    return {"method": method, "process_id": jax.process_index(), "num_processes": jax.process_count()}
