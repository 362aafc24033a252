"""Mixed precision (``--compute-dtype bfloat16``): bfloat16 activations and matmuls; float32 parameters, gradients,
optimizer state, directional derivatives, Gram matrices and solves.

Oracles: the float32 run of the same configuration (accuracy), the exact gradient (backprop, float64 and float32),
and the dtypes XLA is asked to compute in, read off the jaxpr of the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jcore

from jaxalgo import losses, models
from jaxalgo.config import RunConfig
from jaxalgo.grads import ESTIMATORS, Problem, backprop, forward_gradient
from jaxalgo.grads import _rank1_tangents as rank1_tangents
from jaxalgo.grads import _tangents as dense_tangents
from jaxalgo.lowrank import factorize_chain
from jaxalgo.runner import make_evaluate
from jaxalgo.train import setup, train_and_evaluate

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
CE = losses.get_loss("cross_entropy")
PRODUCTS = ("dot_general", "conv_general_dilated")


def _equations(jaxpr: jcore.Jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, scan, custom_vjp, linear solves...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jcore.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def _operand_dtypes(closed: jcore.ClosedJaxpr, *primitives: str) -> list[tuple[jnp.dtype, ...]]:
    return [
        tuple(jnp.dtype(v.aval.dtype) for v in eqn.invars)
        for eqn in _equations(closed.jaxpr)
        if eqn.primitive.name in primitives
    ]


def _leaf_dtypes(tree) -> set[jnp.dtype]:
    return {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")}


def _float_leaf_dtypes(tree) -> set[jnp.dtype]:
    return {d for d in _leaf_dtypes(tree) if jnp.issubdtype(d, jnp.floating)}


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _batch(input_shape, num_outputs=10, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.standard_normal((size, *input_shape)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, num_outputs, size)),
        "idx": jnp.arange(size),
    }


# -- the wrapper ----------------------------------------------------------------------------------------------


def test_blocks_compute_in_bfloat16_and_the_output_is_float32():
    fn, params = models.split_chain(models.mlp((64,), 10, hidden=(16, 16), key=jax.random.key(0)))
    fn16 = models.with_compute_dtype(fn, "bfloat16")
    x = _batch((64,))["x"]
    outputs = jax.eval_shape(fn16.block_outputs, params, x)
    assert [o.dtype for o in outputs] == [BF16, BF16, F32]
    assert fn16.num_blocks == 3 and fn16.graphdefs == fn.graphdefs
    closed = jax.make_jaxpr(fn16.apply)(params, x)
    assert _operand_dtypes(closed, "dot_general") == [(BF16, BF16)] * 3
    # gradients w.r.t. the float32 parameters are float32 (the cast is differentiable)
    loss = lambda p: CE(fn16.apply(p, x), jnp.zeros(8, jnp.int32))
    assert _float_leaf_dtypes(jax.eval_shape(jax.grad(loss), params)) == {F32}
    # the same function as the float32 chain up to bfloat16 rounding; the parameters are not touched
    out16, out32 = jax.jit(lambda p: (fn16.apply(p, x), fn.apply(p, x)))(params)
    np.testing.assert_allclose(out16, out32, rtol=0.1, atol=0.05)
    assert out16.dtype == F32 and not np.array_equal(out16, out32) and _float_leaf_dtypes(params) == {F32}
    # rewrapping replaces the dtypes instead of nesting
    assert models.with_compute_dtype(fn16, "float16").chain is fn
    assert models.precision_policy(fn).is_identity and models.precision_policy(fn16).compute_dtype == BF16


def test_a_users_pytree_chain_keeps_integer_and_boolean_leaves():
    """Plain block functions over dict params: token ids (int input), an int and a bool parameter are not cast."""
    seen = {}

    def embed(p, ids):
        seen["ids"], seen["shift"], seen["flag"] = ids.dtype, p["shift"].dtype, p["use_bias"].dtype
        h = p["table"][ids].sum(axis=1) * (2.0 ** p["shift"].astype(p["table"].dtype))
        return jnp.where(p["use_bias"], h + p["bias"], h)

    def head(p, h):
        seen["head"] = (h.dtype, p["w"].dtype)
        return h @ p["w"]

    fn16 = models.with_compute_dtype([embed, head], "bfloat16")  # a list of block functions is accepted
    params = [
        {
            "table": jnp.ones((5, 4)),
            "bias": jnp.zeros(4),
            "shift": jnp.asarray(1, jnp.int32),
            "use_bias": jnp.asarray(True),
        },
        {"w": jnp.ones((4, 3))},
    ]
    out = fn16.apply(params, jnp.asarray([[0, 1], [2, 3]], jnp.int32))
    assert out.dtype == F32
    assert seen == {"ids": jnp.int32, "shift": jnp.int32, "flag": jnp.bool_, "head": (BF16, BF16)}
    np.testing.assert_allclose(out, np.full((2, 3), 16.0))


def test_bad_arguments_name_argument_value_and_allowed_values():
    fn, _ = models.split_chain(models.mlp((4,), 2, hidden=(3,), key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"compute_dtype: got 'int8'; allowed: a floating-point dtype"):
        models.with_compute_dtype(fn, "int8")
    with pytest.raises(ValueError, match=r"output_dtype: got 'bogus'; allowed: a floating-point dtype"):
        models.with_compute_dtype(fn, "bfloat16", output_dtype="bogus")
    with pytest.raises(TypeError, match=r"chain: with_compute_dtype takes the pure function of a Chain"):
        models.with_compute_dtype(models.mlp((4,), 2, hidden=(3,), key=jax.random.key(0)), "bfloat16")
    with pytest.raises(TypeError, match=r"chain: expected a chain of blocks"):
        models.with_compute_dtype(object(), "bfloat16")
    with pytest.raises(ValueError, match=r"params: expected a list or tuple with one pytree per block \(2\)"):
        models.with_compute_dtype(fn, "bfloat16").apply({"w": 1}, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"compute_dtype: got 'float16'; allowed: float32, bfloat16"):
        RunConfig.from_flags(compute_dtype="float16")


# -- every estimator, model and strategy ----------------------------------------------------------------------


def test_every_estimator_takes_a_bfloat16_step_with_float32_gradients():
    """One step of each estimator of the catalogue on a bfloat16 MLP: the model's products are bfloat16, every
    gradient is float32 in the params' tree, and the step runs to finite values (all estimators in one program)."""
    fn, params = models.split_chain(models.mlp((64,), 10, hidden=(16,), key=jax.random.key(0)))
    batch = _batch((64,))
    problem = Problem.from_chain(
        models.with_compute_dtype(fn, "bfloat16"),
        CE,
        loss_name="cross_entropy",
        input_shape=(64,),
        num_outputs=10,
        train_targets=np.random.default_rng(1).integers(0, 10, 32),
        key=jax.random.key(3),
    )
    estimators = {name: entry.make().build(problem) for name, entry in ESTIMATORS.items()}
    states = {name: est.init(params) for name, est in estimators.items()}
    key = jax.random.key(5)
    for name, est in estimators.items():
        closed = jax.make_jaxpr(lambda p, s, b, k, est=est: est.value_and_grad(p, s, b, key=k))(
            params, states[name], batch, key
        )
        products = _operand_dtypes(closed, "dot_general")
        assert (BF16, BF16) in products, name  # the model's matmuls
        loss, grads, state = jax.eval_shape(
            lambda p, s, b, k, est=est: est.value_and_grad(p, s, b, key=k), params, states[name], batch, key
        )
        assert jax.tree.structure(grads) == jax.tree.structure(params), name
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True)
        assert all(g.dtype == F32 and g.shape == p.shape for g, p in pairs), name
        assert loss.dtype == F32 and _float_leaf_dtypes(state) <= {F32}, name

    @jax.jit
    def all_steps(params, states, batch, key):
        return {name: est.value_and_grad(params, states[name], batch, key=key) for name, est in estimators.items()}

    for name, (loss, grads, _) in all_steps(params, states, batch, key).items():
        assert np.isfinite(float(loss)) and bool(jnp.all(jnp.isfinite(_flat(grads)))), name
        assert float(jnp.linalg.norm(_flat(grads))) > 0, name


@pytest.mark.parametrize(
    "build",
    [
        lambda key: models.resnet((8, 8, 1), 10, channels=(4,), key=key),
        lambda key: models.vit((8, 8, 1), 10, dim=8, depth=1, heads=2, mlp_dim=16, key=key),
    ],
    ids=["resnet", "vit"],
)
def test_resnet_and_vit_compute_in_bfloat16(build):
    fn, params = models.split_chain(build(jax.random.key(0)))
    fn16 = models.with_compute_dtype(fn, "bfloat16")
    batch = _batch((8, 8, 1), size=4)
    est = backprop(Problem.from_chain(fn16, CE).loss_fn)
    step = lambda p: est.value_and_grad(p, None, batch)
    products = _operand_dtypes(jax.make_jaxpr(step)(params), *PRODUCTS)  # forward and backward
    assert products and all(dtypes == (BF16, BF16) for dtypes in products), products
    _, grads, _ = jax.eval_shape(step, params)
    assert _float_leaf_dtypes(grads) == {F32} and jax.tree.structure(grads) == jax.tree.structure(params)
    out16, out32 = jax.jit(lambda p: (fn16.apply(p, batch["x"]), fn.apply(p, batch["x"])))(params)
    assert out16.dtype == F32
    np.testing.assert_allclose(out16, out32, rtol=0.1, atol=0.05 * float(jnp.max(jnp.abs(out32))))


def test_low_rank_factorisation_keeps_the_compute_dtype():
    fn, params = models.split_chain(models.mlp((16,), 10, hidden=(16,), key=jax.random.key(0)))
    fn16 = models.with_compute_dtype(fn, "bfloat16")
    low, low_params, layers = factorize_chain(fn16, params)
    assert layers and models.precision_policy(low) == models.precision_policy(fn16)
    assert _float_leaf_dtypes(low_params) == {F32}
    x = _batch((16,))["x"]
    assert _operand_dtypes(jax.make_jaxpr(low.apply)(low_params, x), "dot_general")[0] == (BF16, BF16)
    plain, _, _ = factorize_chain(fn, params)
    assert models.precision_policy(plain).is_identity


@pytest.mark.parametrize("parallel", ["ddp", "daso", "ab"])
def test_strategies_train_in_bfloat16_with_float32_state(tmp_path, parallel):
    flags = dict(hidden=(32,), epochs=1, batch_size=128, quiet=True, seed=0, lr=1e-2, mesh="2x4", checkpoint_every=1000)
    config = RunConfig.from_flags(**flags, parallel=parallel, compute_dtype="bfloat16")
    final = train_and_evaluate(config, tmp_path)
    assert final["test_accuracy"] > 0.3, final
    state = final["state"]
    assert _float_leaf_dtypes(state.params) == {F32} and _float_leaf_dtypes(state.opt_state) <= {F32}


# -- accuracy, parameters and optimizer state in a real run --------------------------------------------------


def test_bfloat16_digits_run_within_one_point_of_float32(tmp_path):
    """(MLP 64-64-10, backprop, Adam 1e-2, 6 epochs: about 96% on digits in both dtypes.)"""
    flags = dict(hidden=(64,), epochs=6, lr=1e-2, quiet=True, seed=0, checkpoint_every=1000)
    runs = {
        dt: train_and_evaluate(RunConfig.from_flags(**flags, compute_dtype=dt), tmp_path / dt)
        for dt in ("float32", "bfloat16")
    }
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert f32["test_accuracy"] >= 0.95 and bf16["test_accuracy"] >= 0.95, (f32, bf16)
    assert abs(bf16["test_accuracy"] - f32["test_accuracy"]) <= 0.01, (f32, bf16)
    # params and optimizer state (Adam's moments) stay float32 after training
    for run in runs.values():
        assert _float_leaf_dtypes(run["state"].params) == {F32}
        assert _float_leaf_dtypes(run["state"].opt_state) == {F32}
    # the bfloat16 run did compute in bfloat16, and its evaluation used the same compute dtype as its training
    experiment = setup(RunConfig.from_flags(**flags, compute_dtype="bfloat16"))
    assert models.precision_policy(experiment.chain).compute_dtype == BF16
    assert models.precision_policy(setup(RunConfig.from_flags(**flags)).chain).is_identity
    params = bf16["state"].params
    fn16 = experiment.chain
    in_bf16 = make_evaluate(fn16, experiment.output_loss, experiment.dataset)(params)
    in_f32 = make_evaluate(fn16.chain, experiment.output_loss, experiment.dataset)(params)
    np.testing.assert_allclose(bf16["test_loss"], in_bf16["test_loss"], rtol=1e-6)
    assert in_f32["test_loss"] != pytest.approx(bf16["test_loss"], rel=1e-5)


# -- FROG: k = n exactness, and the Gram solve in float32 -----------------------------------------------------


def _tiny_chain():
    fn, params = models.split_chain(models.mlp((6,), 3, hidden=(5,), activation="tanh", key=jax.random.key(2)))
    n = sum(leaf.size for leaf in jax.tree.leaves(params))
    return fn, params, _batch((6,), num_outputs=3, size=8, seed=4), n


def test_frog_with_k_equal_n_is_exact_in_float64_through_the_chain():
    """The float32 mode leaves the chain as it is; there (and through a float64 wrapper, whose casts are no-ops) the
    projection with k = n tangents is the exact gradient, in float64 (the Gram matrix of this key has condition
    number about 1e4; some keys give 1e8 and lose digits accordingly)."""
    with jax.enable_x64(True):
        fn, params, batch, n = _tiny_chain()
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        batch = {**batch, "x": batch["x"].astype(jnp.float64)}
        loss_fns = [
            Problem.from_chain(c, CE).loss_fn
            for c in (fn, models.with_compute_dtype(fn, "float64", output_dtype="float64"))
        ]
        ests = [forward_gradient(f, num_tangents=n, aggregation="orthogonal_projection") for f in loss_fns]

        @jax.jit
        def estimates_and_exact(p):
            key = jax.random.key(0)
            return [e.value_and_grad(p, e.init(p), batch, key=key)[1] for e in ests], jax.grad(loss_fns[0])(p, batch)

        estimates, exact = estimates_and_exact(params)
        for grads in estimates:
            assert _float_leaf_dtypes(grads) == {jnp.dtype(jnp.float64)}
            np.testing.assert_allclose(_flat(grads), _flat(exact), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tangents", ["gaussian", "rank1"])
def test_frog_in_bfloat16_solves_its_gram_matrix_in_float32(tangents):
    """The bfloat16 model gives the directional derivatives ``d`` (float32, near ``V grad f``); the projection
    ``V^T (V V^T)^{-1} d`` of those ``d`` is then solved in float32: it matches a float64 solve of the same ``d`` to
    float32 accuracy times ``cond(G) ~ 1e4`` (measured 1.3e-3 of the largest entry; a Gram matrix of bfloat16
    tangents is off by 0.17, far beyond the tolerance of 1e-2)."""
    fn, params, batch, n = _tiny_chain()
    loss_fn = Problem.from_chain(models.with_compute_dtype(fn, "bfloat16"), CE).loss_fn
    est = forward_gradient(loss_fn, num_tangents=n, aggregation="orthogonal_projection", tangents=tangents)
    key = jax.random.key(0)
    step = lambda p: est.value_and_grad(p, est.init(p), batch, key=key)
    closed = jax.make_jaxpr(step)(params)
    assert (BF16, BF16) in _operand_dtypes(closed, "dot_general")  # the model
    solves = _operand_dtypes(closed, "cholesky", "triangular_solve", "eigh")
    assert {"cholesky", "triangular_solve"} <= {e.primitive.name for e in _equations(closed.jaxpr)}
    assert solves and all(set(dtypes) == {F32} for dtypes in solves), solves
    optimizer = optax.adam(1e-3)
    exact_grad = jax.grad(Problem.from_chain(fn, CE).loss_fn)

    @jax.jit
    def train_step(p, opt_state):  # the estimate, its d, and the optimizer step it drives
        _, grads, _ = step(p)
        _, d = est.split.directional_derivatives(p, batch, key=key)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return grads, d, optax.apply_updates(p, updates), opt_state, exact_grad(p, batch)

    grads, d, new_params, opt_state, exact = train_step(params, optimizer.init(params))
    assert _float_leaf_dtypes(grads) == {F32} and d.dtype == F32
    # the tangents V (k x n), drawn as the estimator draws them
    leaves = jax.tree.leaves(params)
    if tangents == "rank1":
        drawn = rank1_tangents.sample_tangents(rank1_tangents.tangent_keys(key, n), leaves)
        dense = [t.materialize() if isinstance(t, rank1_tangents.FactoredTangent) else t for t in drawn]
        v = np.concatenate([np.asarray(t).reshape(n, -1) for t in dense], axis=1)
    else:
        layout = dense_tangents.FlatLayout.of(leaves)
        keys = dense_tangents.tangent_keys(key, n)
        v = np.asarray(jax.vmap(lambda k: dense_tangents.tangent_flat(k, layout, "gaussian"))(keys))
    v, d64, exact = v.astype(np.float64), np.asarray(d, np.float64), np.asarray(_flat(exact), np.float64)
    # d: the bfloat16 model's directional derivatives, near the float32 model's V grad f
    assert np.linalg.norm(d64 - v @ exact) / np.linalg.norm(v @ exact) < 0.03
    oracle = v.T @ np.linalg.solve(v @ v.T, d64)
    np.testing.assert_allclose(np.asarray(_flat(grads)), oracle, rtol=0, atol=1e-2 * np.abs(oracle).max())
    # parameters and optimizer state stay float32 after the step
    assert _float_leaf_dtypes(new_params) == {F32} and _float_leaf_dtypes(opt_state) == {F32}
