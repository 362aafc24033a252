"""Backprop behind the estimator interface: the exact gradient, optax composition, and input checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalgo


def quadratic_loss(params, batch):
    # f(w, b) = 0.5 |X w + b - y|^2 / B: gradient X^T r / B and mean(r), r = X w + b - y.
    residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return 0.5 * jnp.mean(residual**2)


def make_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.normal(size=(16,)).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "b": jnp.float32(0.3)}
    return params, {"x": x, "y": y}


def test_backprop_equals_closed_form_gradient():
    params, batch = make_problem()
    est = jaxalgo.grads.backprop(quadratic_loss)
    state = est.init(params)
    loss, grads, new_state = est.value_and_grad(params, state, batch, key=jax.random.key(0))
    residual = batch["x"] @ np.asarray(params["w"]) + float(params["b"]) - batch["y"]
    chex.assert_trees_all_close(grads, {"w": batch["x"].T @ residual / 16, "b": np.float32(residual.mean())}, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * np.mean(residual**2), rtol=1e-5)
    assert new_state == state


def test_backprop_with_aux_returns_the_pair():
    params, batch = make_problem()
    est = jaxalgo.grads.backprop(lambda p, b: (quadratic_loss(p, b), {"n": b["x"].shape[0]}), has_aux=True)
    (loss, aux), grads, _ = est.value_and_grad(params, est.init(params), batch, key=jax.random.key(0))
    assert aux == {"n": 16}
    chex.assert_trees_all_equal_structs(grads, params)
    assert loss.shape == ()


def test_gradients_feed_optax_and_minimise():
    params, batch = make_problem()
    est, tx = jaxalgo.grads.backprop(quadratic_loss), optax.adam(0.05)
    state, opt_state = est.init(params), tx.init(params)

    @jax.jit
    def step(params, state, opt_state, key):
        loss, grads, state = est.value_and_grad(params, state, batch, key=key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    first = None
    for i in range(300):
        params, state, opt_state, loss = step(params, state, opt_state, jax.random.key(i))
        first = loss if first is None else first
    # Least squares optimum, computed independently.
    design = np.hstack([batch["x"], np.ones((16, 1), np.float32)])
    solution, *_ = np.linalg.lstsq(design, batch["y"], rcond=None)
    optimum = 0.5 * np.mean((design @ solution - batch["y"]) ** 2)
    assert float(loss) < float(first)
    np.testing.assert_allclose(float(loss), optimum, rtol=1e-3)


def test_non_scalar_loss_is_refused():
    params, batch = make_problem()
    est = jaxalgo.grads.backprop(lambda p, b: b["x"] @ p["w"])
    with pytest.raises(TypeError, match=r"loss_fn: must return a floating-point scalar; got shape \(16,\)"):
        est.value_and_grad(params, est.init(params), batch, key=jax.random.key(0))


def test_integer_parameters_are_refused():
    with pytest.raises(TypeError, match=r"params: leaf \['n'\] has dtype int32"):
        jaxalgo.grads.backprop(quadratic_loss).init({"n": jnp.int32(3)})


def test_non_callable_loss_is_refused():
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        jaxalgo.grads.backprop("loss")
