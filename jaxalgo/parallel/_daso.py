"""DASO: hierarchical data parallelism with node-local synchronous and delayed, selective global averaging.

On a ``("node", "local")`` mesh with ``P`` nodes:

- **every step**, the gradients are averaged inside each node (fast links) and each node takes its own optimizer
  step, so parameters and optimizer state differ between nodes (they are stored stacked, one slice per node);
- **every** ``global_skip`` **steps** the parameters are averaged across nodes, sent in ``comm_dtype`` (bf16); the
  average is applied ``S = batches_to_wait`` steps later, merged with the parameters the node has reached by then:

  .. math::
    \\theta \\leftarrow \\frac{w S\\, \\theta_{local} + \\sum_{n=1}^{P} \\theta_{n, stale}}{w S + P},
    \\qquad w = 2 \\text{ by default};

  with ``S = 0``, and on the last batch of every epoch, the average is blocking and replaces the parameters;
- warm-up (first ``warmup_epochs``) and cool-down (last ``cooldown_epochs``) average globally at every step;
- between them, a plateau of the epoch training loss (no improvement below ``best * (1 - plateau_threshold)`` for
  ``plateau_patience`` epochs) halves ``global_skip`` and lowers ``S`` by one (floor 1); at ``global_skip = 1`` a
  plateau resets to ``max_global_skip`` with ``S = max_global_skip // 4``.
- ``sharded=True`` uses the Horovod-style hierarchical average: each local device averages ``1 / N_local`` of the
  parameters across nodes and the pieces are all-gathered inside the node, dividing cross-node bytes by ``N_local``.

The step is compiled once per **phase** (``"local"``, ``"send"``, ``"merge"``, ``"blocking"``); the host picks the
phase of each step with :func:`daso_phase` from the step index and the schedule, so every compiled program has a
fixed set of collectives (which :func:`jaxalgo.parallel.comm_report` can account for). The schedule and the
in-flight average live in :class:`DasoState`, part of the train state, so checkpoints hold them.

Differences from the reference (Heat's ``DASO`` optimizer), stated here on purpose: the in-flight average is
computed at send time inside the compiled step (XLA overlaps it with the following computation where it can) rather
than by a background MPI request; ``S`` is kept below ``global_skip`` so that at most one average is in flight (the
reference allows ``S = global_skip = 1``; here ``global_skip = 1`` runs with ``S = 0``, i.e. blocking); the
estimator's own state (e.g. F3's per-sample buffer) is merged across all devices every step, so per-sample state
stays exact whichever node a sample lands on.

Forward gradients. For an estimator with a directional split (weight-perturbation forward gradients, see
:mod:`jaxalgo.parallel._forward_dp`) the node-local average is of the ``k`` directional derivatives and the loss
(``k + 1`` numbers instead of ``n``), and every device of the node rebuilds the same estimate. The global averages
stay averages of *parameters*: after local steps the nodes' parameters differ, and no ``k`` numbers describe that
difference. For these estimators plain data parallelism (:func:`jaxalgo.parallel.data_parallel`, ``--parallel
ddp``) supersedes DASO: it averages the ``k`` directional derivatives across *all* devices every step, so every
step is globally synchronous (no stale merges, exactly the full-batch estimate) and costs ``4 (k + 1)`` cross-node
bytes, while DASO's cheapest phase cycle still sends ``n`` bf16 parameters every ``global_skip`` steps (about
``2 n / global_skip`` bytes per step; for ``n = 2.9M``, ``k = 16``, ``global_skip = 4`` that is 21 000 x more).
``--parallel daso`` with such an estimator runs DASO as specified, with the cheaper node-local average.

References:
  Coquelin, Debus, Götz, von der Lehr, Kahn, Siggel, Streit, "Accelerating neural network training with
  distributed asynchronous and selective optimization (DASO)", Journal of Big Data 9, 2022 (arXiv 2104.05588).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import Estimator
from jaxalgo.parallel._collectives import (
    STATE_MERGES,
    mean_over,
    merge_replicated_state,
    sharded_mean_over,
    stack_copies,
    vary,
)
from jaxalgo.parallel._data_parallel import check_batch, reshard
from jaxalgo.parallel._forward_dp import check_reduce, directional_value_and_grad
from jaxalgo.parallel._mesh import LOCAL_AXIS, NODE_AXIS, place

PHASES: tuple[str, ...] = ("local", "send", "merge", "blocking")
COMM_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class DasoConfig:
    """DASO's options (defaults from the paper).

    Attributes:
      global_skip: steps between global averages after the warm-up (>= 1).
      batches_to_wait: ``S``, steps between sending a global average and merging it (``0 <= S < global_skip``).
      warmup_epochs: leading epochs with a blocking global average every step (>= 0).
      cooldown_epochs: trailing epochs with a blocking global average every step (>= 0).
      merge_weight: ``w`` of the merge ``(w S theta_local + sum theta_stale) / (w S + P)`` (> 0).
      max_global_skip: ``global_skip`` after a plateau at ``global_skip = 1`` (>= 1).
      comm_dtype: wire dtype of the global average: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
      sharded: Horovod-style sharded global average (cross-node bytes / ``N_local``).
      adaptive: adapt ``global_skip`` and ``S`` on plateaus of the epoch loss.
      plateau_threshold: relative improvement that counts as progress (>= 0).
      plateau_patience: epochs without progress that make a plateau (>= 1).
    """

    global_skip: int = 4
    batches_to_wait: int = 1
    warmup_epochs: int = 4
    cooldown_epochs: int = 4
    merge_weight: float = 2.0
    max_global_skip: int = 8
    comm_dtype: str = "bfloat16"
    sharded: bool = False
    adaptive: bool = True
    plateau_threshold: float = 0.05
    plateau_patience: int = 3

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")

        integer("global_skip", 1)
        integer("batches_to_wait", 0)
        integer("warmup_epochs", 0)
        integer("cooldown_epochs", 0)
        integer("max_global_skip", 1)
        integer("plateau_patience", 1)
        if self.batches_to_wait >= self.global_skip:
            raise ValueError(
                f"batches_to_wait: S = {self.batches_to_wait} must be < global_skip = {self.global_skip}, so that at "
                "most one global average is in flight"
            )
        if not (isinstance(self.merge_weight, int | float) and self.merge_weight > 0):
            raise ValueError(f"merge_weight: must be a number > 0, got {self.merge_weight!r}")
        if self.comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype: unknown dtype {self.comm_dtype!r}; allowed: {', '.join(COMM_DTYPES)}")
        if not (isinstance(self.plateau_threshold, int | float) and self.plateau_threshold >= 0):
            raise ValueError(f"plateau_threshold: must be a number >= 0, got {self.plateau_threshold!r}")


class DasoSchedule(NamedTuple):
    """The adaptive part of DASO's schedule (scalar arrays, saved in checkpoints)."""

    global_skip: jax.Array
    batches_to_wait: jax.Array
    best_loss: jax.Array
    bad_epochs: jax.Array


class DasoState(NamedTuple):
    """DASO's state: the in-flight global average (parameter-shaped, replicated), the schedule, and each node's
    sum of step losses in the current epoch (shape ``(P,)``; the plateau detector's input, so that a resumed run
    adapts exactly as an uninterrupted one)."""

    inflight: Any
    schedule: DasoSchedule
    loss_sum: jax.Array


class DasoTrainState(NamedTuple):
    """A train state for DASO: parameters and optimizer state stacked per node (leading axis of size P)."""

    step: jax.Array
    params: Any
    estimator_state: Any
    opt_state: Any
    daso: DasoState


def initial_schedule(config: DasoConfig) -> DasoSchedule:
    return DasoSchedule(
        global_skip=jnp.asarray(config.global_skip, jnp.int32),
        batches_to_wait=jnp.asarray(config.batches_to_wait, jnp.int32),
        best_loss=jnp.asarray(jnp.inf, jnp.float32),
        bad_epochs=jnp.asarray(0, jnp.int32),
    )


def in_warmup_or_cooldown(epoch: int, total_epochs: int, config: DasoConfig) -> bool:
    return epoch < config.warmup_epochs or epoch >= total_epochs - config.cooldown_epochs


def daso_phase(
    step: int, *, steps_per_epoch: int, total_epochs: int, global_skip: int, batches_to_wait: int, config: DasoConfig
) -> str:
    """The phase of global step ``step``: ``"blocking"``, ``"send"``, ``"merge"`` or ``"local"``.

    Blocking during warm-up and cool-down, with ``S = 0``, and on the last batch of each epoch. Otherwise a send on
    batches ``i`` with ``(i + 1) % global_skip == 0`` and its merge ``S`` batches later; a send whose merge would
    fall on or after the epoch's last batch is superseded by that batch's blocking average.
    """
    epoch, i = divmod(int(step), int(steps_per_epoch))
    last = steps_per_epoch - 1
    if in_warmup_or_cooldown(epoch, total_epochs, config) or batches_to_wait == 0 or i == last:
        return "blocking"
    if (i + 1) % global_skip == 0:
        return "send"
    sent = i - batches_to_wait
    if sent >= 0 and (sent + 1) % global_skip == 0:
        return "merge"
    return "local"


def update_schedule(
    schedule: DasoSchedule, *, epoch: int, train_loss: float, total_epochs: int, config: DasoConfig
) -> DasoSchedule:
    """The schedule for the epoch after ``epoch`` (0-based), given its mean training loss; runs on the host.

    Plateaus are only detected between warm-up and cool-down, and only with ``config.adaptive``.
    """
    if not config.adaptive or in_warmup_or_cooldown(epoch, total_epochs, config):
        return schedule
    skip, wait = int(schedule.global_skip), int(schedule.batches_to_wait)
    best, bad = float(schedule.best_loss), int(schedule.bad_epochs)
    if train_loss < best * (1.0 - config.plateau_threshold) or not math.isfinite(best):
        best, bad = float(train_loss), 0
    else:
        bad += 1
    if bad >= config.plateau_patience:
        bad = 0
        if skip > 1:
            skip, wait = skip // 2, max(wait - 1, 1)
        else:
            skip, wait = config.max_global_skip, max(config.max_global_skip // 4, 1)
        wait = min(wait, skip - 1)
    return DasoSchedule(
        global_skip=jnp.asarray(skip, jnp.int32),
        batches_to_wait=jnp.asarray(wait, jnp.int32),
        best_loss=jnp.asarray(best, jnp.float32),
        bad_epochs=jnp.asarray(bad, jnp.int32),
    )


def merge_stale(local: Any, average: Any, *, batches_to_wait: Any, num_nodes: int, weight: float) -> Any:
    """``(w S theta_local + P theta_avg) / (w S + P)``; with ``S = 0`` this is the plain average ``theta_avg``."""
    s = jnp.asarray(batches_to_wait, jnp.float32) * weight

    def merge(x, avg):
        return ((s * x.astype(jnp.float32) + num_nodes * avg.astype(jnp.float32)) / (s + num_nodes)).astype(x.dtype)

    return jax.tree.map(merge, local, average)


@dataclasses.dataclass(frozen=True)
class Daso:
    """DASO training steps for one estimator, optimizer and mesh; build it with :func:`daso`.

    Attributes:
      init: ``init(params) -> DasoTrainState`` placed on the mesh.
      steps: one jitted ``step(state, batch, run_key) -> (state, loss_per_node)`` per phase in :data:`PHASES`
        (state donated; ``loss_per_node`` has shape ``(P,)``, each node's average shard loss).
      consensus: ``consensus(params) -> params``, the average over nodes (replicated), for evaluation.
      phase: ``phase(step, *, steps_per_epoch, total_epochs, schedule) -> str``.
    """

    config: DasoConfig
    mesh: Mesh
    init: Callable[[Any], DasoTrainState]
    steps: dict[str, Callable[..., tuple[DasoTrainState, jax.Array]]]
    consensus: Callable[[Any], Any]
    node_axis: str
    local_axis: str

    @property
    def num_nodes(self) -> int:
        return self.mesh.shape[self.node_axis]

    def phase(self, step: int, *, steps_per_epoch: int, total_epochs: int, schedule: DasoSchedule) -> str:
        return daso_phase(
            step,
            steps_per_epoch=steps_per_epoch,
            total_epochs=total_epochs,
            global_skip=int(schedule.global_skip),
            batches_to_wait=int(schedule.batches_to_wait),
            config=self.config,
        )


def daso(
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    config: DasoConfig | None = None,
    *,
    node_axis: str = NODE_AXIS,
    local_axis: str = LOCAL_AXIS,
    state_merge: str = "delta_sum",
    reduce: str = "auto",
) -> Daso:
    """Builds DASO's per-phase training steps (see the module docstring for the algorithm).

    Args:
      estimator: any estimator (backprop, forward gradients, F3, ...); it sees one device's shard of the batch and
        the step's key ``fold_in(run_key, step)``, the same on every device.
      optimizer: any optax optimizer; each node runs its own copy.
      mesh: a two-level mesh with axes ``node_axis`` (across nodes) and ``local_axis`` (within a node).
      config: :class:`DasoConfig` (default: the paper's settings).
      node_axis, local_axis: the mesh axis names of the two levels.
      state_merge: how the estimator's per-device states are combined (see ``merge_replicated_state``).
      reduce: the node-local average: ``"auto"`` (the ``k`` directional derivatives for an estimator with a
        directional split, else the gradients), ``"directional"`` or ``"gradients"`` (see
        :func:`jaxalgo.parallel.data_parallel`). The global averages are of parameters either way.

    Returns:
      A :class:`Daso` with ``init``, the per-phase ``steps``, ``consensus`` and ``phase``.
    """
    config = DasoConfig() if config is None else config
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, axis in (("node_axis", node_axis), ("local_axis", local_axis)):
        if axis not in mesh.axis_names:
            raise ValueError(f"{name}: {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    if state_merge not in STATE_MERGES:
        raise ValueError(f"state_merge: unknown merge {state_merge!r}; allowed: {', '.join(STATE_MERGES)}")
    directional = check_reduce(reduce, getattr(estimator, "split", None))
    num_nodes = mesh.shape[node_axis]
    data_axes = (node_axis, local_axis)
    wire = jnp.dtype(config.comm_dtype)

    def global_mean(params):
        if config.sharded:
            return sharded_mean_over(params, node_axis, local_axis, dtype=wire)
        return mean_over(params, node_axis, dtype=wire)

    def body(phase, step, params, estimator_state, opt_state, daso_state, batch, run_key):
        params = jax.tree.map(lambda x: x[0], params)
        opt_state = jax.tree.map(lambda x: x[0], opt_state)
        key = jax.random.fold_in(run_key, step)
        if directional:  # node-local average of the k directional derivatives; the estimate is rebuilt per device
            loss, grads = directional_value_and_grad(estimator.split, params, batch, key=key, axes=local_axis)
            new_estimator_state = estimator_state
        else:
            loss, grads, new_estimator_state = estimator.value_and_grad(
                vary(params, local_axis), estimator_state, batch, key=key
            )
            grads = mean_over(grads, local_axis)  # node-local synchronous average
            loss = mean_over(loss[0] if isinstance(loss, tuple) else loss, local_axis)
            new_estimator_state = merge_replicated_state(estimator_state, new_estimator_state, data_axes, state_merge)
        loss = loss[0] if isinstance(loss, tuple) else loss
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        inflight = daso_state.inflight
        if phase == "blocking":
            params = global_mean(params)
        elif phase == "send":
            inflight = global_mean(params)
        elif phase == "merge":
            params = merge_stale(
                params,
                inflight,
                batches_to_wait=daso_state.schedule.batches_to_wait,
                num_nodes=num_nodes,
                weight=config.merge_weight,
            )
        params = vary(params, node_axis)
        stack = lambda tree: jax.tree.map(lambda x: x[None], tree)
        return (
            stack(params),
            new_estimator_state,
            stack(vary(opt_state, node_axis)),
            DasoState(inflight, daso_state.schedule, daso_state.loss_sum + loss[None]),
            vary(loss, node_axis)[None],
        )

    node, repl, data = P(node_axis), P(), P(data_axes)
    daso_specs = DasoState(inflight=repl, schedule=repl, loss_sum=node)

    def make_step(phase):
        sharded = jax.shard_map(
            lambda *args: body(phase, *args),
            mesh=mesh,
            in_specs=(repl, node, repl, node, daso_specs, data, repl),
            out_specs=(node, repl, node, daso_specs, node),
        )

        def step_with_loss(state: DasoTrainState, batch, run_key):
            check_batch(batch, mesh, data_axes)
            batch = reshard(batch, mesh, data)
            params, est_state, opt_state, daso_state, loss = sharded(
                state.step, state.params, state.estimator_state, state.opt_state, state.daso, batch, run_key
            )
            return DasoTrainState(state.step + 1, params, est_state, opt_state, daso_state), loss

        return jax.jit(step_with_loss, donate_argnums=0)

    def init(params) -> DasoTrainState:
        state = DasoTrainState(
            step=jnp.zeros((), jnp.int32),
            params=stack_copies(params, num_nodes),
            estimator_state=estimator.init(params),
            opt_state=stack_copies(optimizer.init(params), num_nodes),
            daso=DasoState(
                inflight=jax.tree.map(jnp.asarray, params),
                schedule=initial_schedule(config),
                loss_sum=jnp.zeros((num_nodes,), jnp.float32),
            ),
        )
        return place_daso_state(state, mesh, node_axis)

    @jax.jit
    def consensus(params):
        return jax.tree.map(lambda x: reshard(jnp.mean(x, axis=0).astype(x.dtype), mesh, repl), params)

    return Daso(
        config=config,
        mesh=mesh,
        init=init,
        steps={phase: make_step(phase) for phase in PHASES},
        consensus=consensus,
        node_axis=node_axis,
        local_axis=local_axis,
    )


def place_daso_state(state: DasoTrainState, mesh: Mesh, node_axis: str = NODE_AXIS) -> DasoTrainState:
    """Places a DASO train state: per-node parameters and optimizer state over ``node_axis``, the rest replicated."""
    return DasoTrainState(
        step=place(state.step, mesh, P()),
        params=place(state.params, mesh, P(node_axis)),
        estimator_state=place(state.estimator_state, mesh, P()),
        opt_state=place(state.opt_state, mesh, P(node_axis)),
        daso=DasoState(
            inflight=place(state.daso.inflight, mesh, P()),
            schedule=place(state.daso.schedule, mesh, P()),
            loss_sum=place(state.daso.loss_sum, mesh, P(node_axis)),
        ),
    )
