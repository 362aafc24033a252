"""Plain data parallelism (the DDP baseline) as an estimator transformation.

``data_parallel(est, mesh)`` is again an :class:`jaxalgo.grads.Estimator`: its ``value_and_grad`` splits the batch
over the mesh axes with ``jax.shard_map``, runs ``est.value_and_grad`` on each shard with the *same* key, and
all-reduces the gradients (one ``pmean`` over all data axes), the loss and the estimator state. Because it keeps
the interface, the ordinary training step (``jaxalgo.train.make_train_step``) and any optax optimizer run on it
unchanged; the optimizer update then runs replicated, with no further communication.

With a loss that is a mean over the batch and equal shard sizes, the averaged gradient equals the full-batch
gradient: for backprop exactly, and for every estimator that is linear in the per-batch loss with shared
randomness (forward gradients with the same tangents on every shard, whose directional derivatives average to the
full-batch ones). That is the property the tests check against a single device.

For weight-perturbation forward-gradient estimators (those with a :class:`jaxalgo.grads.DirectionalSplit`)
``data_parallel`` does not all-reduce the gradient at all: it averages only the ``k`` directional derivatives and
the loss, and every device rebuilds the same estimate (see :mod:`jaxalgo.parallel._forward_dp`); the result is the
same, the traffic ``k + 1`` numbers instead of ``n``. ``reduce="gradients"`` forces the ordinary path.

References:
  Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import Estimator
from jaxalgo.parallel._collectives import STATE_MERGES, StateMerge, mean_over, merge_replicated_state, vary
from jaxalgo.parallel._forward_dp import Reduction, check_reduce, directional_value_and_grad


def _check_axes(mesh: Mesh, axes: Sequence[str] | None) -> tuple[str, ...]:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = tuple(mesh.axis_names) if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    unknown = [a for a in axes if a not in mesh.axis_names]
    if not axes or unknown:
        raise ValueError(f"axes: {axes!r} must be a non-empty subset of the mesh axes {tuple(mesh.axis_names)}")
    return axes


def check_batch(batch: Any, mesh: Mesh, axes: Sequence[str]) -> None:
    """Raises ValueError unless every batch leaf has a leading dimension divisible by the devices of ``axes``."""
    count = 1
    for a in axes:
        count *= mesh.shape[a]
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = getattr(leaf, "shape", ())
        if not shape or shape[0] % count:
            raise ValueError(
                f"batch: leaf {jax.tree_util.keystr(path)} has shape {tuple(shape)}; the global batch size must be "
                f"divisible by the {count} devices of mesh axes {tuple(axes)}"
            )


def reshard(tree: Any, mesh: Mesh, spec: P) -> Any:
    """``jax.sharding.reshard`` of every leaf to ``NamedSharding(mesh, spec)`` (a no-op if already placed)."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.sharding.reshard(x, sharding), tree)


def data_parallel(
    estimator: Estimator,
    mesh: Mesh,
    *,
    axes: Sequence[str] | None = None,
    state_merge: StateMerge = "delta_sum",
    reduce: Reduction = "auto",
) -> Estimator:
    """Data parallelism over ``mesh``: per-shard estimates, gradients averaged by one all-reduce.

    .. math::
      g = \\frac{1}{N} \\sum_{d=1}^{N} \\hat g(\\theta; B_d), \\qquad B = B_1 \\cup \\dots \\cup B_N

    For an estimator with a directional split (weight-perturbation forward gradients) the all-reduce carries only
    the directional derivatives: ``d = (1/N) sum_s d(B_s)``, then ``g = estimate(d)`` on every device, which is the
    same estimate with ``k + 1`` numbers on the wire instead of ``n``.

    Args:
      estimator: any estimator; it sees its shard of the batch, replicated params and state, and the step's key.
      mesh: the device mesh (see :func:`jaxalgo.parallel.make_mesh`).
      axes: the mesh axes the batch is split over (default: all, e.g. ``("node", "local")``).
      state_merge: how per-device estimator states are combined: ``"delta_sum"`` (each device's change applied
        once; exact for per-sample buffers) or ``"mean"``; see :func:`merge_replicated_state`.
      reduce: ``"auto"`` (directional derivatives when ``estimator.split`` is set, else gradients),
        ``"directional"`` (requires a split) or ``"gradients"`` (the ordinary all-reduce, for any estimator).

    Returns:
      An :class:`~jaxalgo.grads.Estimator` with the same interface (its ``split`` is ``None``: it is already
      parallel). Params and state come back replicated; ``loss`` is the average over the shards (the full-batch
      loss for a mean loss).

    Raises:
      ValueError: for a bad ``axes``, ``state_merge`` or ``reduce``; at trace time, if a batch's leading dimension
        is not divisible by the number of devices.
    """
    axes = _check_axes(mesh, axes)
    if state_merge not in STATE_MERGES:
        raise ValueError(f"state_merge: unknown merge {state_merge!r}; allowed: {', '.join(STATE_MERGES)}")
    directional = check_reduce(reduce, getattr(estimator, "split", None))

    def directional_body(params, state, batch, key):
        # stateless by the split contract: the state passes through untouched
        loss, grads = directional_value_and_grad(estimator.split, params, batch, key=key, axes=axes)
        return loss, grads, state

    def body(params, state, batch, key):
        local_params = vary(params, axes)  # avoids the replicated-parameter gradient trap (see _collectives)
        loss, grads, new_state = estimator.value_and_grad(local_params, state, batch, key=key)
        grads = mean_over(grads, axes)
        loss = mean_over(loss, axes)
        new_state = merge_replicated_state(state, new_state, axes, state_merge)
        return loss, grads, new_state

    sharded = jax.shard_map(
        directional_body if directional else body,
        mesh=mesh,
        in_specs=(P(), P(), P(axes), P()),
        out_specs=(P(), P(), P()),
    )

    def init(params):
        return estimator.init(params)

    def value_and_grad(params, state, batch, *, key):
        check_batch(batch, mesh, axes)
        params, state, key = reshard((params, state, key), mesh, P())
        batch = reshard(batch, mesh, P(axes))
        return sharded(params, state, batch, key)

    return Estimator(init, value_and_grad)
