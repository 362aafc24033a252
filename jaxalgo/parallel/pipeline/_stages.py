"""The ``("stage",)`` mesh, argument checks, and the small helpers the pipeline programs share inside ``shard_map``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxalgo.parallel._collectives import vary
from jaxalgo.parallel.pipeline._layout import STAGE_AXIS


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 1")
    return int(value)


def stage_mesh(num_stages: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``("stage",)`` mesh over the first ``num_stages`` of ``devices`` (default: all devices), ordered
    by ``(process_index, id)``; stage ``s`` runs on device ``s``.

    Raises:
      ValueError: naming ``num_stages`` when it is not an integer >= 1 or there are fewer devices.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    num_stages = check_positive_int("num_stages", num_stages)
    if num_stages > len(devices):
        raise ValueError(
            f"num_stages: got {num_stages}, but only {len(devices)} devices are available; allowed: 1 to "
            f"{len(devices)} (on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    grid = np.empty(num_stages, dtype=object)
    grid[:] = devices[:num_stages]
    return Mesh(grid, (STAGE_AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))


def num_stages_of(mesh: Any) -> int:
    """The size of ``mesh``'s ``"stage"`` axis; a ValueError unless it is a mesh with that single axis."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (STAGE_AXIS,):
        names = getattr(mesh, "axis_names", None)
        raise ValueError(f"mesh: expected a mesh with the single axis ('stage',), got axes {names}; use stage_mesh(S)")
    return int(mesh.shape[STAGE_AXIS])


def check_microbatches(batch_size: int, num_microbatches: int) -> int:
    """The microbatch size ``batch_size / num_microbatches``; a ValueError naming ``microbatches`` unless it is a
    whole number."""
    num_microbatches = check_positive_int("microbatches", num_microbatches)
    if batch_size % num_microbatches:
        raise ValueError(
            f"microbatches: got {num_microbatches}, which does not divide the batch of {batch_size} examples; "
            f"allowed: a divisor of {batch_size} (each microbatch holds batch_size / microbatches examples)"
        )
    return batch_size // num_microbatches


def check_batch_rows(batch: Any, num_microbatches: int, microbatch_size: int, *, keys: str) -> None:
    """Raises ValueError unless ``batch`` is a dict with ``x`` and ``y`` and ``M * b`` rows (``keys`` says which
    keys the pipeline reads, for the message)."""
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError(f"batch: expected a dict with keys {keys}")
    rows, batch_size = int(np.shape(batch["x"])[0]), num_microbatches * microbatch_size
    if rows != batch_size:
        raise ValueError(
            f"batch: holds {rows} examples; this pipeline runs {num_microbatches} microbatches of "
            f"{microbatch_size}, i.e. batches of exactly {batch_size}"
        )


def local(tree: Any) -> Any:
    """Inside ``shard_map``: every leaf without its leading stage axis (of length 1 on each device)."""
    return jax.tree.map(lambda a: a[0], tree)


def to_global(tree: Any) -> Any:
    """Inside ``shard_map``: every leaf with a leading stage axis of length 1 (out spec ``P("stage")``)."""
    return jax.tree.map(lambda a: a[None], tree)


def varying(branch):
    """``branch`` with every output marked varying over the stages (the branches of ``lax.switch`` on the stage
    index must agree on that type)."""
    return lambda ops: vary(branch(ops), STAGE_AXIS)


def _to_bytes(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


def _from_bytes(data: jax.Array, like: jax.Array) -> jax.Array:
    if like.dtype == jnp.bool_:
        return data.reshape(like.shape).astype(jnp.bool_)
    size = jnp.dtype(like.dtype).itemsize
    shape = like.shape if size == 1 else (*like.shape, size)
    return jax.lax.bitcast_convert_type(data.reshape(shape), like.dtype)


def send(tree: Any, perm: Sequence[tuple[int, int]]) -> Any:
    """``jax.lax.ppermute`` of every leaf of ``tree`` over ``"stage"`` as **one** collective: the leaves travel as
    one byte vector (bit-exact, the same bytes as leaf by leaf). A device that receives nothing gets zeros.

    One collective per tick instead of one per leaf: each collective is a rendezvous of the devices, whose fixed
    cost dominates on small messages (on simulated CPU devices, tens of milliseconds under load)."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    data = jnp.concatenate([_to_bytes(leaf) for leaf in leaves])
    data = jax.lax.ppermute(data, STAGE_AXIS, list(perm))
    out, start = [], 0
    for leaf in leaves:
        count = leaf.size * jnp.dtype(leaf.dtype).itemsize
        out.append(_from_bytes(data[start : start + count], leaf))
        start += count
    return jax.tree.unflatten(treedef, out)


def stage_specs(tree: Any) -> Any:
    """``P("stage")`` for every leaf: the leading axis is the stage."""
    return jax.tree.map(lambda _: P(STAGE_AXIS), tree)


__all__ = [
    "check_microbatches",
    "check_positive_int",
    "local",
    "num_stages_of",
    "send",
    "stage_mesh",
    "stage_specs",
    "to_global",
    "varying",
]
