"""Reduction helpers for code inside ``jax.shard_map``: averages over named mesh axes, in a chosen wire dtype,
plain or Horovod-style sharded, and the pcast that avoids the replicated-parameter gradient trap.

The trap (jax >= 0.7 shard_map with varying-manual-axes typing): a parameter that enters ``shard_map`` replicated
(``PartitionSpec()``) is *invariant* over the mesh axes; ``jax.grad`` with respect to it transposes the implicit
broadcast into a ``psum``, so the gradient comes back already **summed** over the devices. A subsequent ``pmean``
then leaves it N times too large (N x the learning rate, silently). :func:`vary` marks the parameters as
*varying* first (``jax.lax.pcast(..., to="varying")``), so the gradient stays per device and one explicit
:func:`mean_over` averages it.

All functions here must be called inside ``shard_map`` over a mesh that has the named axes.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Axes = str | Sequence[str]


def _axes(axes: Axes) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def varying_axes(x: Any) -> frozenset[str]:
    """The mesh axes over which ``x`` (a traced value inside ``shard_map``) may differ between devices."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary(tree: Any, axes: Axes) -> Any:
    """Marks every leaf as varying over ``axes`` (``jax.lax.pcast``), skipping axes a leaf already varies over.

    Call it on replicated parameters before differentiating per device; see the module docstring.
    """
    names = _axes(axes)

    def cast(x):
        missing = tuple(a for a in names if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def stack_copies(tree: Any, count: int) -> Any:
    """``count`` copies of every leaf along a new leading axis: the per-node (DASO) or per-group (AB-training)
    state, before it is placed with that axis sharded over the mesh."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *jnp.shape(x))), tree)


def mean_over(tree: Any, axes: Axes, *, dtype: Any = None) -> Any:
    """``pmean`` of every floating leaf over ``axes``, sent in ``dtype`` (default: the leaf's own dtype).

    The sum runs in ``dtype`` (as the reference's bf16 MPI reduction does); the result is cast back to the leaf's
    dtype before dividing by the number of devices. Non-floating leaves must already agree across the devices
    and are reduced with ``pmax`` (a no-op for equal values).
    """
    names = _axes(axes)

    def reduce(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jax.lax.pmax(x, names)
        wire = x.dtype if dtype is None else jnp.dtype(dtype)
        total = jax.lax.psum(x.astype(wire), names).astype(x.dtype)
        return total / jax.lax.psum(1, names)

    return jax.tree.map(reduce, tree)


def sharded_mean_over(tree: Any, axis: str, shard_axis: str, *, dtype: Any = None) -> Any:
    """Horovod-style hierarchical average of a tree that is equal on all devices of ``shard_axis``.

    The leaves are flattened into one vector (padded to a multiple of ``n = size(shard_axis)``); device ``i`` of
    ``shard_axis`` averages only its slice ``i`` over ``axis`` (sent in ``dtype``), then the slices are all-gathered
    inside ``shard_axis``. The bytes crossing ``axis`` fall by a factor ``n`` compared with :func:`mean_over`,
    at the price of one all-gather over the (fast) ``shard_axis`` level.

    Args:
      tree: floating leaves, identical across ``shard_axis`` (e.g. parameters after a node-local gradient sync).
      axis: the axis to average over (the slow, cross-node level).
      shard_axis: the axis whose devices share the work (the fast, node-local level).
      dtype: wire dtype of both collectives (default: the leaves' common dtype).

    Returns:
      The average over ``axis``, with the structure and dtypes of ``tree``, invariant over both axes.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"tree: sharded_mean_over averages floating leaves only, got dtype {leaf.dtype}")
    common = jnp.result_type(*leaves)
    wire = common if dtype is None else jnp.dtype(dtype)
    flat = jnp.concatenate([jnp.ravel(x).astype(wire) for x in leaves])
    n = jax.lax.psum(1, shard_axis)
    size = flat.shape[0]
    chunk = -(-size // n)
    flat = jnp.pad(flat, (0, chunk * n - size))
    index = jax.lax.axis_index(shard_axis)
    piece = jax.lax.dynamic_slice_in_dim(flat, index * chunk, chunk)
    piece = jax.lax.psum(piece, axis)
    gathered = jax.lax.all_gather(piece, shard_axis, tiled=True, to="invarying")[:size]
    gathered = gathered.astype(common) / jax.lax.psum(1, axis)
    out, start = [], 0
    for leaf in leaves:
        count = int(np.prod(leaf.shape))
        out.append(gathered[start : start + count].reshape(leaf.shape).astype(leaf.dtype))
        start += count
    return jax.tree.unflatten(treedef, out)


StateMerge = Literal["delta_sum", "mean"]
"""How the per-device updates of a replicated state are combined (see :func:`merge_replicated_state`)."""
STATE_MERGES: tuple[StateMerge, ...] = typing.get_args(StateMerge)


def merge_replicated_state(old: Any, new: Any, axes: Axes, how: StateMerge = "delta_sum") -> Any:
    """Combines the per-device updates of a replicated state (an estimator's state) into one replicated value.

    - ``"delta_sum"``: ``old + sum_devices(new - old)`` for floating leaves, so each device's change is applied
      once. Exact for per-sample buffers (F3's delayed errors) where devices write disjoint rows.
    - ``"mean"``: the average of the devices' new values, for state that every device updates alike.

    Non-floating leaves (counters) must agree across devices and are reduced with ``pmax``.
    """
    if how not in STATE_MERGES:
        raise ValueError(f"state_merge: unknown merge {how!r}; allowed: {', '.join(STATE_MERGES)}")
    names = _axes(axes)

    def merge(o, n):
        if not jnp.issubdtype(n.dtype, jnp.floating):
            return jax.lax.pmax(n, names)
        if how == "mean":
            return jax.lax.pmean(n, names)
        return o + jax.lax.psum(n - o, names)

    return jax.tree.map(merge, old, new)
