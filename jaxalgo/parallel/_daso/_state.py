"""DASO's state and its layout on the ``("node", "local")`` mesh.

Parameters and optimizer state differ between nodes after local steps, so they are stacked per node (leading axis
``P``, sharded over the node axis); the step, the estimator's state and the in-flight global average are
replicated, the schedule too, and each node's epoch loss sum is one entry of a ``(P,)`` array. Inside
``shard_map`` a device sees its node's slice (leading axis 1): :func:`own` drops that axis, :func:`restack`
restores it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import Estimator
from jaxalgo.parallel._collectives import StateMerge, stack_copies, vary
from jaxalgo.parallel._daso._config import DasoConfig
from jaxalgo.parallel._daso._schedule import DasoSchedule, initial_schedule
from jaxalgo.parallel._mesh import NODE_AXIS, place

REPLICATED = P()


class DasoState(NamedTuple):
    """DASO's state: the last global average (``inflight``: parameter-shaped, replicated, at least float32; between
    a send and its merge it is the average in flight, and the next global average sends the changes from it), the
    schedule, and each node's sum of step losses in the current epoch (shape ``(P,)``; the plateau detector's
    input, so that a resumed run adapts exactly as an uninterrupted one)."""

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


@dataclasses.dataclass(frozen=True)
class Layout:
    """What every DASO program is built over: the options, the mesh and its two axes, how the estimator's state is
    merged and whether the node-local average is of directional derivatives."""

    config: DasoConfig
    mesh: Mesh
    node_axis: str
    local_axis: str
    state_merge: StateMerge
    directional: bool

    @property
    def num_nodes(self) -> int:
        return self.mesh.shape[self.node_axis]

    @property
    def data_axes(self) -> tuple[str, str]:
        return (self.node_axis, self.local_axis)

    @property
    def per_node(self) -> P:
        return P(self.node_axis)

    @property
    def data(self) -> P:
        return P(self.data_axes)

    @property
    def daso_specs(self) -> DasoState:
        # a tree of PartitionSpecs shaped like the state (jax's convention for in/out specs)
        return DasoState(inflight=REPLICATED, schedule=REPLICATED, loss_sum=self.per_node)  # type: ignore[arg-type]


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


def average_dtype(dtype: Any) -> jnp.dtype:
    """The dtype DASO keeps the global average of a parameter of ``dtype`` in: at least float32 for floating
    parameters (a bf16 parameter's average is float32), the parameter's own dtype otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else dtype


def init_state(layout: Layout, estimator: Estimator, optimizer: Any, params: Any) -> DasoTrainState:
    """The initial state placed on the mesh: every node holds ``params`` and a fresh optimizer state, the last
    global average is ``params`` (in :func:`average_dtype`) and the schedule is the configured one."""
    num_nodes = layout.num_nodes
    state = DasoTrainState(
        step=jnp.zeros((), jnp.int32),
        params=stack_copies(params, num_nodes),
        estimator_state=estimator.init(params),
        opt_state=stack_copies(optimizer.init(params), num_nodes),
        daso=DasoState(
            inflight=jax.tree.map(lambda x: jnp.asarray(x, average_dtype(jnp.result_type(x))), params),
            schedule=initial_schedule(layout.config),
            loss_sum=jnp.zeros((num_nodes,), jnp.float32),
        ),
    )
    return place_daso_state(state, layout.mesh, layout.node_axis)


# -- inside shard_map ------------------------------------------------------------------------------------------


def own(tree: Any) -> Any:
    """This device's slice of a per-node tree (its node's copy)."""
    return jax.tree.map(lambda x: x[0], tree)


def restack(tree: Any, node_axis: str) -> Any:
    """A per-device tree back in the per-node layout (leading axis 1, varying over ``node_axis``)."""
    return jax.tree.map(lambda x: x[None], vary(tree, node_axis))
