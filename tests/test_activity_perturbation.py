"""Activity-perturbation forward gradients: forward mode equals its simulated counterpart, the projection with as many
tangents as activity dimensions is the exact gradient, the mean is unbiased, local losses, ViT chains, bad input, and
a short digits run."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalgo
import jaxalgo.losses
import jaxalgo.parallel
from jaxalgo.config import RunConfig
from jaxalgo.grads import activity_forward_gradient, sample_activity_tangents
from jaxalgo.train import train_and_evaluate

CE = jaxalgo.losses.softmax_cross_entropy
HIDDEN = (4, 5)
ACTIVITY_DIM = 4 + 5 + 3  # per example: the outputs of the three blocks of the MLP 6-4-5-3


@functools.cache
def mlp_problem(batch_size=7):
    fn, params = jaxalgo.models.split_chain(jaxalgo.models.mlp((6,), 3, hidden=HIDDEN, key=jax.random.key(0)))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)  # jax arrays inside enable_x64
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(batch_size, 6)), "y": rng.integers(0, 3, size=batch_size)}
    return fn, params, batch


@functools.partial(jax.jit, static_argnums=0)
def exact_gradient(fn, params, batch):
    return jax.grad(lambda p: CE(fn(p, batch["x"]), batch["y"]))(params)


def random_readouts(readout_key):
    """The documented fixed readouts of the MLP 6-4-5-3: entries N(0, 1/|h_l|) from fold_in(readout_key, l)."""
    return [
        jax.random.normal(jax.random.fold_in(readout_key, index), (size, 3), jnp.float64) / np.sqrt(size)
        for index, size in enumerate(HIDDEN)
    ]


@functools.partial(jax.jit, static_argnums=0)
def local_loss_gradient(fn, params, batch, readouts):
    """Oracle for local losses: backprop through sum_l L_l(f_l(theta_l, stop_gradient(h_{l-1}))), with
    L_l = CE(h_l R_l) for the hidden blocks and the true loss for the last one."""

    def total(p):
        h, value = batch["x"], 0.0
        for index, block_params in enumerate(p):
            h = fn.apply_block(index, block_params, jax.lax.stop_gradient(h))
            head = h @ readouts[index] if index < fn.num_blocks - 1 else h
            value = value + CE(head, batch["y"])
        return value

    return jax.grad(total)(params)


def estimate(est, params, batch, key):
    """``est.value_and_grad`` jitted once per estimator (further keys reuse the compilation)."""
    if est not in _JITTED:
        _JITTED[est] = jax.jit(lambda p, b, k: est.value_and_grad(p, est.init(p), b, key=k))
    return _JITTED[est](params, batch, key)


_JITTED: dict = {}


@pytest.mark.parametrize(
    "options",
    [
        {"aggregation": "orthogonal_projection", "num_tangents": 5},
        {"aggregation": "sum", "num_tangents": 2, "tangents": "rademacher", "normalize_tangents": True},
        {"aggregation": "orthogonal_projection", "num_tangents": 3, "local_losses": True, "scaling_correction": True},
    ],
)
def test_forward_mode_equals_simulated_mode_for_the_same_key(options):
    fn, params, batch = mlp_problem()
    forward = activity_forward_gradient(fn, CE, mode="forward", **options)
    simulated = activity_forward_gradient(fn, CE, mode="simulated", **options)

    @jax.jit
    def both(params, batch):
        run = lambda est, seed: est.value_and_grad(params, None, batch, key=jax.random.key(seed))[:2]
        return run(forward, 3), run(simulated, 3), run(forward, 4)[1]

    with jax.enable_x64(True):
        (loss_f, grads_f), (loss_s, grads_s), other = both(params, batch)
        chex.assert_trees_all_close(grads_f, grads_s, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(loss_f, CE(fn(params, batch["x"]), batch["y"]), rtol=1e-12)
        np.testing.assert_allclose(loss_f, loss_s, rtol=1e-12)
        # A different key gives a different estimate (the tangents really are random).
        assert not np.allclose(other[0]["linear"]["kernel"], grads_f[0]["linear"]["kernel"])


def test_projection_with_as_many_tangents_as_activity_dimensions_is_the_exact_gradient():
    fn, params, batch = mlp_problem()
    projections = {
        k: activity_forward_gradient(fn, CE, num_tangents=k, aggregation="orthogonal_projection")
        for k in (ACTIVITY_DIM, ACTIVITY_DIM + 3, ACTIVITY_DIM - 1)  # k > N uses the first N tangents
    }

    @jax.jit
    def all_estimates(params, batch):
        return {k: est.value_and_grad(params, None, batch, key=jax.random.key(1))[1] for k, est in projections.items()}

    with jax.enable_x64(True):
        grads = all_estimates(params, batch)
        exact = exact_gradient(fn, params, batch)
        chex.assert_trees_all_close(grads[ACTIVITY_DIM], exact, rtol=1e-9, atol=1e-12)
        chex.assert_trees_all_close(grads[ACTIVITY_DIM + 3], exact, rtol=1e-9, atol=1e-12)
        # One tangent fewer is a strict projection: no longer the gradient.
        gap = jax.tree.map(lambda a, b: np.abs(a - b).max(), grads[ACTIVITY_DIM - 1], exact)
        assert max(jax.tree.leaves(gap)) > 1e-4


def test_local_losses_projection_with_enough_tangents_is_the_exact_local_gradient():
    fn, params, batch = mlp_problem()
    with jax.enable_x64(True):
        key = jax.random.key(11)
        est = activity_forward_gradient(
            fn, CE, num_tangents=max(HIDDEN), aggregation="orthogonal_projection", local_losses=True, readout_key=key
        )
        loss, grads, _ = estimate(est, params, batch, jax.random.key(1))
        oracle = local_loss_gradient(fn, params, batch, random_readouts(key))
        chex.assert_trees_all_close(grads, oracle, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(loss, CE(fn(params, batch["x"]), batch["y"]), rtol=1e-12)  # the true loss
        # The local objective differs from the global one: the hidden blocks' gradients are not backprop's.
        assert not np.allclose(grads[0]["linear"]["kernel"], exact_gradient(fn, params, batch)[0]["linear"]["kernel"])


def test_learned_readouts_take_an_sgd_step_on_their_local_loss_and_drive_the_estimate():
    fn, params, batch = mlp_problem()
    rate, key = 0.5, jax.random.key(2)
    options = {"num_tangents": max(HIDDEN), "aggregation": "orthogonal_projection", "local_losses": True}
    est = activity_forward_gradient(fn, CE, **options, readout_key=key, readout_learning_rate=rate, input_shape=(6,))

    @jax.jit
    def two_steps(params, batch, state):
        _, first, state = est.value_and_grad(params, state, batch, key=jax.random.key(0))
        _, second, new_state = est.value_and_grad(params, state, batch, key=jax.random.key(1))
        return first, state, second, new_state

    with jax.enable_x64(True):
        state = est.init(params)
        assert isinstance(state, jaxalgo.grads.LocalReadoutState)
        chex.assert_trees_all_close(list(state.readouts), random_readouts(key), rtol=1e-12)
        first, after_one, second, _ = two_steps(params, batch, state)
        # The readouts moved by one SGD step on their own loss; the gradients used the readouts of their step.
        hidden = fn.block_outputs(params, batch["x"])[:-1]
        for h, old, new in zip(hidden, state.readouts, after_one.readouts, strict=True):
            grad = jax.grad(lambda r, h=h: CE(h @ r, batch["y"]))(old)
            np.testing.assert_allclose(new, old - rate * grad, rtol=1e-10, atol=1e-14)
            assert np.abs(new - old).max() > 1e-4
        chex.assert_trees_all_close(first, local_loss_gradient(fn, params, batch, state.readouts), rtol=1e-9)
        chex.assert_trees_all_close(second, local_loss_gradient(fn, params, batch, after_one.readouts), rtol=1e-9)


def test_mean_is_unbiased_and_sum_is_k_times_mean():
    # alpha_j = <g_j, g> / <g, g> for M independent estimates g_j: E[alpha] = 1 for an unbiased estimator. The bound
    # 4 standard errors (< 0.08 here) fails for a wrong scale (x k, x 1/k, the projection's k/N, 1/N-normalised).
    # Checked for the global loss (target: backprop) and for local losses (target: the local-loss gradient).
    fn, params, batch = mlp_problem()
    num_draws, k = 2000, 4
    readout_key = jax.random.key(0)

    def flat(tree):
        return jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])

    @jax.jit
    def alphas(keys):
        results = []
        for local in (False, True):
            target = local_loss_gradient(fn, params, batch, random_readouts(readout_key)) if local else None
            target = exact_gradient(fn, params, batch) if target is None else target
            target = flat(target)
            mean = activity_forward_gradient(fn, CE, num_tangents=k, aggregation="mean", local_losses=local)
            total = activity_forward_gradient(fn, CE, num_tangents=k, aggregation="sum", local_losses=local)

            def one(key, mean=mean, total=total, target=target):
                g = flat(mean.value_and_grad(params, None, batch, key=key)[1])
                s = flat(total.value_and_grad(params, None, batch, key=key)[1])
                return g @ target / (target @ target), jnp.abs(s - k * g).max()

            results.append(jax.vmap(one)(keys))
        return results

    with jax.enable_x64(True):
        for values, sum_gap in alphas(jax.random.split(jax.random.key(5), num_draws)):
            standard_error = float(values.std() / np.sqrt(num_draws))
            assert standard_error < 0.02
            assert abs(float(values.mean()) - 1.0) < 4 * standard_error
            assert float(sum_gap.max()) < 1e-12


def test_vit_chain_projection_with_as_many_tangents_as_activity_dimensions_is_exact():
    # Exactness needs d = U delta to hold to rounding for every example: it checks the forward-mode pass through
    # patch embedding, attention, LayerNorm and the token-mean head.
    chain = jaxalgo.models.vit((4, 4, 1), 3, patch_size=2, dim=4, depth=1, heads=2, mlp_dim=8, key=jax.random.key(0))
    fn, params = jaxalgo.models.split_chain(chain)
    rng = np.random.default_rng(1)
    activity_dim = 4 * 4 + 4 * 4 + 3  # 4 tokens x dim 4 (embedding, transformer block), 3 logits
    projection = activity_forward_gradient(fn, CE, num_tangents=activity_dim, aggregation="orthogonal_projection")

    @jax.jit
    def everything(params, batch):
        run = lambda est, seed: est.value_and_grad(params, None, batch, key=jax.random.key(seed))[1]
        exact = jax.grad(lambda p: CE(fn(p, batch["x"]), batch["y"]))(params)
        return exact, run(projection, 0)

    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        batch = {"x": rng.normal(size=(2, 4, 4, 1)), "y": rng.integers(0, 3, size=2)}
        exact, projected = everything(params, batch)
        chex.assert_trees_all_close(projected, exact, rtol=1e-8, atol=1e-11)


def test_tangents_are_folded_per_index_and_shared_by_the_batch():
    shapes = ((2, 3), (4,))

    @jax.jit
    def draw(key):
        return (
            sample_activity_tangents(key, 3, shapes, jnp.float32),
            sample_activity_tangents(key, 2, shapes, jnp.float32, distribution="rademacher"),
            sample_activity_tangents(key, 2, shapes, jnp.float32, normalize=True),
        )

    us, signs, unit = draw(jax.random.key(7))
    assert [u.shape for u in us] == [(3, 2, 3), (3, 4)]
    second = jax.random.normal(jax.random.fold_in(jax.random.key(7), 1), (10,), jnp.float32)
    np.testing.assert_allclose(np.concatenate([us[0][1].ravel(), us[1][1]]), second, rtol=1e-6)
    assert set(np.unique(np.concatenate([s.reshape(2, -1) for s in signs], axis=1)).tolist()) <= {-1.0, 1.0}
    norms = np.linalg.norm(np.concatenate([u.reshape(2, -1) for u in unit], axis=1), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)


def test_data_parallel_estimate_equals_the_single_device_estimate():
    # Every shard draws the same tangents from the same key and each example's estimate depends only on that
    # example, so averaging the shards' estimates of their mean losses gives the full-batch estimate.
    fn, params, batch = mlp_problem(batch_size=16)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    batch = {"x": batch["x"].astype(np.float32), "y": batch["y"]}
    est = activity_forward_gradient(fn, CE, num_tangents=3, aggregation="orthogonal_projection")
    parallel = jaxalgo.parallel.data_parallel(est, jaxalgo.parallel.make_mesh((2, 4)))
    single_loss, single, _ = estimate(est, params, batch, jax.random.key(3))
    loss, grads, _ = jax.jit(lambda p, b, k: parallel.value_and_grad(p, parallel.init(p), b, key=k))(
        params, batch, jax.random.key(3)
    )
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, single, rtol=1e-4, atol=1e-6)


def test_bfloat16_parameters_give_finite_estimates_in_their_dtype():
    fn, params, batch = mlp_problem()
    cast = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    x = {"x": jnp.asarray(batch["x"], jnp.bfloat16), "y": batch["y"]}
    est = activity_forward_gradient(fn, CE, num_tangents=4, aggregation="orthogonal_projection")
    loss, grads, _ = estimate(est, cast, x, jax.random.key(0))
    assert np.isfinite(float(loss))
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == jnp.bfloat16 and np.isfinite(np.asarray(leaf, np.float32)).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_tangents": 0}, "num_tangents: must be an integer >= 1, got 0"),
        ({"num_tangents": 2.0}, "num_tangents: must be an integer >= 1, got 2.0"),
        ({"num_tangents": 2, "aggregation": "median"}, "aggregation: unknown aggregation 'median'"),
        ({"num_tangents": 2, "tangents": "uniform"}, "tangents: unknown tangent distribution 'uniform'"),
        ({"num_tangents": 2, "mode": "backward"}, "mode: unknown mode 'backward'"),
    ],
)
def test_bad_options_are_rejected_at_construction(options, message):
    fn, _, _ = mlp_problem()
    with pytest.raises(ValueError, match=message):
        activity_forward_gradient(fn, CE, **options)


def test_bad_inputs_name_the_argument():
    fn, params, batch = mlp_problem()
    with pytest.raises(TypeError, match=r"chain: expected a jaxalgo\.models\.ChainFn"):
        activity_forward_gradient(lambda p, x: x, CE, num_tangents=1)
    with pytest.raises(TypeError, match="output_loss: expected a callable"):
        activity_forward_gradient(fn, "cross_entropy", num_tangents=1)
    per_example = activity_forward_gradient(fn, lambda y, t: jnp.sum(y, axis=-1), num_tangents=1)
    with pytest.raises(TypeError, match=r"output_loss: must return a floating-point scalar .*; got shape \(7,\)"):
        per_example.value_and_grad(params, None, batch, key=jax.random.key(0))
    est = activity_forward_gradient(fn, CE, num_tangents=1)
    with pytest.raises(ValueError, match="batch: expected a mapping with keys 'x'"):
        est.value_and_grad(params, None, {"x": batch["x"]}, key=jax.random.key(0))
    with pytest.raises(ValueError, match="params: expected a sequence of 3 per-block dicts"):
        est.value_and_grad(params[:2], None, batch, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"readout_learning_rate: must be a number >= 0, got -1\.0"):
        activity_forward_gradient(fn, CE, num_tangents=1, local_losses=True, readout_learning_rate=-1.0)
    with pytest.raises(ValueError, match="readout_learning_rate: learned readouts need local_losses=True"):
        activity_forward_gradient(fn, CE, num_tangents=1, readout_learning_rate=0.1, input_shape=(6,))
    with pytest.raises(ValueError, match="input_shape: learned readouts"):
        activity_forward_gradient(fn, CE, num_tangents=1, local_losses=True, readout_learning_rate=0.1)
    with pytest.raises(TypeError, match="params: leaf"):
        est.init(jax.tree.map(lambda a: a.astype(jnp.int32), params))


def test_frog_activity_learns_digits_from_the_command_line_registry(tmp_path):
    config = RunConfig.from_flags(
        estimator="frog-activity", tangents=16, optimizer="adam", lr=1e-3, epochs=5, quiet=True
    )
    final = train_and_evaluate(config, tmp_path)
    assert final["test_accuracy"] >= 0.90
