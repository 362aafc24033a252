"""DASO's programs: one step program per phase in :data:`PHASES`, each with a fixed set of collectives, and the
window program from a send to its merge.

Every step runs the same per-device update (:func:`local_update`): the node-local average of the gradient
(:func:`node_local_gradients`) and the node's own optimizer step. A step program follows it with its phase's global
step (:func:`jaxalgo.parallel._daso._merge.synchronise`, :func:`device_step`).

The window program (:func:`device_window`, ``S + 1`` steps in one compiled program) is the asynchronous form of the
steps ``send, local x (S - 1), merge``: after the send step's update it issues the cross-node average, runs the
``S`` further steps in a loop that never sees the average, and merges it after the loop. In the compiled module the
all-reduce over the node axis reads the state at the send and is read only by the merge, so nothing orders it
against the loop: XLA's latency-hiding scheduler (GPU, TPU) can start it before the loop and wait for it after,
the paper's non-blocking MPI request (whether the backend overlaps it is the scheduler's choice;
``tests/test_daso_window.py`` checks the dataflow). The loop keeps the compile time independent of ``S``; since a
collective in a loop body appears once in the HLO, :func:`window_comm_report` counts the body's collectives once
per iteration.

The window computes what the step programs compute, in the same order: the same per-step key
``fold_in(run_key, step)``, the same loss sums, and the merge's ``S`` read from the state as the merge step reads
it; the loop body is compiled like a step program, so on XLA:CPU the trajectories agree bit for bit with backprop
(checked by ``tests/test_daso_window.py`` with Adam, plain and sharded; also with SGD). Estimators whose estimate XLA
compiles differently inside a loop body can differ in the last bit of a few elements (the orthogonal-projection
forward gradient: Adam's moments off by up to 2e-10 after 55 steps, the parameters equal): float rounding, not a
different computation. That is why the steps run in a loop bounded by the state's ``S`` (a runtime value)
rather than unrolled: in straight-line code, and in a loop of a constant single trip (which XLA inlines), XLA fuses
the element-wise optimizer arithmetic of consecutive steps into one kernel (e.g. Adam's second-moment chain), and
that kernel rounds a few elements differently in the last bit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxalgo.grads import Estimator, scalar_loss
from jaxalgo.parallel._collectives import mean_over, merge_replicated_state, vary
from jaxalgo.parallel._comm import CommReport, comm_report
from jaxalgo.parallel._daso._config import PHASES, Phase
from jaxalgo.parallel._daso._merge import global_mean, merge_inflight, synchronise
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
        if estimator.split is None:
            raise ValueError("estimator: a directional layout needs an estimator with a split form (estimator.split)")
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


def local_update(
    layout: Layout,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    step: jax.Array,
    params: Any,
    estimator_state: Any,
    opt_state: Any,
    batch: Any,
    run_key: jax.Array,
) -> tuple[Any, Any, Any, jax.Array]:
    """One device's node-local step on its node's ``params`` and ``opt_state`` (inside ``shard_map``):
    ``(params, estimator_state, opt_state, loss)``; the key is ``fold_in(run_key, step)`` everywhere."""
    key = jax.random.fold_in(run_key, step)
    loss, grads, estimator_state = node_local_gradients(layout, estimator, params, estimator_state, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), estimator_state, opt_state, loss


def device_step(
    layout: Layout,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    phase: Phase,
    step: jax.Array,
    params: Any,
    estimator_state: Any,
    opt_state: Any,
    daso_state: DasoState,
    batch: Any,
    run_key: jax.Array,
) -> tuple[Any, Any, Any, DasoState, jax.Array]:
    """One device's step of ``phase`` (inside ``shard_map``)."""
    params, estimator_state, opt_state, loss = local_update(
        layout, estimator, optimizer, step, own(params), estimator_state, own(opt_state), batch, run_key
    )
    params, average = synchronise(layout, phase, params, daso_state)
    node_axis = layout.node_axis
    return (
        restack(params, node_axis),
        estimator_state,
        restack(opt_state, node_axis),
        DasoState(average, daso_state.schedule, daso_state.loss_sum + loss[None]),
        vary(loss, node_axis)[None],
    )


def device_window(
    layout: Layout,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    step: jax.Array,
    params: Any,
    estimator_state: Any,
    opt_state: Any,
    daso_state: DasoState,
    batches: Sequence[Any],
    run_key: jax.Array,
) -> tuple[Any, Any, Any, DasoState, jax.Array]:
    """One device's window of ``len(batches) = S + 1`` steps, ``send, local x (S - 1), merge`` (inside
    ``shard_map``): the send step's update, the global average issued from its result, a loop over the ``S``
    further updates (which never see the average), then the merge. The losses come back as ``(1, S + 1)``,
    this node's row."""
    node_axis = layout.node_axis
    params, estimator_state, opt_state, loss = local_update(
        layout, estimator, optimizer, step, own(params), estimator_state, own(opt_state), batches[0], run_key
    )
    loss_sum = daso_state.loss_sum + loss[None]
    average = global_mean(layout, params, daso_state.inflight)  # in flight from here to the merge

    later_batches = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches[1:])

    def later_step(k, carry):
        params, estimator_state, opt_state, loss_sum, losses = carry
        batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), later_batches)
        params, estimator_state, opt_state, loss = local_update(
            layout, estimator, optimizer, step + 1 + k, params, estimator_state, opt_state, batch, run_key
        )
        losses = jax.lax.dynamic_update_index_in_dim(losses, vary(loss, node_axis), k, 0)
        return params, estimator_state, opt_state, loss_sum + loss[None], losses

    # The bound is the state's S (equal to len(batches) - 1): a runtime bound keeps the loop a loop even for S = 1,
    # where XLA would inline a one-trip loop and fuse the two steps' arithmetic (changing roundings).
    later_losses = vary(jnp.zeros((len(batches) - 1,), loss.dtype), node_axis)
    params, estimator_state, opt_state, loss_sum, later_losses = jax.lax.fori_loop(
        0,
        daso_state.schedule.batches_to_wait,
        later_step,
        (params, estimator_state, opt_state, loss_sum, later_losses),
    )
    params = merge_inflight(layout, params, average, daso_state)
    losses = jnp.concatenate([vary(loss, node_axis)[None], later_losses])
    return (
        restack(params, node_axis),
        estimator_state,
        restack(opt_state, node_axis),
        DasoState(average, daso_state.schedule, loss_sum),
        losses[None],
    )


def make_step(layout: Layout, estimator: Estimator, optimizer: optax.GradientTransformation, phase: Phase):
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


def make_window(layout: Layout, estimator: Estimator, optimizer: optax.GradientTransformation, batches_to_wait: int):
    """The jitted ``window(state, batches, run_key) -> (state, loss_per_node)`` from a send to its merge:
    ``batches`` is a sequence of ``S + 1`` batches (``S = batches_to_wait >= 1``, the state's schedule must have the
    same ``S``), ``loss_per_node`` has shape ``(P, S + 1)``; the state is donated. The result equals the step
    programs ``send, local x (S - 1), merge`` run one after the other."""
    if not (isinstance(batches_to_wait, int) and not isinstance(batches_to_wait, bool) and batches_to_wait >= 1):
        raise ValueError(f"batches_to_wait: a window needs an integer S >= 1, got {batches_to_wait!r}")
    length = batches_to_wait + 1
    mesh, node, data = layout.mesh, layout.per_node, layout.data
    sharded = jax.shard_map(
        lambda *args: device_window(layout, estimator, optimizer, *args),
        mesh=mesh,
        in_specs=(REPLICATED, node, REPLICATED, node, layout.daso_specs, (data,) * length, REPLICATED),
        out_specs=(node, REPLICATED, node, layout.daso_specs, node),
    )

    def window(state: DasoTrainState, batches, run_key):
        if len(batches) != length:
            raise ValueError(
                f"batches: the window of S = {batches_to_wait} runs {length} steps and needs {length} batches, "
                f"got {len(batches)}"
            )
        batches = tuple(batches)
        for batch in batches:
            check_batch(batch, mesh, layout.data_axes)
        batches = tuple(reshard(batch, mesh, data) for batch in batches)
        params, estimator_state, opt_state, daso_state, loss = sharded(
            state.step, state.params, state.estimator_state, state.opt_state, state.daso, batches, run_key
        )
        return DasoTrainState(state.step + length, params, estimator_state, opt_state, daso_state), loss

    return jax.jit(window, donate_argnums=0)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=")
_CALLED = re.compile(r"\b(?:calls|to_apply|condition|body)=%?([\w.\-]+)|\bbranch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def runs_per_instruction(hlo_text: str, *, trip_count: int | None = None) -> dict[str, int]:
    """``{instruction name: how many times it runs}`` in one execution of a compiled HLO module: 1 in the entry
    computation, times the trip count of every ``while`` loop around it (the one XLA annotates when the bound is a
    constant, else ``trip_count``); computations reached through calls and fusions inherit their caller's count."""
    blocks: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line.startswith(" "):
            current = match.group("name")
            blocks[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            blocks[current].append(line)
    if entry is None:
        raise ValueError("hlo_text: no ENTRY computation in the module")
    runs: dict[str, int] = {}

    def visit(computation: str, count: int) -> None:
        for line in blocks.get(computation, []):
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            runs[match.group("name")] = runs.get(match.group("name"), 0) + count
            called = _CALLED.findall(line)
            if not called:
                continue
            inner = count
            if re.search(r"\swhile\(", line):
                trips = _TRIPS.search(line)
                if trips is not None:
                    inner = count * int(trips.group(1))
                elif trip_count is not None:
                    inner = count * trip_count
                else:
                    raise ValueError(f"trip_count: the loop {match.group('name')} has no known trip count; pass one")
            for single, listed in called:
                for name in [single] if single else listed.split(","):
                    visit(name.strip().lstrip("%"), inner)

    visit(entry, 1)
    return runs


def window_comm_report(program: Any, state: DasoTrainState, batches: Sequence[Any], run_key: Any, *, mesh: Any):
    """:func:`jaxalgo.parallel.comm_report` of a window program (``Daso.window(S)``) with every collective counted
    as many times as it runs: those of the loop body ``S = len(batches) - 1`` times (the plain report counts a loop
    body once). Returns a :class:`jaxalgo.parallel.CommReport`."""
    lowered = program.lower(state, batches, run_key)
    report = comm_report(lowered, mesh=mesh)
    runs = runs_per_instruction(lowered.compile().as_text(), trip_count=len(batches) - 1)
    return CommReport(
        collectives=tuple(c for c in report.collectives for _ in range(runs.get(c.name, 1))),
        mesh_axes=report.mesh_axes,
    )
