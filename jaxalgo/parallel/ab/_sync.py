"""AB-training's sync: the groups' models merged into one full-rank model, and the consensus model for evaluation.

Each sync mode is one function ``(layout, A, B, a_group) -> W`` of a layer's factors on one device (inside
``shard_map``, reducing over ``"group"``); every parameter that is not factorised ("shared") and its optimizer
moments are averaged over the groups, so the data-parallel steps that follow start from one model and one
optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from jaxalgo.parallel._collectives import mean_over
from jaxalgo.parallel.ab._config import GROUP_AXIS, SYNC_MODES, SyncMode
from jaxalgo.parallel.ab._layers import kernel_mask, with_kernels
from jaxalgo.parallel.ab._state import PER_GROUP, ABTrainState, Layout, is_a_group, own, restack


def merge_full(layout: Layout, a: jax.Array, b: jax.Array, a_group: jax.Array) -> jax.Array:
    """``"full"``: ``W = mean_g(A_g B_g)``."""
    return mean_over(a @ b, GROUP_AXIS)


def merge_with_stale(layout: Layout, a: jax.Array, b: jax.Array, a_group: jax.Array) -> jax.Array:
    """``"with-stale"``: ``W = mean_g(A_g) mean_g(B_g)`` (the stale factor of each group counts too)."""
    return mean_over(a, GROUP_AXIS) @ mean_over(b, GROUP_AXIS)


def merge_only_learned(layout: Layout, a: jax.Array, b: jax.Array, a_group: jax.Array) -> jax.Array:
    """``"only-learned"``: ``W = mean_{A-groups}(A_g) mean_{B-groups}(B_g)`` (each factor from the groups that
    trained it)."""
    n_a, n_b = layout.groups // 2, layout.groups - layout.groups // 2
    a_mean = jax.lax.psum(jnp.where(a_group, a, 0.0), GROUP_AXIS) / n_a
    b_mean = jax.lax.psum(jnp.where(a_group, 0.0, b), GROUP_AXIS) / n_b
    return a_mean @ b_mean


def merge_only_b(layout: Layout, a: jax.Array, b: jax.Array, a_group: jax.Array) -> jax.Array:
    """``"only-b"``: ``W = A mean_g(B_g)`` (``A`` is the same everywhere: no group trains it)."""
    return a @ mean_over(b, GROUP_AXIS)


MERGES: dict[SyncMode, Callable[[Layout, jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "full": merge_full,
    "with-stale": merge_with_stale,
    "only-learned": merge_only_learned,
    "only-b": merge_only_b,
}
assert tuple(MERGES) == SYNC_MODES


def device_sync(layout: Layout, optimizer: optax.GradientTransformation, train: Any, opt_state: Any):
    """One device's sync (inside ``shard_map``): merged kernels by the mode, shared parameters and their moments
    averaged over the groups; the factors are kept (the re-SVD after the data-parallel steps replaces them)."""
    train, opt_state = own(train), own(opt_state)
    a_group = is_a_group(layout)
    merge = MERGES[layout.config.sync_mode]
    kernels = {name: merge(layout, f["A"], f["B"], a_group) for name, f in train["factors"].items()}
    shared_mask = kernel_mask(train["params"], layout.layers, False, True)
    params = jax.tree.map(lambda x, m: mean_over(x, GROUP_AXIS) if m else x, train["params"], shared_mask)
    params = with_kernels(params, layout.layers, kernels)
    # the shared parameters' moments diverged in the group phase: one optimizer state for the DDP steps
    mask = {"params": shared_mask, "factors": jax.tree.map(lambda _: False, train["factors"])}
    opt_state = otu.tree_map_params(optimizer, lambda x, m: mean_over(x, GROUP_AXIS) if m else x, opt_state, mask)
    return restack({"params": params, "factors": train["factors"]}), restack(opt_state)


def make_sync_program(layout: Layout, optimizer: optax.GradientTransformation) -> Callable[[Any, Any], Any]:
    """The jitted ``sync_program(train, opt_state) -> (train, opt_state)`` (per-group trees)."""
    sharded = jax.shard_map(
        lambda train, opt_state: device_sync(layout, optimizer, train, opt_state),
        mesh=layout.mesh,
        in_specs=(PER_GROUP, PER_GROUP),
        out_specs=(PER_GROUP, PER_GROUP),
    )

    def sync_program(train, opt_state):
        return sharded(train, opt_state)

    return jax.jit(sync_program)


def sync(sync_program: Callable[[Any, Any], Any], state: ABTrainState) -> ABTrainState:
    """The state with the groups' models merged (``sync_program`` from :func:`make_sync_program`)."""
    train, opt_state = sync_program(state.train, state.opt_state)
    return state._replace(train=train, opt_state=opt_state)


def consensus(sync_program: Callable[[Any, Any], Any], state: ABTrainState, live_factors: bool) -> Any:
    """The merged model on the host: the sync's result while the factors are live, else the (identical)
    per-group parameters."""
    params = sync_program(state.train, state.opt_state)[0]["params"] if live_factors else state.train["params"]
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], params)
