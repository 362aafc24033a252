"""The paper's experiments as library functions: closed-form test functions, gradient descent, approximation quality."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalgo.experiments import (
    STYBLINSKI_TANG_MINIMUM_PER_DIM,
    TEST_FUNCTIONS,
    approximation_quality,
    as_loss,
    gradient_descent,
    rosenbrock,
    sphere,
    styblinski_tang,
)
from jaxalgo.grads import backprop, forward_gradient


def test_functions_and_their_minima_match_closed_forms():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(5))
    np.testing.assert_allclose(jax.grad(sphere)(x), 2 * x, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(styblinski_tang)(x), 0.5 * (4 * x**3 - 32 * x + 5), rtol=1e-5)
    expected = np.zeros(5)
    xs = np.asarray(x)
    expected[:-1] += -400 * xs[:-1] * (xs[1:] - xs[:-1] ** 2) - 2 * (1 - xs[:-1])
    expected[1:] += 200 * (xs[1:] - xs[:-1] ** 2)
    np.testing.assert_allclose(jax.grad(rosenbrock)(x), expected, rtol=1e-5)
    assert float(rosenbrock(jnp.ones(5))) == 0.0 and float(sphere(jnp.zeros(5))) == 0.0
    # The Styblinski-Tang minimiser is the root of 2 x^3 - 16 x + 2.5 near -2.9035.
    root = min(np.roots([2.0, 0.0, -16.0, 2.5]).real)
    np.testing.assert_allclose(0.5 * (root**4 - 16 * root**2 + 5 * root), STYBLINSKI_TANG_MINIMUM_PER_DIM, rtol=1e-12)
    for name, problem in TEST_FUNCTIONS.items():
        assert problem.start(4).shape == (4,), name


def _final_values(estimator, n, learning_rate, steps, seeds):
    problem = TEST_FUNCTIONS["styblinski_tang"]
    run = lambda key: gradient_descent(estimator, problem.start(n), learning_rate=learning_rate, steps=steps, key=key)
    x, values = jax.jit(jax.vmap(run))(jax.vmap(jax.random.key)(jnp.arange(seeds)))
    return x, values


def test_styblinski_tang_projection_with_k_equal_n_reaches_the_optimum():
    n = 16
    est = forward_gradient(as_loss(styblinski_tang), num_tangents=16, aggregation="orthogonal_projection")
    x, values = _final_values(est, n, 0.01, 1000, seeds=3)
    final = np.asarray(values[:, -1]) / n
    np.testing.assert_allclose(final, -39.16599, atol=1e-3)  # the paper's rounded optimum, per dimension
    np.testing.assert_allclose(x, -2.903534, atol=1e-3)
    _, exact_values = gradient_descent(
        backprop(as_loss(styblinski_tang)), jnp.zeros(n), learning_rate=0.01, steps=1000, key=jax.random.key(0)
    )
    np.testing.assert_allclose(exact_values[-1] / n, STYBLINSKI_TANG_MINIMUM_PER_DIM, rtol=1e-6)


def test_styblinski_tang_mean_with_more_tangents_gets_lower():
    n = 16
    finals = {}
    for k in (1, 4):
        est = forward_gradient(as_loss(styblinski_tang), num_tangents=k, aggregation="mean")
        _, values = _final_values(est, n, 0.002, 1000, seeds=5)
        finals[k] = np.asarray(values[:, -1])
    assert finals[4].mean() < finals[1].mean() - n * 0.5, finals
    assert np.all(finals[4] <= finals[1] + 1e-3), finals  # at every seed


def test_gradient_descent_records_values_and_rejects_bad_steps():
    est = backprop(as_loss(sphere))
    x, values = gradient_descent(est, -jnp.ones(3), learning_rate=0.25, steps=2, key=jax.random.key(0))
    np.testing.assert_allclose(values, [3.0, 0.75, 0.1875])  # x <- x (1 - 2 lr) = x / 2
    np.testing.assert_allclose(x, -0.25 * jnp.ones(3))
    with pytest.raises(ValueError, match="steps: must be an integer >= 0, got -1"):
        gradient_descent(est, jnp.ones(3), learning_rate=0.1, steps=-1, key=jax.random.key(0))


def test_approximation_quality_follows_sqrt_k_over_n():
    n, k = 1024, 16
    key = jax.random.key(0)
    projection = approximation_quality(n, k, "orthogonal_projection", key=key, num_seeds=8)
    mean = approximation_quality(n, k, "mean", key=key, num_seeds=8)
    np.testing.assert_allclose(projection.cosine, projection.norm_ratio, rtol=1e-4)
    expected = math.sqrt(k / n)
    assert abs(float(jnp.mean(projection.cosine)) / expected - 1) < 0.15
    assert abs(float(jnp.mean(mean.cosine)) / expected - 1) < 0.15
    assert abs(float(jnp.mean(mean.norm_ratio)) / math.sqrt(n / k) - 1) < 0.15  # the mean overshoots
    full = approximation_quality(8, 8, "orthogonal_projection", key=key, num_seeds=2)
    np.testing.assert_allclose(full.cosine, 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="num_params: must be an integer >= 1, got 0"):
        approximation_quality(0, 1, "mean", key=key)
