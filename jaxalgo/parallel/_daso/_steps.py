"""DASO's step programs: one per phase in :data:`PHASES`, each with a fixed set of collectives.

Every phase runs the same per-device body (:func:`device_step`): the node-local average of the gradient
(:func:`node_local_gradients`), the node's own optimizer step, then the phase's global step
(:func:`jaxalgo.parallel._daso._merge.synchronise`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxalgo.grads import Estimator, scalar_loss
from jaxalgo.parallel._collectives import mean_over, merge_replicated_state, vary
from jaxalgo.parallel._daso._config import PHASES
from jaxalgo.parallel._daso._merge import synchronise
from jaxalgo.parallel._daso._state import REPLICATED, DasoState, DasoTrainState, Layout, own, restack
from jaxalgo.parallel._data_parallel import check_batch, reshard
from jaxalgo.parallel._forward_dp import directional_value_and_grad


def node_local_gradients(
    layout: Layout, estimator: Estimator, params: Any, estimator_state: Any, batch: Any, key: jax.Array
) -> tuple[jax.Array, Any, Any]:
    """``(loss, grads, estimator_state)`` averaged inside the node (over the local axis).

    With a directional split the ``k`` directional derivatives and the loss are averaged and every device of the
    node rebuilds the same estimate; otherwise the gradients and the loss are, and the estimator's state is merged
    across all devices.
    """
    local_axis = layout.local_axis
    if layout.directional:
        loss, grads = directional_value_and_grad(estimator.split, params, batch, key=key, axes=local_axis)
        return scalar_loss(loss), grads, estimator_state
    loss, grads, new_estimator_state = estimator.value_and_grad(
        vary(params, local_axis), estimator_state, batch, key=key
    )
    grads = mean_over(grads, local_axis)
    loss = mean_over(scalar_loss(loss), local_axis)
    new_estimator_state = merge_replicated_state(
        estimator_state, new_estimator_state, layout.data_axes, layout.state_merge
    )
    return loss, grads, new_estimator_state


def device_step(
    layout: Layout,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    phase: str,
    step: jax.Array,
    params: Any,
    estimator_state: Any,
    opt_state: Any,
    daso_state: DasoState,
    batch: Any,
    run_key: jax.Array,
) -> tuple[Any, Any, Any, DasoState, jax.Array]:
    """One device's step of ``phase`` (inside ``shard_map``); the key is ``fold_in(run_key, step)`` everywhere."""
    params, opt_state = own(params), own(opt_state)
    key = jax.random.fold_in(run_key, step)
    loss, grads, new_estimator_state = node_local_gradients(layout, estimator, params, estimator_state, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, inflight = synchronise(layout, phase, params, daso_state)
    node_axis = layout.node_axis
    return (
        restack(params, node_axis),
        new_estimator_state,
        restack(opt_state, node_axis),
        DasoState(inflight, daso_state.schedule, daso_state.loss_sum + loss[None]),
        vary(loss, node_axis)[None],
    )


def make_step(layout: Layout, estimator: Estimator, optimizer: optax.GradientTransformation, phase: str):
    """The jitted ``step(state, batch, run_key) -> (state, loss_per_node)`` of ``phase`` (state donated; the batch
    is sharded over both mesh axes)."""
    if phase not in PHASES:
        raise ValueError(f"phase: unknown phase {phase!r}; allowed: {', '.join(PHASES)}")
    mesh, node, data = layout.mesh, layout.per_node, layout.data
    sharded = jax.shard_map(
        lambda *args: device_step(layout, estimator, optimizer, phase, *args),
        mesh=mesh,
        in_specs=(REPLICATED, node, REPLICATED, node, layout.daso_specs, data, REPLICATED),
        out_specs=(node, REPLICATED, node, layout.daso_specs, node),
    )

    def step(state: DasoTrainState, batch, run_key):
        check_batch(batch, mesh, layout.data_axes)
        batch = reshard(batch, mesh, data)
        params, estimator_state, opt_state, daso_state, loss = sharded(
            state.step, state.params, state.estimator_state, state.opt_state, state.daso, batch, run_key
        )
        return DasoTrainState(state.step + 1, params, estimator_state, opt_state, daso_state), loss

    return jax.jit(step, donate_argnums=0)
