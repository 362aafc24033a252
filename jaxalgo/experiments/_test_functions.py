"""Closed-form test functions and plain gradient descent with any gradient estimator (the paper's section V-B).

- Sphere: ``f(x) = sum_i x_i^2``, minimum 0 at 0; started at ``x = -1``.
- Rosenbrock: ``f(x) = sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``, minimum 0 at ``x = 1``; started at
  ``(-1, 0, ..., 0)``.
- Styblinski-Tang: ``f(x) = 0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i)``, global minimum about ``-39.16617 n`` at
  ``x_i = -2.903534`` (the paper quotes ``-39.16599 n``); started at 0.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxalgo.grads import Estimator


def sphere(x: jax.Array) -> jax.Array:
    """``sum_i x_i^2``."""
    return jnp.sum(x * x)


def rosenbrock(x: jax.Array) -> jax.Array:
    """``sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`` (0 for ``n = 1``)."""
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def styblinski_tang(x: jax.Array) -> jax.Array:
    """``0.5 sum_i (x_i^4 - 16 x_i^2 + 5 x_i)``."""
    return 0.5 * jnp.sum(x**4 - 16.0 * x**2 + 5.0 * x)


STYBLINSKI_TANG_MINIMUM_PER_DIM = -39.16616570377142
"""The minimum of ``0.5 (x^4 - 16 x^2 + 5 x)`` (at ``x = -2.9035340...``); the paper rounds it to -39.16599."""


class Objective(NamedTuple):
    """A test function with the paper's start point and its known minimum value."""

    fn: Callable[[jax.Array], jax.Array]
    start: Callable[[int], jax.Array]
    minimum: Callable[[int], float]


TEST_FUNCTIONS: dict[str, Objective] = {
    "sphere": Objective(sphere, lambda n: -jnp.ones(n), lambda n: 0.0),
    "rosenbrock": Objective(rosenbrock, lambda n: jnp.zeros(n).at[0].set(-1.0), lambda n: 0.0),
    "styblinski_tang": Objective(
        styblinski_tang, lambda n: jnp.zeros(n), lambda n: STYBLINSKI_TANG_MINIMUM_PER_DIM * n
    ),
}


def as_loss(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array, Any], jax.Array]:
    """``fn(x)`` as an estimator's ``loss_fn(params, batch)`` (the batch is ignored)."""
    return lambda params, batch: fn(params)


def gradient_descent(
    estimator: Estimator, x0: jax.Array, *, learning_rate: float, steps: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Plain gradient descent ``x <- x - lr g`` with ``g`` from ``estimator`` (whose loss ignores its batch).

    Step ``s`` uses the key ``fold_in(key, s)``. Jit-compatible (one ``lax.scan``).

    Args:
      estimator: built on ``as_loss(fn)``, e.g. ``forward_gradient(as_loss(styblinski_tang), num_tangents=4)``.
      x0: start point.
      learning_rate: constant step size (> 0).
      steps: number of steps (>= 0).
      key: PRNG key.

    Returns:
      ``(x, values)``: the final point and the loss before each step and after the last, shape ``(steps + 1,)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: must be an integer >= 0, got {steps!r}")
    state = estimator.init(x0)

    def step(carry, s):
        x, state = carry
        loss, grads, state = estimator.value_and_grad(x, state, None, key=jax.random.fold_in(key, s))
        return (x - learning_rate * grads, state), loss

    (x, state), values = jax.lax.scan(step, (x0, state), jnp.arange(steps))
    final, _, _ = estimator.value_and_grad(x, state, None, key=jax.random.fold_in(key, steps))
    return x, jnp.append(values, final)
