"""AB-training's step programs: one per phase, ``"ddp"`` and ``"group"``.

Both run the same per-device body (:func:`device_step`): the estimator's gradient of the model the phase trains,
the phase's reduction of it, and an optimizer update masked to the leaves the phase trains. The phases differ in
two functions:

- ``"ddp"``: the model is the full-rank parameters, whose gradients are averaged over every device
  (:func:`ddp_gradients`); the factors are frozen;
- ``"group"``: the model is the composed ``W = A B`` (:func:`composed`); the chain rule takes ``g_W`` to the
  factor the group trains and one packed all-reduce averages it inside the group (:func:`group_gradients`, see
  *Reducing differently shaped A and B* in :mod:`jaxalgo.parallel.ab`); the full-rank kernels are frozen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from optax import tree_utils as otu

from jaxalgo.grads._estimator import Estimator, scalar_loss
from jaxalgo.parallel._collectives import mean_over, merge_replicated_state, vary
from jaxalgo.parallel._data_parallel import check_batch, reshard
from jaxalgo.parallel.ab._config import AB_AXES, DP_AXIS, GROUP_AXIS
from jaxalgo.parallel.ab._layers import kernel_mask, matrix, with_kernels
from jaxalgo.parallel.ab._schedule import PHASES, Phase
from jaxalgo.parallel.ab._state import (
    DATA,
    PER_GROUP,
    REPLICATED,
    ABTrainState,
    Layout,
    is_a_group,
    own,
    resized,
    restack,
)


def composed(layout: Layout, train: Any) -> Any:
    """The group phase's model: the parameters with every factorised kernel replaced by ``A B``.

    (Not :func:`jaxalgo.lowrank.compose`: that composes OIALR's ``U S V^T``; AB's factors carry ``S`` in both.)
    """
    kernels = {name: f["A"] @ f["B"] for name, f in train["factors"].items()}
    return with_kernels(train["params"], layout.layers, kernels)


def ddp_gradients(layout: Layout, train: Any, grads: Any, a_group: jax.Array) -> Any:
    """The data-parallel phase's gradients of the train tree: the parameters' averaged over every device, zero for
    the (frozen) factors."""
    del layout, a_group
    return {"params": mean_over(grads, AB_AXES), "factors": jax.tree.map(jnp.zeros_like, train["factors"])}


def factor_gradients(layout: Layout, factors: Any, grads: Any) -> tuple[dict, dict]:
    """``g_A = g_W B^T`` and ``g_B = A^T g_W`` of every layer, from the gradient ``grads`` of the composed model."""
    grad_a, grad_b = {}, {}
    for layer in layout.layers:
        g_w = matrix(grads, layer)
        grad_a[layer.name] = g_w @ factors[layer.name]["B"].T
        grad_b[layer.name] = factors[layer.name]["A"].T @ g_w
    return grad_a, grad_b


def group_gradients(layout: Layout, train: Any, grads: Any, a_group: jax.Array) -> Any:
    """The group phase's gradients of the train tree: chain rule to the factors, then one packed all-reduce inside
    the group of the trained factor's gradients (A in A-groups, B in B-groups, zero-padded to the longer) and the
    shared parameters' (those not factorised); zero for the full-rank kernels and the frozen factor."""
    factors = train["factors"]
    grad_a, grad_b = factor_gradients(layout, factors, grads)
    shared_mask = jax.tree.leaves(kernel_mask(grads, layout.layers, False, True))
    leaves, treedef = jax.tree.flatten(grads)
    shared_flat, unravel_shared = ravel_pytree([x for x, m in zip(leaves, shared_mask, strict=True) if m])
    flat_a, unravel_a = ravel_pytree(grad_a)
    flat_b, unravel_b = ravel_pytree(grad_b)
    if layout.only_b:
        head = flat_b
    else:
        length = max(flat_a.size, flat_b.size)
        head = jnp.where(a_group, resized(flat_a, 0, length), resized(flat_b, 0, length))
    packed = mean_over(jnp.concatenate([head, shared_flat.astype(head.dtype)]), DP_AXIS)
    head, shared_flat = packed[: head.size], packed[head.size :].astype(shared_flat.dtype)
    shared = iter(unravel_shared(shared_flat))
    params_grads = jax.tree.unflatten(
        treedef, [next(shared) if m else jnp.zeros(x.shape, x.dtype) for x, m in zip(leaves, shared_mask, strict=True)]
    )
    g_b = unravel_b(resized(head, 0, flat_b.size))
    zeros = lambda x: jnp.zeros(x.shape, x.dtype)
    g_a = jax.tree.map(zeros, grad_a) if layout.only_b else unravel_a(resized(head, 0, flat_a.size))
    factor_grads = {
        name: {
            "A": jnp.where(a_group, g_a[name], 0.0).astype(factors[name]["A"].dtype),
            "B": jnp.where(a_group, 0.0, g_b[name]).astype(factors[name]["B"].dtype),
        }
        for name in factors
    }
    return {"params": params_grads, "factors": factor_grads}


# phase -> (the model the estimator differentiates, the reduction of its gradient to the train tree's)
_PHASE_PARTS = {
    "ddp": (lambda layout, train: train["params"], ddp_gradients),
    "group": (composed, group_gradients),
}


def trained_mask(layout: Layout, train: Any, phase: Phase, a_group: jax.Array) -> Any:
    """Which leaves of the train tree ``phase`` trains: the shared parameters always, the factorised kernels in
    ``"ddp"``, ``A`` (A-groups) or ``B`` (B-groups) in ``"group"``."""
    params_mask = kernel_mask(train["params"], layout.layers, phase == "ddp", True)
    factors_mask = {
        name: {"A": jnp.logical_and(phase == "group", a_group), "B": jnp.logical_and(phase == "group", ~a_group)}
        for name in train["factors"]
    }
    return {"params": params_mask, "factors": factors_mask}


def masked_update(tx: optax.GradientTransformation, grads, opt_state, train, mask, factor):
    """``tx`` applied where ``mask`` is true (leaves and their moments); elsewhere both stay as they were."""
    updates, new_opt = tx.update(grads, opt_state, train)
    train = jax.tree.map(lambda p, u, m: jnp.where(m, p + (factor * u).astype(p.dtype), p), train, updates, mask)
    state_mask = otu.tree_map_params(
        tx, lambda _, m: m, new_opt, mask, transform_non_params=lambda v: jax.tree.map(lambda _: True, v)
    )
    new_opt = jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new_opt, opt_state, state_mask)
    return train, new_opt


def device_step(
    layout: Layout,
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    phase: Phase,
    step,
    train,
    estimator_state,
    opt_state,
    loss_sum,
    batch,
    run_key,
    factor,
):
    """One device's step of ``phase`` (inside ``shard_map``); the key is ``fold_in(run_key, step)`` everywhere."""
    model_of, reduce = _PHASE_PARTS[phase]
    train, opt_state = own(train), own(opt_state)
    key = jax.random.fold_in(run_key, step)
    a_group = is_a_group(layout)
    model = vary(model_of(layout, train), AB_AXES)
    loss, grads, new_est = estimator.value_and_grad(model, estimator_state, batch, key=key)
    loss = mean_over(scalar_loss(loss), DP_AXIS)
    train_grads = reduce(layout, train, grads, a_group)
    new_est = merge_replicated_state(estimator_state, new_est, AB_AXES, "delta_sum")
    mask = trained_mask(layout, train, phase, a_group)
    train, opt_state = masked_update(optimizer, train_grads, opt_state, train, mask, factor)
    loss = vary(loss, GROUP_AXIS)[None]
    return restack(train), new_est, restack(opt_state), loss_sum + loss, loss


def make_step(layout: Layout, estimator: Estimator, optimizer: optax.GradientTransformation, phase: Phase):
    """The jitted ``step(state, batch, run_key, lr_factor) -> (state, loss_per_group)`` of ``phase`` (state
    donated; the batch is sharded over both axes, ``lr_factor`` scales the optimizer's update)."""
    if phase not in PHASES:
        raise ValueError(f"phase: unknown phase {phase!r}; allowed: {', '.join(PHASES)}")
    mesh = layout.mesh
    sharded = jax.shard_map(
        lambda *args: device_step(layout, estimator, optimizer, phase, *args),
        mesh=mesh,
        in_specs=(REPLICATED, PER_GROUP, REPLICATED, PER_GROUP, PER_GROUP, DATA, REPLICATED, REPLICATED),
        out_specs=(PER_GROUP, REPLICATED, PER_GROUP, PER_GROUP, PER_GROUP),
    )

    def step(state: ABTrainState, batch, run_key, factor):
        check_batch(batch, mesh, AB_AXES)
        batch = reshard(batch, mesh, DATA)
        factor = reshard(jnp.asarray(factor, jnp.float32), mesh, REPLICATED)
        train, est, opt, loss_sum, loss = sharded(
            state.step, state.train, state.estimator_state, state.opt_state, state.loss_sum, batch, run_key, factor
        )
        return ABTrainState(state.step + 1, train, est, opt, state.ranks, loss_sum), loss

    return jax.jit(step, donate_argnums=0)
