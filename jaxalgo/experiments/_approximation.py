"""How well a forward-gradient estimate approximates the gradient, against ``n`` and ``k`` (the paper's V-A).

As in the paper the gradient is ``grad f = 1`` (``f(x) = sum_i x_i``, ``n`` parameters); an estimate ``g`` is
scored by

- the cosine similarity ``<g, grad f> / (|g| |grad f|)`` (direction), and
- the norm ratio ``|g| / |grad f|`` (length).

For the orthogonal projection the two are equal (``g`` is the projection of ``grad f``); for ``n >> k`` the cosine
is about ``sqrt(k / n)`` for both the mean and the projection, while the mean's norm ratio is about
``sqrt(n / k)`` (it overshoots) and the projection's ``sqrt(k / n)`` (it undershoots).

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalgo.grads import Aggregation, forward_gradient
from jaxalgo.grads._forward import Tangents


class Approximation(NamedTuple):
    """Scores of one setting, one entry per seed."""

    num_params: int
    num_tangents: int
    aggregation: Aggregation
    cosine: jax.Array
    norm_ratio: jax.Array


def _sum_loss(params, batch):
    del batch
    return jnp.sum(params)


def approximation_quality(
    num_params: int,
    num_tangents: int,
    aggregation: Aggregation,
    *,
    key: jax.Array,
    num_seeds: int = 5,
    tangents: Tangents = "gaussian",
    scaling_correction: bool = False,
) -> Approximation:
    """Cosine similarity and norm ratio of the estimate of ``grad f = 1`` for ``num_seeds`` independent keys.

    Args:
      num_params: ``n >= 1``.
      num_tangents: ``k >= 1``.
      aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal_projection"``.
      key: seeds are ``fold_in(key, s)``.
      num_seeds: number of independent estimates.
      tangents: ``"gaussian"`` or ``"rademacher"`` (``"rank1"`` needs a matrix parameter, see
        :func:`jaxalgo.grads.rank1_forward_gradient`).
      scaling_correction: apply the reference's correction factor.

    Returns:
      An :class:`Approximation` with arrays of shape ``(num_seeds,)``.
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 1:
        raise ValueError(f"num_params: must be an integer >= 1, got {num_params!r}")
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f"num_seeds: must be an integer >= 1, got {num_seeds!r}")
    est = forward_gradient(
        _sum_loss,
        num_tangents=num_tangents,
        aggregation=aggregation,
        tangents=tangents,
        scaling_correction=scaling_correction,
        batching="scan" if num_tangents * num_params > (1 << 24) else "vmap",
    )
    x = jnp.zeros(num_params)
    grad = jnp.ones(num_params)

    @jax.jit
    def scores(seed_keys):
        def one(seed_key):
            _, g, _ = est.value_and_grad(x, est.init(x), None, key=seed_key)
            g_norm = jnp.linalg.norm(g)
            return g @ grad / (g_norm * jnp.linalg.norm(grad)), g_norm / jnp.linalg.norm(grad)

        return jax.lax.map(one, seed_keys)

    seed_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_seeds))
    cosine, norm_ratio = scores(seed_keys)
    return Approximation(num_params, num_tangents, aggregation, cosine, norm_ratio)


def approximation_sweep(
    num_params: Iterable[int],
    num_tangents: Iterable[int],
    aggregations: Iterable[Aggregation] = ("mean", "orthogonal_projection"),
    *,
    key: jax.Array,
    num_seeds: int = 5,
    tangents: Tangents = "gaussian",
) -> list[Approximation]:
    """:func:`approximation_quality` over a grid of ``n``, ``k`` and aggregations (the same seeds everywhere)."""
    return [
        approximation_quality(n, k, aggregation, key=key, num_seeds=num_seeds, tangents=tangents)
        for aggregation in aggregations
        for n in num_params
        for k in num_tangents
    ]
