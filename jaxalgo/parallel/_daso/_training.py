""":func:`daso`: DASO's programs (the step of each phase, the window from a send to its merge) for one estimator,
optimizer and mesh, gathered in a :class:`Daso`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxalgo.grads import Estimator
from jaxalgo.parallel._collectives import STATE_MERGES, StateMerge
from jaxalgo.parallel._daso._config import PHASES, DasoConfig, Phase
from jaxalgo.parallel._daso._schedule import DasoSchedule, daso_phase, daso_window
from jaxalgo.parallel._daso._state import REPLICATED, DasoTrainState, Layout, init_state
from jaxalgo.parallel._daso._steps import make_step, make_window
from jaxalgo.parallel._data_parallel import reshard
from jaxalgo.parallel._forward_dp import Reduction, check_reduce
from jaxalgo.parallel._mesh import LOCAL_AXIS, NODE_AXIS


@dataclasses.dataclass(frozen=True)
class Daso:
    """DASO training steps for one estimator, optimizer and mesh; build it with :func:`daso`.

    Attributes:
      init: ``init(params) -> DasoTrainState`` placed on the mesh.
      steps: one jitted ``step(state, batch, run_key) -> (state, loss_per_node)`` per phase in :data:`PHASES`
        (state donated; ``loss_per_node`` has shape ``(P,)``, each node's average shard loss).
      window: ``window(S) -> program``, the jitted ``program(state, batches, run_key) -> (state, loss_per_node)``
        running ``S + 1`` steps from a send to its merge in one compiled program, the global average overlapping
        the ``S`` steps (``len(batches) = S + 1``; ``loss_per_node`` has shape ``(P, S + 1)``); built once per
        ``S``. It equals the step programs ``send, local x (S - 1), merge``.
      consensus: ``consensus(params) -> params``, the average over nodes (replicated), for evaluation.
      phase: ``phase(step, *, steps_per_epoch, total_epochs, schedule)``, one of :data:`PHASES`.
      window_length: ``window_length(step, *, steps_per_epoch, total_epochs, schedule) -> int``, ``S + 1`` if
        ``step`` is a send whose merge is in the same epoch, else 1 (:func:`daso_window`).
    """

    config: DasoConfig
    mesh: Mesh
    init: Callable[[Any], DasoTrainState]
    steps: dict[Phase, Callable[..., tuple[DasoTrainState, jax.Array]]]
    window: Callable[[int], Callable[..., tuple[DasoTrainState, jax.Array]]]
    consensus: Callable[[Any], Any]
    node_axis: str
    local_axis: str

    @property
    def num_nodes(self) -> int:
        return self.mesh.shape[self.node_axis]

    def phase(self, step: int, *, steps_per_epoch: int, total_epochs: int, schedule: DasoSchedule) -> Phase:
        return daso_phase(step, **self._where(steps_per_epoch, total_epochs, schedule))

    def window_length(self, step: int, *, steps_per_epoch: int, total_epochs: int, schedule: DasoSchedule) -> int:
        return daso_window(step, **self._where(steps_per_epoch, total_epochs, schedule))

    def _where(self, steps_per_epoch: int, total_epochs: int, schedule: DasoSchedule) -> dict[str, Any]:
        """What places a step in the schedule, besides the step itself (the arguments of ``daso_phase``)."""
        return {
            "steps_per_epoch": steps_per_epoch,
            "total_epochs": total_epochs,
            "global_skip": int(schedule.global_skip),
            "batches_to_wait": int(schedule.batches_to_wait),
            "config": self.config,
        }


def consensus(mesh: Mesh, params: Any) -> Any:
    """The average of the per-node ``params`` over the nodes, replicated on ``mesh``."""
    return jax.tree.map(lambda x: reshard(jnp.mean(x, axis=0).astype(x.dtype), mesh, REPLICATED), params)


def daso(
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    config: DasoConfig | None = None,
    *,
    node_axis: str = NODE_AXIS,
    local_axis: str = LOCAL_AXIS,
    state_merge: StateMerge = "delta_sum",
    reduce: Reduction = "auto",
) -> Daso:
    """Builds DASO's per-phase training steps and window programs (see :mod:`jaxalgo.parallel._daso` for the
    algorithm).

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
      A :class:`Daso` with ``init``, the per-phase ``steps``, the ``window`` programs, ``consensus``, ``phase`` and
      ``window_length``. ``config.program`` is the runner's choice between the two (both are always available).
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
    layout = Layout(config, mesh, node_axis, local_axis, state_merge, directional)
    return Daso(
        config=config,
        mesh=mesh,
        init=functools.partial(init_state, layout, estimator, optimizer),
        steps={phase: make_step(layout, estimator, optimizer, phase) for phase in PHASES},
        window=functools.cache(functools.partial(make_window, layout, estimator, optimizer)),
        consensus=jax.jit(functools.partial(consensus, mesh)),
        node_axis=node_axis,
        local_axis=local_axis,
    )
