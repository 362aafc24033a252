"""The rank-1 forward-gradient estimator against independent oracles (exact gradient, closed forms, statistics)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mlp_problem import loss_fn
from _mlp_problem import make_problem as mlp_problem
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import rank1_directional, rank1_fallbacks, rank1_forward_gradient
from jaxalgo.grads._combine import scaling_correction


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def make_problem(sizes=(5, 6, 3), batch=8, seed=0):
    return mlp_problem(sizes, batch, seed)


def flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def estimate(params, batch, key, **options):
    est = rank1_forward_gradient(loss_fn, **options)
    return jax.jit(lambda p, b, k: est.value_and_grad(p, est.init(p), b, key=k)[:2])(params, batch, key)


def test_no_weight_tangent_is_materialised_in_an_mlp():
    params, batch = make_problem()
    assert rank1_fallbacks(loss_fn, params, batch) == []


def test_loss_is_exact_and_projection_satisfies_cosine_equals_norm_ratio():
    params, batch = make_problem(sizes=(6, 16, 16, 4))
    true = flat(jax.grad(loss_fn)(params, batch))
    loss, grads = estimate(params, batch, jax.random.key(1), num_tangents=5, aggregation="orthogonal_projection")
    np.testing.assert_allclose(loss, loss_fn(params, batch), rtol=1e-12)
    g = flat(grads)
    cosine = g @ true / (jnp.linalg.norm(g) * jnp.linalg.norm(true))
    assert 0.05 < cosine < 0.99
    np.testing.assert_allclose(cosine, jnp.linalg.norm(g) / jnp.linalg.norm(true), rtol=1e-9)
    # Projection: the residual is orthogonal to the estimate.
    np.testing.assert_allclose(g @ (true - g), 0.0, atol=1e-10)


@pytest.mark.parametrize("extra", [0, 3])
def test_projection_with_at_least_n_tangents_is_the_exact_gradient(extra):
    params, batch = make_problem(sizes=(2, 3))  # n = 2 * 3 + 3 = 9 parameters
    n = 9
    _, grads = estimate(params, batch, jax.random.key(2), num_tangents=n + extra, aggregation="orthogonal_projection")
    np.testing.assert_allclose(flat(grads), flat(jax.grad(loss_fn)(params, batch)), rtol=1e-7, atol=1e-9)


def test_mean_estimator_is_unbiased():
    """E[(1/k) sum_i (g . v_i) v_i] = g because E[v v^T] = I for v = a b^T (a, b independent standard normals)."""
    params, batch = make_problem(sizes=(3, 4, 2))
    true = flat(jax.grad(loss_fn)(params, batch))
    parts = rank1_directional(loss_fn, num_tangents=4, aggregation="mean")

    @jax.jit
    def samples(keys):
        def one(key):
            _, d = parts.directional_derivatives(params, batch, key=key)
            return flat(parts.estimate_from_directional(params, d, key=key))

        return jax.vmap(one)(keys)

    draws = samples(jax.random.split(jax.random.key(3), 20000))
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    z = (mean - true) / stderr
    assert np.max(np.abs(z)) < 4.5, z
    # Not a vacuous test: a biased estimator (here: 0.8 g) is caught.
    assert np.max(np.abs((0.8 * mean - true) / stderr)) > 4.5


def test_sum_is_k_times_mean_and_scaling_correction_is_the_reference_factor():
    params, batch = make_problem()
    key = jax.random.key(4)
    variants = [(a, c) for a in ("sum", "mean", "orthogonal_projection") for c in (False, True)]

    @jax.jit
    def all_variants(params, batch, key):
        out = {}
        for aggregation, correction in variants:
            est = rank1_forward_gradient(
                loss_fn, num_tangents=3, aggregation=aggregation, scaling_correction=correction
            )
            out[aggregation, correction] = flat(est.value_and_grad(params, None, batch, key=key)[1])
        return out

    g = all_variants(params, batch, key)
    np.testing.assert_allclose(g["sum", False], 3 * g["mean", False], rtol=1e-12)
    n = flat(params).size
    for aggregation in ("sum", "mean", "orthogonal_projection"):
        factor = scaling_correction(aggregation, num_tangents=3, num_params=n)
        np.testing.assert_allclose(g[aggregation, True], factor * g[aggregation, False], rtol=1e-12)


def test_estimate_for_a_key_is_independent_of_the_batching_strategy():
    params, batch = make_problem(batch=8)
    key = jax.random.key(5)
    options = {"num_tangents": 4, "aggregation": "orthogonal_projection"}
    loss_v, vmapped = estimate(params, batch, key, batching="vmap", **options)
    loss_s, scanned = estimate(params, batch, key, batching="scan", **options)
    np.testing.assert_allclose(loss_s, loss_v, rtol=1e-12)
    np.testing.assert_allclose(flat(scanned), flat(vmapped), rtol=1e-10)
    # Micro-batches: the directional derivatives of a mean loss average over equal shards.
    parts = rank1_directional(loss_fn, **options)

    @jax.jit
    def in_two_halves(params, batch, key):
        halves = [jax.tree.map(lambda x, i=i: x[4 * i : 4 * i + 4], batch) for i in range(2)]
        d = sum(parts.directional_derivatives(params, h, key=key)[1] for h in halves) / 2
        return parts.estimate_from_directional(params, d, key=key)

    np.testing.assert_allclose(flat(in_two_halves(params, batch, key)), flat(vmapped), rtol=1e-10)


def test_data_parallel_all_reduces_only_the_directional_derivatives():
    params, batch = make_problem(batch=16)
    key = jax.random.key(6)
    parts = rank1_directional(loss_fn, num_tangents=4, aggregation="orthogonal_projection")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))

    def local(params, batch, key):
        loss, d = parts.directional_derivatives(params, batch, key=key)
        loss, d = jax.lax.pmean((loss, d), "data")  # k + 1 numbers cross the network
        return loss, parts.estimate_from_directional(params, d, key=key)

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P())))
    batch_sharded = jax.device_put(batch, jax.sharding.NamedSharding(mesh, P("data")))
    loss, grads = sharded(params, batch_sharded, key)
    ref_loss, ref = estimate(params, batch, key, num_tangents=4, aggregation="orthogonal_projection")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(flat(grads), flat(ref), rtol=1e-9)


def test_has_aux_returns_the_pair_and_ignores_the_aux():
    params, batch = make_problem()

    def with_aux(p, b):
        return loss_fn(p, b), {"norm": jnp.sum(p["w0"] ** 2)}

    est = rank1_forward_gradient(with_aux, num_tangents=3, has_aux=True)
    (loss, aux), grads, _ = jax.jit(lambda p, b, k: est.value_and_grad(p, None, b, key=k))(
        params, batch, jax.random.key(7)
    )
    _, plain = estimate(params, batch, jax.random.key(7), num_tangents=3)
    np.testing.assert_allclose(aux["norm"], jnp.sum(params["w0"] ** 2), rtol=1e-12)
    np.testing.assert_allclose(loss, loss_fn(params, batch), rtol=1e-12)
    np.testing.assert_allclose(flat(grads), flat(plain), rtol=1e-12)


def test_rank1_step_needs_far_less_compiled_memory_than_dense_gaussian_tangents():
    """Compiled temp bytes (deterministic): rank-1 FROG vs the same step with dense k x n Gaussian tangents."""
    params, batch = make_problem(sizes=(32, 128, 128, 10), batch=16)
    k = 8
    est = rank1_forward_gradient(loss_fn, num_tangents=k, aggregation="orthogonal_projection")

    def rank1_step(p, b, key):
        return est.value_and_grad(p, None, b, key=key)[1]

    def dense_step(p, b, key):
        leaves, treedef = jax.tree.flatten(p)
        draws = jax.random.normal(key, (k, sum(x.size for x in leaves)))
        splits = np.cumsum([x.size for x in leaves])[:-1]
        v = [t.reshape(k, *x.shape) for t, x in zip(jnp.split(draws, splits, axis=1), leaves, strict=True)]
        d = jax.vmap(lambda t: jax.jvp(lambda q: loss_fn(q, b), (p,), (jax.tree.unflatten(treedef, t),))[1])(v)
        flat_v = jnp.concatenate([t.reshape(k, -1) for t in v], axis=1)
        c = jnp.linalg.solve(flat_v @ flat_v.T, d)
        return jax.tree.unflatten(treedef, [jnp.tensordot(c, t, axes=1) for t in v])

    def temp_bytes(fn):
        compiled = jax.jit(fn).lower(params, batch, jax.random.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    rank1, dense = temp_bytes(rank1_step), temp_bytes(dense_step)
    n = flat(params).size
    assert dense >= k * n * 8  # the k x n tangent matrix
    assert rank1 < dense / 4, (rank1, dense)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_tangents": 0}, "num_tangents: must be an integer >= 1, got 0"),
        ({"num_tangents": True}, "num_tangents: must be an integer >= 1, got True"),
        ({"num_tangents": 2.0}, "num_tangents: must be an integer >= 1, got 2.0"),
        ({"num_tangents": 2, "aggregation": "median"}, "aggregation: unknown aggregation 'median'"),
        ({"num_tangents": 2, "batching": "loop"}, "batching: unknown batching 'loop'; allowed: vmap, scan"),
    ],
)
def test_bad_options_are_rejected_before_any_work(options, message):
    with pytest.raises(ValueError, match=message):
        rank1_forward_gradient(loss_fn, **options)


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        rank1_forward_gradient("loss", num_tangents=2)
    params, batch = make_problem()
    est = rank1_forward_gradient(loss_fn, num_tangents=2)
    with pytest.raises(TypeError, match=r"params: leaf \['w0'\] has dtype int32"):
        est.init({**params, "w0": jnp.zeros((5, 6), jnp.int32)})
    vector_loss = rank1_forward_gradient(lambda p, b: b["x"] @ p["w0"], num_tangents=2)
    with pytest.raises(TypeError, match="loss_fn: must return a floating-point scalar"):
        vector_loss.value_and_grad(params, None, batch, key=jax.random.key(0))
    parts = rank1_directional(loss_fn, num_tangents=2)
    with pytest.raises(ValueError, match=r"d: expected shape \(2,\)"):
        parts.estimate_from_directional(params, jnp.zeros(3), key=jax.random.key(0))
