"""Forward gradients with structured rank-1 tangents: a few backprops' cost, no ``k x n`` tangent matrix anywhere.

Each weight (an array with at least two axes, viewed as a matrix ``(m, n)`` = (leading axes, last axis)) gets
tangents ``V_i = a_i b_i^T`` with ``a_i ~ N(0, I_m)``, ``b_i ~ N(0, I_n)`` independent; every other parameter an
ordinary Gaussian tangent. Since ``E[vec(V) vec(V)^T] = I`` the estimators keep their properties:

- ``sum``: ``g = sum_i d_i v_i`` and ``mean``: ``g = (1/k) sum_i d_i v_i`` are unbiased (``E[g] = grad f`` for the
  mean);
- ``orthogonal_projection`` (FROG): ``g = V^T (V V^T)^{-1} d`` is the orthogonal projection of ``grad f`` onto
  the span of the tangents, so ``cos(g, grad f) = |g| / |grad f|``;

with ``d_i = <grad f, v_i>`` the directional derivatives. The directional derivatives come from a forward-mode
interpreter that applies each weight's factored tangent inside the layer (``x (a b^T) = (x a) b^T``); the Gram
matrix is ``sum_leaves (a_i . a_j)(b_i . b_j)`` and the estimate ``(a^T diag(c)) b`` per weight.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024 (multi-tangent forward gradients, FROG).
  Baydin et al., "Gradients without Backpropagation", arXiv 2202.08587, 2022 (forward gradients).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxalgo.grads import _combine
from jaxalgo.grads._combine import Aggregation
from jaxalgo.grads._estimator import (
    Batch,
    DirectionalSplit,
    EmptyState,
    Estimator,
    Params,
    check_float_params,
    check_scalar_loss,
    stateless_init,
)
from jaxalgo.grads._rank1_jvp import jvp_stacked
from jaxalgo.grads._rank1_tangents import FactoredTangent, combine, gram_matrix, sample_tangents, tangent_keys

Rank1Batching = Literal["vmap", "scan"]
"""How a rank-1 estimator pushes its tangents: all together (``vmap``) or one at a time (``scan``)."""
BATCHINGS: tuple[Rank1Batching, ...] = typing.get_args(Rank1Batching)


Rank1ForwardGradient = DirectionalSplit
"""The split form of a rank-1 step (an alias of :class:`~jaxalgo.grads.DirectionalSplit`)."""


def _check_options(num_tangents: Any, aggregation: Any, batching: Any) -> None:
    _combine.check_num_tangents(num_tangents)
    _combine.check_aggregation(aggregation)
    if batching not in BATCHINGS:
        raise ValueError(f"batching: unknown batching {batching!r}; allowed: {', '.join(BATCHINGS)}")


def rank1_directional(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: Aggregation = "mean",
    scaling_correction: bool = False,
    has_aux: bool = False,
    batching: Rank1Batching = "vmap",
) -> Rank1ForwardGradient:
    """The split form of :func:`rank1_forward_gradient`: directional derivatives, then the estimate.

    Args: as for :func:`rank1_forward_gradient`.

    Returns:
      A :class:`Rank1ForwardGradient` with

      - ``directional_derivatives(params, batch, *, key) -> (loss, d)``: the loss (or ``(loss, aux)``) and
        ``d_i = <grad loss, v_i>`` for the ``k`` tangents drawn from ``key``, shape (k,);
      - ``estimate_from_directional(params, d, *, key) -> grads``: ``sum_i c_i v_i`` with the coefficients of the
        aggregation (and the scaling correction), regenerating the same tangents from ``key``. Only the shapes and
        dtypes of ``params`` are used.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
    _check_options(num_tangents, aggregation, batching)
    k = num_tangents

    def checked_loss(params, batch):
        out = loss_fn(params, batch)
        check_scalar_loss(out, has_aux=has_aux)
        return out

    def one_pass(params, batch, keys):
        leaves = jax.tree.leaves(params)
        tangents = sample_tangents(keys, leaves)
        batch_leaves = jax.tree.leaves(batch)
        out, out_t = jvp_stacked(checked_loss, (params, batch), [*tangents, *([None] * len(batch_leaves))])
        loss = out[0] if has_aux else out
        d = out_t[0]
        if d is None:
            d = jnp.zeros((keys.shape[0],), loss.dtype)
        elif isinstance(d, FactoredTangent):
            d = d.materialize()
        return out, d.astype(loss.dtype)

    def directional_derivatives(params: Params, batch: Batch, *, key: jax.Array) -> tuple[Any, jax.Array]:
        check_float_params(params)
        keys = tangent_keys(key, k)
        if batching == "vmap":
            return one_pass(params, batch, keys)
        outs, d = jax.lax.map(lambda one_key: one_pass(params, batch, one_key[None]), keys)
        return jax.tree.map(lambda x: x[0], outs), d[:, 0]

    def estimate_from_directional(params: Params, d: jax.Array, *, key: jax.Array) -> Params:
        leaves, treedef = jax.tree.flatten(params)
        if d.shape != (k,):
            raise ValueError(f"d: expected shape ({k},) (one directional derivative per tangent), got {d.shape}")
        tangents = sample_tangents(tangent_keys(key, k), leaves)
        num_params = sum(math.prod(leaf.shape) for leaf in leaves)
        gram = None
        if aggregation == "orthogonal_projection":
            used = min(k, num_params)
            if used < k:  # more tangents than parameters: the first n span the whole space.
                d = jnp.where(jnp.arange(k) < used, d, 0)
            gram = gram_matrix(tangents, jnp.promote_types(d.dtype, jnp.float32))
            if used < k:
                mask = jnp.arange(k) < used
                gram = jnp.where(mask[:, None] & mask[None, :], gram, jnp.eye(k, dtype=gram.dtype))
        coefficients = _combine.combination_coefficients(aggregation, d, gram)
        if scaling_correction:
            coefficients = coefficients * _combine.scaling_correction(
                aggregation, num_tangents=k, num_params=num_params
            )
        return jax.tree.unflatten(treedef, combine(tangents, coefficients))

    return Rank1ForwardGradient(directional_derivatives, estimate_from_directional)


def rank1_forward_gradient(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: Aggregation = "mean",
    scaling_correction: bool = False,
    has_aux: bool = False,
    batching: Rank1Batching = "vmap",
) -> Estimator:
    """Multi-tangent forward gradient (FROG with ``aggregation="orthogonal_projection"``) with rank-1 tangents.

    For each weight ``W`` (``m x n`` in its matrix view) tangent ``i`` is ``a_i b_i^T`` with independent standard
    Gaussian factors, for every other parameter a standard Gaussian; ``d_i = <grad f, v_i>`` comes from one forward
    pass carrying the ``k`` tangents in factored form, and the estimate is ``sum_i c_i v_i`` with

    - ``sum``: ``c = d``; ``mean``: ``c = d / k`` (unbiased: ``E[v v^T] = I``);
    - ``orthogonal_projection``: ``c = G^{-1} d`` with ``G_ij = <v_i, v_j>``, which for a weight is
      ``(a_i . a_j)(b_i . b_j)``; ``V^T c`` is the orthogonal projection of ``grad f`` onto ``span(v_i)``. With
      more tangents than parameters the first ``n`` are used.

    Costs per weight: ``k (m + n)`` random numbers, ``x (a b^T) = (x a) b^T`` in the forward pass, ``O(k^2 (m+n))``
    for the Gram matrix, one ``(m x k)(k x n)`` product for the estimate.

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a floating-point scalar, or ``(scalar, aux)`` with
        ``has_aux=True``. It is traced to a jaxpr; layers without a rank-1 rule still work (their tangent is
        materialised for that equation, see :func:`rank1_fallbacks`).
      num_tangents: ``k >= 1``.
      aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal_projection"``.
      scaling_correction: multiply the estimate by the reference's correction factor (see
        ``jaxalgo.grads._combine``; its projection factor assumes Gaussian tangents and is used as is).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      batching: ``"vmap"`` pushes the ``k`` tangents through the network together (fastest, activation memory
        grows with ``k``); ``"scan"`` one at a time (memory constant in ``k``). The estimate for a key is the same.

    Returns:
      An :class:`~jaxalgo.grads.Estimator`; ``value_and_grad`` is
      :func:`rank1_directional`'s ``directional_derivatives`` followed by ``estimate_from_directional``.

    Example::

      est = jaxalgo.grads.rank1_forward_gradient(loss_fn, num_tangents=16, aggregation="orthogonal_projection")
      state = est.init(params)
      loss, grads, state = est.value_and_grad(params, state, batch, key=key)

    References:
      Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
      arXiv 2410.17764, 2024.
    """
    parts = rank1_directional(
        loss_fn,
        num_tangents=num_tangents,
        aggregation=aggregation,
        scaling_correction=scaling_correction,
        has_aux=has_aux,
        batching=batching,
    )

    def value_and_grad(params: Params, state: EmptyState, batch: Batch, *, key: jax.Array):
        loss, d = parts.directional_derivatives(params, batch, key=key)
        grads = parts.estimate_from_directional(params, d, key=key)
        return loss, grads, state

    return Estimator(stateless_init, value_and_grad, parts)


def rank1_fallbacks(loss_fn: Callable[..., Any], params: Params, batch: Batch) -> list[str]:
    """The equations of ``loss_fn(params, batch)`` where a rank-1 tangent had to be materialised.

    An empty list means every weight's tangent stays factored all the way; otherwise each line names a primitive
    that lacks a rule (see ``jaxalgo.grads._forward_rules``). Runs on abstract values only (no computation).
    """
    fallbacks: list[str] = []

    def trace(params, batch):
        leaves = jax.tree.leaves(params)
        tangents = sample_tangents(tangent_keys(jax.random.key(0), 1), leaves)
        jvp_stacked(loss_fn, (params, batch), [*tangents, *([None] * len(jax.tree.leaves(batch)))], fallbacks=fallbacks)
        return 0

    jax.eval_shape(trace, params, batch)
    return fallbacks
