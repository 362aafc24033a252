"""AB-training's state and its layout on the ``("group", "dp")`` mesh.

The train tree (full-rank parameters and factors) and its optimizer state are stacked per group (leading axis
``G``, sharded over ``"group"``); the step, the estimator's state and the ranks are replicated. Inside
``shard_map`` a device sees its group's slice (leading axis 1): :func:`own` drops that axis, :func:`restack`
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
from jaxalgo.parallel._collectives import stack_copies, vary
from jaxalgo.parallel._mesh import place
from jaxalgo.parallel.ab._config import AB_AXES, GROUP_AXIS, ABConfig
from jaxalgo.parallel.ab._layers import ABLayer, kernel

PER_GROUP, REPLICATED, DATA = P(GROUP_AXIS), P(), P(AB_AXES)


class ABTrainState(NamedTuple):
    """The whole AB-training state (a pytree, saved in checkpoints).

    Attributes:
      step: the number of steps taken (replicated).
      train: ``{"params": model parameters (full-rank view), "factors": {layer: {"A": (rows, size),
        "B": (size, cols)}}}`` stacked per group (leading axis ``G``).
      estimator_state: the estimator's state (replicated).
      opt_state: the optimizer state of ``train``, stacked per group.
      ranks: ``{layer: rank}`` of the current factors (replicated int32; columns/rows beyond it are zero).
      loss_sum: each group's sum of step losses (shape ``(G,)``), for logging.
    """

    step: jax.Array
    train: Any
    estimator_state: Any
    opt_state: Any
    ranks: Any
    loss_sum: jax.Array

    @property
    def params(self) -> Any:
        """The trained tree (parameters and factors); what the training loop checks for finite values."""
        return self.train


@dataclasses.dataclass(frozen=True)
class Layout:
    """What every AB program is built over: the options, the mesh and the factorised layers."""

    config: ABConfig
    mesh: Mesh
    layers: tuple[ABLayer, ...]

    @property
    def groups(self) -> int:
        return self.mesh.shape[GROUP_AXIS]

    @property
    def only_b(self) -> bool:
        return self.config.sync_mode == "only-b"


def place_ab_state(state: ABTrainState, mesh: Mesh) -> ABTrainState:
    """Places an AB train state: per-group trees over ``"group"``, the rest replicated."""
    return ABTrainState(
        step=place(state.step, mesh, REPLICATED),
        train=place(state.train, mesh, PER_GROUP),
        estimator_state=place(state.estimator_state, mesh, REPLICATED),
        opt_state=place(state.opt_state, mesh, PER_GROUP),
        ranks=place(state.ranks, mesh, REPLICATED),
        loss_sum=place(state.loss_sum, mesh, PER_GROUP),
    )


def init_state(layout: Layout, estimator: Estimator, optimizer: Any, params: Any) -> ABTrainState:
    """The initial state placed on the mesh: every group holds ``params`` and zero factors at full rank."""
    params = jax.tree.map(jnp.asarray, params)
    factors = {}
    for layer in layout.layers:
        dtype = kernel(params, layer).dtype
        factors[layer.name] = {
            "A": jnp.zeros((layer.rows, layer.full_rank), dtype),
            "B": jnp.zeros((layer.full_rank, layer.cols), dtype),
        }
    train = {"params": params, "factors": factors}
    state = ABTrainState(
        step=jnp.zeros((), jnp.int32),
        train=stack_copies(train, layout.groups),
        estimator_state=estimator.init(params),
        opt_state=stack_copies(optimizer.init(train), layout.groups),
        ranks={layer.name: jnp.asarray(layer.full_rank, jnp.int32) for layer in layout.layers},
        loss_sum=jnp.zeros((layout.groups,), jnp.float32),
    )
    return place_ab_state(state, layout.mesh)


# -- inside shard_map ------------------------------------------------------------------------------------------


def own(tree: Any) -> Any:
    """This device's slice of a per-group tree (its group's copy)."""
    return jax.tree.map(lambda x: x[0], tree)


def restack(tree: Any) -> Any:
    """A per-device tree back in the per-group layout (leading axis 1, varying over ``"group"``)."""
    return jax.tree.map(lambda x: vary(x, GROUP_AXIS)[None], tree)


def is_a_group(layout: Layout) -> jax.Array:
    """Whether this device's group trains ``A``: the first half of the groups (none with ``"only-b"``)."""
    if layout.only_b:
        return jnp.bool_(False)
    return jax.lax.axis_index(GROUP_AXIS) < layout.groups // 2


def resized(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Slices or zero-pads ``x`` along ``axis`` to ``size``."""
    have = x.shape[axis]
    if have >= size:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - have)
    return jnp.pad(x, pad)
