"""Optimizer plumbing for factorised layers: frozen bases, kept step counts, sliced (and rotated) moments.

- :func:`freeze_factors` wraps any optax optimizer so that it sees only the trainable leaves: the ``U`` and ``V``
  of every factorised layer are removed from the tree it is given (no moments, no weight decay for them) and
  receive zero updates. On a model without factorised layers it behaves exactly like the optimizer it wraps,
  with the same state structure.
- :func:`on_trainable_part` builds a weight-perturbation (forward-gradient) estimator whose tangents cover only the
  trainable leaves.
- :func:`keep_count` carries the step counts of an old optimizer state into a freshly initialised one
  (``optax.tree_utils.tree_get_all_with_path`` / ``tree_set``): OIALR zeroes the moments at conversion but keeps
  the step count, so bias corrections and schedules continue.
- :func:`map_param_moments` applies a per-parameter function to every parameter-shaped tree inside an optimizer
  state (``optax.tree_utils.tree_map_params``): this is how moments are sliced when a rank is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from jaxalgo.grads import Estimator
from jaxalgo.lowrank._layers import FROZEN_NAMES, S_NAME


def _is_factored(node: Any) -> bool:
    return isinstance(node, dict) and S_NAME in node and FROZEN_NAMES <= set(node)


def trainable_part(tree: Any) -> Any:
    """``tree`` (parameters or gradients) without the frozen ``U`` and ``V`` of factorised layers."""
    if isinstance(tree, dict):
        drop = FROZEN_NAMES if _is_factored(tree) else frozenset()
        return {k: trainable_part(v) for k, v in tree.items() if k not in drop}
    if type(tree) in (tuple, list):
        return type(tree)(trainable_part(v) for v in tree)
    return tree


def fill_frozen(partial: Any, like: Any) -> Any:
    """The inverse of :func:`trainable_part` for updates: ``U`` and ``V`` entries of ``like`` become zeros."""
    if isinstance(like, dict):
        frozen = FROZEN_NAMES if _is_factored(like) else frozenset()
        return {k: jnp.zeros_like(v) if k in frozen else fill_frozen(partial[k], v) for k, v in like.items()}
    if type(like) in (tuple, list):
        return type(like)(fill_frozen(p, v) for p, v in zip(partial, like, strict=True))
    return partial


def with_frozen(partial: Any, like: Any) -> Any:
    """The inverse of :func:`trainable_part` for parameters: ``partial`` with the ``U`` and ``V`` of ``like``."""
    if isinstance(like, dict):
        frozen = FROZEN_NAMES if _is_factored(like) else frozenset()
        return {k: v if k in frozen else with_frozen(partial[k], v) for k, v in like.items()}
    if type(like) in (tuple, list):
        return type(like)(with_frozen(p, v) for p, v in zip(partial, like, strict=True))
    return partial


def on_trainable_part(build: Callable[[Callable[..., Any]], Estimator], loss_fn: Callable[..., Any]) -> Estimator:
    """A weight-perturbation estimator whose tangents cover only the trainable leaves.

    ``build(loss)`` makes the estimator (e.g. ``lambda f: forward_gradient(f, num_tangents=16)``). It is given
    ``loss(trainable, (batch, params)) = loss_fn(with_frozen(trainable, params), batch)``: the frozen ``U`` and ``V``
    enter as data. Without this, every tangent would also have components on ``U`` and ``V``; their directional
    derivatives are zero (``stop_gradient``), but they take ``(m + n) r`` of the tangents' ``(m + n + r) r``
    coordinates of a factorised layer, and FROG's Gram matrix counts them, so its projection would no longer be
    the orthogonal projection onto the tangents' span within the trainable parameters (with ``k`` equal to the
    trainable count it would not return the exact gradient).

    Returns:
      An :class:`~jaxalgo.grads.Estimator` on the whole parameter tree whose gradients are zero at ``U`` and ``V``
      (no ``split``: OIALR runs on one device).
    """
    inner = build(lambda trainable, data: loss_fn(with_frozen(trainable, data[1]), data[0]))

    def init(params):
        return inner.init(trainable_part(params))

    def value_and_grad(params, state, batch, *, key):
        loss, grads, state = inner.value_and_grad(trainable_part(params), state, (batch, params), key=key)
        return loss, fill_frozen(grads, params), state

    return Estimator(init, value_and_grad)


def freeze_factors(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx`` applied to the trainable leaves only; the ``U``, ``V`` of factorised layers get zero updates.

    The state is ``tx``'s state on :func:`trainable_part` of the parameters, so :func:`map_param_moments` and
    ``optax.tree_utils`` work on it with ``tx`` itself.

    Args:
      tx: any optax gradient transformation.

    Returns:
      A gradient transformation (with extra-args support).
    """
    inner = optax.with_extra_args_support(tx)

    def init(params):
        return inner.init(trainable_part(params))

    def update(updates, state, params=None, **extra_args):
        partial, state = inner.update(
            trainable_part(updates), state, None if params is None else trainable_part(params), **extra_args
        )
        return fill_frozen(partial, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def keep_count(old_state: Any, new_state: Any) -> Any:
    """``new_state`` with every ``count`` field set to the value at the same path in ``old_state``.

    Counts whose path does not exist in ``old_state`` are left as they are.
    """
    old = {tuple(path): value for path, value in otu.tree_get_all_with_path(old_state, "count")}
    for path, _ in otu.tree_get_all_with_path(new_state, "count"):
        path = tuple(path)
        if path in old:
            new_state = otu.tree_set(new_state, lambda p, _v, path=path: tuple(p) == path, count=old[path])
    return new_state


def map_param_moments(
    tx: optax.GradientTransformation, fn: Callable[[jax.Array, Any], jax.Array], opt_state: Any, per_param: Any
) -> Any:
    """``fn(leaf, per_param_leaf)`` applied to every parameter-shaped leaf of ``opt_state``.

    Args:
      tx: the transformation that produced ``opt_state`` (for :func:`freeze_factors` states: the wrapped ``tx``).
      fn: called with a state leaf and the matching leaf of ``per_param``.
      opt_state: the optimizer state.
      per_param: a tree with the structure of the parameters ``tx`` was initialised with (leaves may be any
        objects, e.g. the slicing function of each parameter).

    Returns:
      The mapped state; non-parameter fields (counts, schedules) are unchanged.
    """
    return otu.tree_map_params(tx, fn, opt_state, per_param, transform_non_params=lambda x: x)
