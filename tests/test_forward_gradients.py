"""Dense multi-tangent forward gradients (weight perturbation) against independent oracles.

Oracles: the exact gradient by backprop (projection with k >= n), the projection's geometry (cosine equals norm
ratio, residual orthogonal to the estimate), expectations over many keys (unbiased mean and sum, E[P g] = (k/n) g),
and equivalent formulations (batching strategies, simulated mode, the split form, rank-1 dispatch).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mlp_problem import loss_fn, make_problem, normal

from jaxalgo.grads import _combine, forward_gradient, forward_gradient_directional, rank1_forward_gradient
from jaxalgo.grads._combine import scaling_correction
from jaxalgo.grads._tangents import FlatLayout, independent_tangent_keys, tangent_flat, tangent_keys


def flat(tree):
    return jnp.concatenate([x.ravel().astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(tree)])


def flat_rows(tree):
    """``flat`` of each entry along a leading (vmapped) axis."""
    return jnp.concatenate(
        [x.reshape(x.shape[0], -1).astype(jnp.promote_types(x.dtype, jnp.float32)) for x in jax.tree.leaves(tree)],
        axis=1,
    )


def run(params, batch, key, **options):
    est = forward_gradient(loss_fn, **options)
    return jax.jit(lambda p, b, k: est.value_and_grad(p, est.init(p), b, key=k)[:2])(params, batch, key)


def run_keys(params, batch, keys, **options):
    """``run`` for several keys in one compilation."""
    est = forward_gradient(loss_fn, **options)
    step = lambda p, b, k: est.value_and_grad(p, est.init(p), b, key=k)[:2]
    return jax.jit(jax.vmap(step, in_axes=(None, None, 0)))(params, batch, keys)


N_SMALL = 3 * 4 + 4 + 4 * 2 + 2  # parameters of make_problem()


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(("tangents", "extra"), [("gaussian", 0), ("rademacher", 3)])
def test_projection_with_k_at_least_n_is_the_exact_gradient(tangents, extra):
    params, batch = make_problem()
    true = flat(jax.grad(loss_fn)(params, batch))
    keys = jax.vmap(jax.random.key)(jnp.arange(3))
    losses, grads = run_keys(
        params, batch, keys, num_tangents=N_SMALL + extra, aggregation="orthogonal_projection", tangents=tangents
    )
    np.testing.assert_allclose(losses, loss_fn(params, batch), rtol=1e-13)
    for g in flat_rows(grads):
        np.testing.assert_allclose(g, true, rtol=1e-9, atol=1e-11)


@pytest.mark.usefixtures("x64")
def test_dependent_rademacher_tangents_are_resampled():
    layout = FlatLayout.of([jnp.zeros(3)])
    draw = jax.vmap(lambda k: tangent_flat(k, layout, "rademacher"))

    @jax.jit
    @jax.vmap
    def raw_and_fixed(seed):
        keys = tangent_keys(jax.random.key(seed), 3)
        return draw(keys), draw(independent_tangent_keys(keys, layout, "rademacher"))

    all_raw, all_fixed = raw_and_fixed(jnp.arange(20))
    dependent_drawn = 0
    for raw, fixed in zip(all_raw, all_fixed, strict=True):
        dependent_drawn += int(np.linalg.matrix_rank(raw) < 3)
        assert int(np.linalg.matrix_rank(fixed)) == 3
        assert set(np.unique(np.asarray(fixed))) <= {-1.0, 1.0}
        # Independent draws are kept as they are.
        for i in range(3):
            if int(jnp.linalg.matrix_rank(raw[: i + 1])) == i + 1 and bool(jnp.all(fixed[:i] == raw[:i])):
                np.testing.assert_array_equal(fixed[i], raw[i])
    assert dependent_drawn >= 5  # 3 x 3 sign matrices are singular more often than not: the test bites.


@pytest.mark.usefixtures("x64")
def test_projection_cosine_equals_norm_ratio_and_residual_is_orthogonal():
    params, batch = make_problem(sizes=(6, 16, 16, 4))
    true = flat(jax.grad(loss_fn)(params, batch))
    _, grads = run(params, batch, jax.random.key(1), num_tangents=5, aggregation="orthogonal_projection")
    g = flat(grads)
    cosine = g @ true / (jnp.linalg.norm(g) * jnp.linalg.norm(true))
    assert 0.05 < cosine < 0.9
    np.testing.assert_allclose(cosine, jnp.linalg.norm(g) / jnp.linalg.norm(true), rtol=1e-10)
    np.testing.assert_allclose(g @ (true - g), 0.0, atol=1e-12)


def _sample_estimates(aggregation, tangents, k, samples, normalize=False):
    params, batch = make_problem()
    est = forward_gradient(
        loss_fn, num_tangents=k, aggregation=aggregation, tangents=tangents, normalize_tangents=normalize
    )
    keys = jax.vmap(jax.random.key)(jnp.arange(samples))
    one = lambda key: flat(est.value_and_grad(params, est.init(params), batch, key=key)[1])
    return jax.jit(jax.vmap(one))(keys), flat(jax.grad(loss_fn)(params, batch))


def _mean_matches(estimates, expected, true):
    """Whether the sample mean of ``estimates`` equals ``expected`` within 5 standard errors, along ``true``.

    The statistic is ``<g, grad> / <expected, grad>`` per sample; its standard error comes from the samples.
    """
    t = estimates @ true / (expected @ true)
    return abs(float(jnp.mean(t)) - 1.0) < 5.0 * float(jnp.std(t)) / math.sqrt(t.shape[0])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
    ("aggregation", "tangents", "normalize", "factor"),
    [
        ("mean", "gaussian", False, lambda k, n: 1.0),
        ("sum", "gaussian", False, lambda k, n: float(k)),
        ("mean", "rademacher", False, lambda k, n: 1.0),
        ("mean", "gaussian", True, lambda k, n: 1.0 / n),
        ("orthogonal_projection", "gaussian", False, lambda k, n: k / n),
    ],
)
def test_expectation_of_the_estimate(aggregation, tangents, normalize, factor):
    k = 4
    estimates, true = _sample_estimates(aggregation, tangents, k, 4000, normalize)
    expected = factor(k, N_SMALL) * true
    assert _mean_matches(estimates, expected, true)
    # The bound has power: a 10% mis-scaled estimator fails it.
    assert not _mean_matches(1.1 * estimates, expected, true)
    assert not _mean_matches(0.9 * estimates, expected, true)
    # Every coordinate's sample mean is within 5 standard errors of its expectation.
    z = (jnp.mean(estimates, 0) - expected) / (jnp.std(estimates, 0) / math.sqrt(estimates.shape[0]))
    assert float(jnp.max(jnp.abs(z))) < 5.0


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
    ("aggregation", "tangents", "normalize", "correct"),
    [
        ("mean", "gaussian", True, False),
        ("mean", "gaussian", False, True),
        ("sum", "rademacher", True, False),
        ("orthogonal_projection", "rademacher", False, False),
    ],
)
def test_every_batching_gives_the_same_estimate_and_simulated_mode_agrees(aggregation, tangents, normalize, correct):
    """scan and chunk compute sum and mean in one fused pass, the projection in three: both equal vmap's."""
    params, batch = make_problem(sizes=(8, 24, 3))  # n = 291: Rademacher resampling (tested above) is off
    key = jax.random.key(3)
    options = dict(num_tangents=7, aggregation=aggregation, tangents=tangents, normalize_tangents=normalize)
    options["scaling_correction"] = correct
    loss, reference = run(params, batch, key, **options)
    for batching, chunk_size in [("scan", None), ("chunk", 3)]:
        _, grads = run(params, batch, key, batching=batching, chunk_size=chunk_size, **options)
        np.testing.assert_allclose(flat(grads), flat(reference), rtol=1e-10, atol=1e-13)
    simulated_loss, simulated = run(params, batch, key, mode="simulated", **options)
    np.testing.assert_allclose(simulated_loss, loss, rtol=1e-13)
    np.testing.assert_allclose(flat(simulated), flat(reference), rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_blocks_cover_large_vectors_consistently():
    # n = 3 * 4096 + 5 spans four coordinate blocks: scan (blockwise Gram and estimate) equals vmap (whole V).
    params = {"w": normal(0, (3, 4096)), "b": normal(1, (5,))}
    batch = {"x": normal(2, (4, 3))}
    loss = lambda p, b: jnp.sum(jnp.tanh(b["x"] @ p["w"])) + jnp.sum(jnp.sin(p["b"]))
    key = jax.random.key(0)
    estimates = []
    for batching in ("vmap", "scan"):
        est = forward_gradient(loss, num_tangents=5, aggregation="orthogonal_projection", batching=batching)
        estimates.append(flat(jax.jit(lambda p, b, est=est: est.value_and_grad(p, None, b, key=key)[1])(params, batch)))
    np.testing.assert_allclose(estimates[1], estimates[0], rtol=1e-10, atol=1e-14)
    true = flat(jax.grad(loss)(params, batch))
    g = estimates[0]
    np.testing.assert_allclose(
        g @ true / (jnp.linalg.norm(g) * jnp.linalg.norm(true)), jnp.linalg.norm(g) / jnp.linalg.norm(true), rtol=1e-9
    )


@pytest.mark.usefixtures("x64")
def test_split_form_and_aux_and_scaling_correction():
    params, batch = make_problem()
    key = jax.random.key(5)
    options = dict(num_tangents=6, aggregation="orthogonal_projection")
    split = forward_gradient_directional(loss_fn, **options)

    @jax.jit
    def split_step(p, b, k):
        _, d = split.directional_derivatives(p, b, key=k)
        return d, split.estimate_from_directional(p, d, key=k)

    d, grads = split_step(params, batch, key)
    _, reference = run(params, batch, key, **options)
    np.testing.assert_allclose(flat(grads), flat(reference), rtol=1e-12)
    assert d.shape == (6,)
    # d_i = <grad f, v_i> for the tangents drawn from fold_in(key, i).
    layout = FlatLayout.of(jax.tree.leaves(params))
    v = jax.vmap(lambda k: tangent_flat(k, layout, "gaussian"))(tangent_keys(key, 6))
    np.testing.assert_allclose(d, v @ flat(jax.grad(loss_fn)(params, batch)), rtol=1e-12)

    # has_aux returns (loss, aux); the scaling correction multiplies the estimate by chi(n) / chi(k).
    aux_loss = lambda p, b: (loss_fn(p, b), {"twice": 2 * loss_fn(p, b)})
    est = forward_gradient(aux_loss, has_aux=True, scaling_correction=True, **options)
    (value, aux), corrected, _ = jax.jit(lambda p, b: est.value_and_grad(p, None, b, key=key))(params, batch)
    np.testing.assert_allclose(aux["twice"], 2 * value)
    np.testing.assert_allclose(value, loss_fn(params, batch), rtol=1e-13)
    factor = scaling_correction("orthogonal_projection", num_tangents=6, num_params=N_SMALL)
    assert factor > 1.5
    np.testing.assert_allclose(flat(corrected), factor * flat(reference), rtol=1e-12)


def test_bfloat16_params_accumulate_in_float32():
    params, batch = make_problem(dtype=np.float32)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    batch16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), batch)
    loss, grads = run(params16, batch16, jax.random.key(0), num_tangents=N_SMALL, aggregation="orthogonal_projection")
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    assert loss.dtype == jnp.bfloat16
    true = flat(
        jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda x: x.astype(jnp.float32), batch16)))(
            jax.tree.map(lambda x: x.astype(jnp.float32), params16)
        )
    )
    error = jnp.linalg.norm(flat(grads) - true) / jnp.linalg.norm(true)
    assert float(error) < 0.05  # bf16 directional derivatives (8 bits of mantissa); exact in float64 above.


def test_float32_projection_with_k_equal_n_stays_finite():
    params, batch = make_problem(dtype=np.float32)
    true = flat(jax.grad(loss_fn)(params, batch))
    keys = jax.vmap(jax.random.key)(jnp.arange(10))
    _, grads = run_keys(params, batch, keys, num_tangents=N_SMALL, aggregation="orthogonal_projection")
    for g in flat_rows(grads):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.linalg.norm(g - true) / jnp.linalg.norm(true)) < 0.2


@pytest.mark.usefixtures("x64")
def test_rank1_tangents_dispatch_to_the_rank1_estimator():
    aggregation = "orthogonal_projection"
    params, batch = make_problem()
    key = jax.random.key(4)
    _, grads = run(params, batch, key, num_tangents=3, aggregation=aggregation, tangents="rank1", batching="scan")
    est = rank1_forward_gradient(loss_fn, num_tangents=3, aggregation=aggregation, batching="scan")
    _, expected, _ = est.value_and_grad(params, est.init(params), batch, key=key)
    np.testing.assert_allclose(flat(grads), flat(expected), rtol=1e-12)


def test_scan_memory_is_flat_in_k_while_vmap_holds_the_tangents():
    params, batch = make_problem(sizes=(64, 256, 128, 10), batch=16, dtype=np.float32)  # n = 50,826: 13 blocks
    n = sum(x.size for x in jax.tree.leaves(params))

    def temp_bytes(batching, k):
        est = forward_gradient(loss_fn, num_tangents=k, aggregation="orthogonal_projection", batching=batching)
        step = jax.jit(lambda p, b, key: est.value_and_grad(p, None, b, key=key)[1])
        return step.lower(params, batch, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes

    scan4, scan32, vmap32 = temp_bytes("scan", 4), temp_bytes("scan", 32), temp_bytes("vmap", 32)
    assert vmap32 - scan32 > 32 * n * 4  # vmap holds (at least) the k x n tangent matrix
    assert scan32 - scan4 < 0.25 * 28 * n * 4  # scan: only k x k and k x B (B = 4096) terms grow with k


def _bad(**overrides):
    options = dict(num_tangents=2, aggregation="mean")
    options.update(overrides)
    return options


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (_bad(num_tangents=0), ValueError, "num_tangents: must be an integer >= 1, got 0"),
        (_bad(num_tangents=-3), ValueError, "num_tangents"),
        (_bad(num_tangents=2.0), ValueError, "num_tangents"),
        (_bad(num_tangents=True), ValueError, "num_tangents"),
        (_bad(aggregation="median"), ValueError, "aggregation: unknown aggregation 'median'; allowed: sum, mean"),
        (_bad(tangents="uniform"), ValueError, "tangents: unknown tangent distribution 'uniform'; allowed: gaussian"),
        (_bad(batching="pmap"), ValueError, "batching: unknown batching 'pmap'; allowed: vmap, scan, chunk"),
        (_bad(mode="reverse"), ValueError, "mode: unknown mode 'reverse'"),
        (_bad(batching="chunk"), ValueError, "chunk_size: batching='chunk' needs an integer chunk_size >= 1"),
        (_bad(chunk_size=4), ValueError, "chunk_size: only used with batching='chunk'"),
        (_bad(tangents="rank1", normalize_tangents=True), ValueError, "normalize_tangents: not supported"),
        (_bad(tangents="rank1", batching="chunk", chunk_size=2), ValueError, "batching: tangents='rank1'"),
        (_bad(tangents="rank1", mode="simulated"), ValueError, "mode: tangents='rank1'"),
    ],
)
def test_bad_options_raise_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        forward_gradient(loss_fn, **options)
    with pytest.raises(error, match=match):
        forward_gradient_directional(loss_fn, **options)


def test_bad_inputs_raise_before_any_work():
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        forward_gradient(42, num_tangents=2)
    est = forward_gradient(loss_fn, num_tangents=2)
    int_params = {"w0": jnp.ones((3, 4), jnp.int32), "b0": jnp.zeros(4)}
    with pytest.raises(TypeError, match=r"params: leaf \['w0'\] has dtype int32"):
        est.init(int_params)
    with pytest.raises(TypeError, match=r"params: leaf \['w0'\] has dtype int32"):
        est.value_and_grad(int_params, None, None, key=jax.random.key(0))
    vector_loss = forward_gradient(lambda p, b: p["w"] * 2.0, num_tangents=2)
    with pytest.raises(TypeError, match=r"loss_fn: must return a floating-point scalar; got shape \(3,\)"):
        vector_loss.value_and_grad({"w": jnp.ones(3)}, None, None, key=jax.random.key(0))
    split = forward_gradient_directional(loss_fn, num_tangents=2)
    with pytest.raises(ValueError, match=r"d: expected shape \(2,\)"):
        split.estimate_from_directional({"w": jnp.ones(3)}, jnp.ones(3), key=jax.random.key(0))


def test_cli_flags_and_config_validation():
    from jaxalgo import cli
    from jaxalgo.config import RunConfig

    args = cli.build_parser().parse_args(["train", "--estimator", "frog", "--tangents", "8", "--tangent-dist", "rank1"])
    config = cli.config_from_args(args)
    options = config.estimator.options
    assert (config.estimator.name, options.num_tangents, options.tangent_dist) == ("frog", 8, "rank1")
    with pytest.raises(ValueError, match="tangent_dist: got 'sobol'; allowed: gaussian"):
        RunConfig.from_flags(estimator="fg", tangent_dist="sobol")
    with pytest.raises(ValueError, match="tangent_dist: estimator 'frog-rank1' always uses 'rank1'"):
        RunConfig.from_flags(estimator="frog-rank1", tangent_dist="rademacher")


def test_frog_trains_digits_through_train_and_evaluate(tmp_path):
    from jaxalgo.config import RunConfig
    from jaxalgo.train import train_and_evaluate

    config = RunConfig.from_flags(
        estimator="frog", tangents=8, tangent_dist="rademacher", optimizer="sgd", lr=10.0, epochs=2, hidden=(32,),
        quiet=True,
    )  # fmt: skip
    final = train_and_evaluate(config, tmp_path / "run")
    assert final["test_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("columns", [(), (3,)])
def test_singular_gram_falls_back_to_the_pseudo_inverse_projection(columns):
    """A Gram matrix whose Cholesky factorisation breaks down (a repeated tangent) still gives the orthogonal
    projection (minimum-norm coefficients), for one right-hand side or one column per example (activity
    perturbation); a regular Gram matrix gives the exact solve."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        v = rng.standard_normal((4, 6))
        v[3] = v[2]  # dependent tangents: G is singular
        d = rng.standard_normal((4, *columns))
        d[3] = d[2]  # consistent directional derivatives, as for a true gradient
        c = _combine.combination_coefficients("orthogonal_projection", jnp.asarray(d), jnp.asarray(v @ v.T))
        np.testing.assert_allclose(np.asarray(c), np.linalg.pinv(v @ v.T) @ d, rtol=1e-8, atol=1e-10)
        regular = rng.standard_normal((4, 6))
        c = _combine.combination_coefficients("orthogonal_projection", jnp.asarray(d), jnp.asarray(regular @ regular.T))
        np.testing.assert_allclose(np.asarray(c), np.linalg.solve(regular @ regular.T, d), rtol=1e-8)


def test_vmapped_projection_solves_each_lane_alone_and_differentiates_like_the_solve():
    """Under vmap (a sweep's lanes) every lane gets its own solve: a singular lane falls back to the pseudo-inverse
    without touching the others; the derivatives equal those of ``G^{-1} d``; and the compiled program runs the
    eigensolver one lane at a time, never as one batched call (jaxlib's batched CPU eigensolver deadlocks when two
    run at once on a small thread pool: a sweep of FROG at 64 tangents over 4 learning rates hung for ever)."""

    def solve(g, d):
        return _combine.combination_coefficients("orthogonal_projection", d, g)

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        v = rng.standard_normal((3, 4, 6))
        v[1, 3] = v[1, 2]  # lane 1: dependent tangents (G singular: its c is not unique, V^T c is)
        grams, d = v @ np.swapaxes(v, 1, 2), rng.standard_normal((3, 4))
        d[1, 3] = d[1, 2]
        expected = [np.linalg.pinv(g) @ x for g, x in zip(grams, d, strict=True)]
        coefficients = np.asarray(jax.vmap(solve)(grams, d))
        estimates = np.einsum("bk,bkn->bn", coefficients, v)  # V^T c: unique even where c is not
        np.testing.assert_allclose(estimates, np.einsum("bk,bkn->bn", np.stack(expected), v), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(coefficients[[0, 2]], np.stack(expected)[[0, 2]], rtol=1e-8)  # regular lanes
        x, dx, w = v[0], rng.standard_normal((4, 6)), np.arange(4.0)
        ours = jax.jvp(lambda x: solve(x @ x.T, d[0]), (x,), (dx,))[1]
        exact = jax.jvp(lambda x: jnp.linalg.solve(x @ x.T, d[0]), (x,), (dx,))[1]
        np.testing.assert_allclose(np.asarray(ours), np.asarray(exact), rtol=1e-9)
        ours = jax.grad(lambda x, d: solve(x @ x.T, d) @ w, argnums=(0, 1))(x, d[0])
        exact = jax.grad(lambda x, d: jnp.linalg.solve(x @ x.T, d) @ w, argnums=(0, 1))(x, d[0])
        for a, b in zip(ours, exact, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
        repeated = np.array([[1.0, 2, 3], [1, 2, 3], [0, 1, 0]])  # its Cholesky factor breaks down (NaN)
        singular, w3 = repeated @ repeated.T, np.arange(3.0)
        ours = jax.grad(lambda d: solve(singular, d) @ w3)(np.array([1.0, 1, 2]))  # reverse mode: no NaN
        np.testing.assert_allclose(np.asarray(ours), np.linalg.pinv(singular) @ w3, rtol=1e-7, atol=1e-10)
    hlo = jax.jit(jax.vmap(solve)).lower(jnp.ones((5, 64, 64)), jnp.ones((5, 64))).compile().as_text()
    eigh_operands = re.findall(r'target="lapack_ssyevd\w*", operand_layout_constraints=\{(f32\[[\d,]*\])', hlo)
    assert eigh_operands and all(shape == "f32[64,64]" for shape in eigh_operands), eigh_operands


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(("batching", "chunk_size"), [("scan", None), ("chunk", 3)])
def test_fused_sum_and_mean_run_under_the_ordinary_data_parallel_path(batching, chunk_size):
    """scan / chunk sum and mean accumulate the estimate in a scan carry; with per-device params (the gradient
    all-reduce) the carry must vary over the mesh axes like the directional derivatives do."""
    from jaxalgo import parallel as par

    mesh = par.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    params, batch = make_problem(batch=16)
    key = jax.random.key(2)
    est = forward_gradient(loss_fn, num_tangents=5, batching=batching, chunk_size=chunk_size)
    _, expected = run(params, batch, key, num_tangents=5, batching=batching, chunk_size=chunk_size)
    dp = par.data_parallel(est, mesh, reduce="gradients")
    args = (par.replicate(params, mesh), par.shard(batch, mesh), par.replicate(key, mesh))
    _, grads, _ = jax.jit(lambda p, b, k: dp.value_and_grad(p, None, b, key=k))(*args)
    np.testing.assert_allclose(flat(grads), flat(expected), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("batching", ["vmap", "scan"])
def test_the_gram_matrix_and_the_combination_are_full_precision_on_tpu_and_gpu(batching):
    """XLA's default float32 matmul on TPU is one bfloat16 pass (TF32 on recent GPUs), about 3 digits, which the
    projection's Cholesky solve would amplify. Lowered for those platforms, every matmul of the estimate (the
    Gram matrix ``V V^T`` and ``V^T c``) asks for HIGHEST precision; the model's own matmuls are the user's."""
    params, batch = make_problem()
    est = forward_gradient(loss_fn, aggregation="orthogonal_projection", num_tangents=3, batching=batching)
    step = jax.jit(lambda p, b, k: est.value_and_grad(p, est.init(p), b, key=k)[:2])
    exported = jax.export.export(step, platforms=["tpu", "cuda"])(params, batch, jax.random.key(0))
    text = exported.mlir_module()
    grams = [line for line in text.splitlines() if "dot_general" in line and "tensor<3x3xf32>" in line.split("->")[-1]]
    assert grams, "no Gram matrix (3 x 3) product in the lowered estimate"
    assert all("HIGHEST" in line for line in grams), grams
    n = N_SMALL
    combos = [
        line for line in text.splitlines() if "dot_general" in line and f"tensor<{n}xf32>" in line.split("->")[-1]
    ]
    assert combos and all("HIGHEST" in line for line in combos), combos
