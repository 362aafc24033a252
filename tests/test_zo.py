"""The two-point zeroth-order estimator (MeZO / SPSA) against independent oracles, in float64.

Oracles: the exact directional derivatives along the forward gradient's own tangents (central differences are exact
on quadratics), the O(eps^2) truncation error and its leading term (eps^2 / 6) D^3 f[v, v, v] from nested JVPs, the
exact gradient by backprop (projection with k = n), the expectation over many keys (unbiased mean), equivalent
formulations (batching strategies, the split form, the options classes) and the single-device estimate against
data parallelism on 4 devices, which moves only k + 1 numbers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalgo import parallel as par
from jaxalgo.grads import EmptyState
from jaxalgo.grads._estimator import Problem
from jaxalgo.grads._forward import ForwardOptions, forward_gradient, forward_gradient_directional
from jaxalgo.grads._tangents import FlatLayout, tangent_flat, tangent_keys
from jaxalgo.grads._zo import ZeroOrderOptions, zeroth_order
from jaxalgo.options import flags_of


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def flat(tree):
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float64) for x in jax.tree.leaves(tree)])


def nested_params(seed=0):
    """A nested dict pytree of n = 3 * 4 + 4 + 4 * 2 + 2 = 26 parameters."""
    rng = np.random.default_rng(seed)
    return {
        "hidden": {"w": jnp.asarray(rng.standard_normal((3, 4)) / 2), "b": jnp.asarray(0.1 * rng.standard_normal(4))},
        "out": {"w": jnp.asarray(rng.standard_normal((4, 2)) / 2), "b": jnp.asarray(0.1 * rng.standard_normal(2))},
    }


N = 26


def make_batch(size=16, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.standard_normal((size, 3))), "y": jnp.asarray(rng.standard_normal((size, 2)))}


def mlp_loss(params, batch):
    """A smooth, non-quadratic loss that is a mean over the batch."""
    h = jnp.tanh(batch["x"] @ params["hidden"]["w"] + params["hidden"]["b"])
    out = h @ params["out"]["w"] + params["out"]["b"]
    return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))


def quadratic(seed=2):
    """``f(theta) = 1/2 theta^T A theta + b^T theta`` on the flattened nested params, with its exact gradient."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((N, N))
    a, b = jnp.asarray(m @ m.T / N + np.eye(N)), jnp.asarray(rng.standard_normal(N))

    def loss(params, batch):
        theta = flat(params)
        return 0.5 * theta @ a @ theta + b @ theta

    return loss, lambda params: a @ flat(params) + b


def step(est, params, batch, key):
    return jax.jit(lambda p, b, k: est.value_and_grad(p, est.init(p), b, key=k)[:2])(params, batch, key)


def directional(split, params, batch, key):
    return jax.jit(lambda p, b, k: split.directional_derivatives(p, b, key=k))(params, batch, key)


def directional_all(splits, params, batch, key):
    """``{name: (loss, d)}`` of several splits, in one compilation."""
    return jax.jit(lambda p, b, k: {n: s.directional_derivatives(p, b, key=k) for n, s in splits.items()})(
        params, batch, key
    )


@pytest.mark.parametrize("tangents", ["gaussian", "rademacher"])
def test_central_differences_are_exact_on_a_quadratic_along_the_forward_gradients_tangents(tangents):
    loss, grad = quadratic()
    params, key, k = nested_params(), jax.random.key(7), 5
    epsilons = (1e-3, 0.5)
    splits = {"forward": forward_gradient_directional(loss, num_tangents=k, tangents=tangents)}
    splits |= {str(e): zeroth_order(loss, num_tangents=k, tangents=tangents, epsilon=e).split for e in epsilons}
    out = directional_all(splits, params, None, key)
    value, d_forward = out["forward"]
    layout = FlatLayout.of(jax.tree.leaves(params))
    v = jax.vmap(lambda tk: tangent_flat(tk, layout, tangents))(tangent_keys(key, k))
    np.testing.assert_allclose(d_forward, v @ grad(params), rtol=1e-12)  # the oracle itself: <grad f, v_i>
    for epsilon in epsilons:
        zo_value, d = out[str(epsilon)]
        # rounding only: |f| u / eps per difference, u = 2^-53
        np.testing.assert_allclose(d, d_forward, rtol=0, atol=50 * abs(float(value)) * 2**-53 / epsilon)
        np.testing.assert_allclose(zo_value, value, rtol=1e-15)  # the loss at theta, not at theta +- eps v
    assert float(jnp.min(jnp.abs(d_forward))) > 1e-3  # not vacuous


def test_error_on_a_smooth_function_is_second_order_in_epsilon():
    def loss(params, batch):
        theta = flat(params)
        return jnp.sum(jnp.sin(theta)) + 0.1 * jnp.sum(theta**4)

    params, key, k = nested_params(3), jax.random.key(1), 4
    epsilons = (1e-2, 5e-3)
    splits = {"forward": forward_gradient_directional(loss, num_tangents=k)}
    splits |= {str(eps): zeroth_order(loss, num_tangents=k, epsilon=eps).split for eps in epsilons}
    out = directional_all(splits, params, None, key)
    errors = {eps: out[str(eps)][1] - out["forward"][1] for eps in epsilons}
    ratio = jnp.linalg.norm(errors[1e-2]) / jnp.linalg.norm(errors[5e-3])
    assert 3.8 < float(ratio) < 4.2  # halving eps divides the error by 4
    # and the error is the leading Taylor term (eps^2 / 6) D^3 f[v, v, v], from nested forward-mode derivatives
    layout = FlatLayout.of(jax.tree.leaves(params))
    treedef = jax.tree.structure(params)
    f = lambda x: loss(jax.tree.unflatten(treedef, layout.split(x)), None)

    @jax.jit
    def third(theta, v):
        first = lambda x: jax.jvp(f, (x,), (v,))[1]
        second = lambda x: jax.jvp(first, (x,), (v,))[1]
        return jax.jvp(second, (theta,), (v,))[1]

    v = jax.vmap(lambda tk: tangent_flat(tk, layout, "gaussian"))(tangent_keys(key, k))
    leading = jax.vmap(third, in_axes=(None, 0))(flat(params), v) / 6
    np.testing.assert_allclose(errors[5e-3] / 5e-3**2, leading, rtol=1e-3)
    assert float(jnp.min(jnp.abs(errors[5e-3]))) > 1e-8  # far above rounding: the test measures truncation


def test_projection_with_k_equal_n_is_the_exact_gradient_on_a_quadratic():
    loss, grad = quadratic()
    params = nested_params()
    estimators = [
        zeroth_order(loss, num_tangents=N, aggregation="orthogonal_projection", batching=batching, chunk_size=size)
        for batching, size in [("vmap", None), ("scan", None), ("chunk", 7)]
    ]
    keys = jax.vmap(jax.random.key)(jnp.arange(3))
    one = lambda key: [flat(e.value_and_grad(params, EmptyState(), None, key=key)[1]) for e in estimators]
    for grads in jax.jit(jax.vmap(one))(keys):
        for g in grads:
            np.testing.assert_allclose(g, grad(params), rtol=1e-10, atol=1e-10)


def test_mean_is_unbiased_over_many_keys():
    loss, grad = quadratic()
    params, k, samples = nested_params(), 4, 3000
    true = grad(params)
    est = zeroth_order(loss, num_tangents=k)
    keys = jax.vmap(jax.random.key)(jnp.arange(samples))
    estimates = jax.jit(jax.vmap(lambda key: flat(est.value_and_grad(params, EmptyState(), None, key=key)[1])))(keys)
    t = estimates @ true / (true @ true)  # the component along the gradient, 1 in expectation

    def matches(scale):
        return abs(float(jnp.mean(scale * t)) - 1.0) < 5.0 * float(jnp.std(scale * t)) / math.sqrt(samples)

    assert matches(1.0)
    assert not matches(1.15) and not matches(0.85)  # the bound has power
    z = (jnp.mean(estimates, 0) - true) / (jnp.std(estimates, 0) / math.sqrt(samples))
    assert float(jnp.max(jnp.abs(z))) < 5.0  # every coordinate


def mixed_dtype_params():
    params = nested_params()
    params["out"]["b"] = params["out"]["b"].astype(jnp.float32)
    return params


@pytest.mark.parametrize(
    ("aggregation", "tangents", "normalize", "correct"),
    [
        ("sum", "rademacher", True, False),
        ("mean", "gaussian", True, True),
        ("orthogonal_projection", "rademacher", False, True),
    ],
)
def test_batchings_keys_structure_and_dtypes(aggregation, tangents, normalize, correct):
    params, batch, key = mixed_dtype_params(), make_batch(), jax.random.key(3)
    options = dict(num_tangents=5, aggregation=aggregation, tangents=tangents, normalize_tangents=normalize)
    options["scaling_correction"] = correct
    estimators = {
        "vmap": zeroth_order(mlp_loss, **options),
        "scan": zeroth_order(mlp_loss, batching="scan", **options),
        "chunk": zeroth_order(mlp_loss, batching="chunk", chunk_size=2, **options),
        "forward": forward_gradient(mlp_loss, **options),
    }
    run = jax.jit(lambda p, b, k: {n: e.value_and_grad(p, None, b, key=k)[:2] for n, e in estimators.items()})
    out = run(params, batch, key)
    loss, reference = out["vmap"]
    assert jax.tree.structure(reference) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), reference) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert reference["out"]["b"].dtype == jnp.float32
    np.testing.assert_allclose(loss, mlp_loss(params, batch), rtol=1e-15)
    for batching in ("scan", "chunk"):
        np.testing.assert_allclose(flat(out[batching][1]), flat(reference), rtol=1e-10, atol=1e-13, err_msg=batching)
    again = run(params, batch, key)["vmap"][1]
    np.testing.assert_array_equal(flat(again), flat(reference))  # same key, same estimate
    other = run(params, batch, jax.random.key(4))["vmap"][1]
    assert not np.allclose(flat(other), flat(reference))
    # same tangents as the forward gradient: the estimates differ by the O(eps^2) error in d only
    forward = flat(out["forward"][1])
    np.testing.assert_allclose(flat(reference), forward, rtol=1e-4, atol=1e-6)
    assert not np.allclose(flat(other), forward, rtol=1e-2)


@pytest.mark.parametrize(
    ("aggregation", "batching", "chunk_size"),
    [("mean", "vmap", None), ("mean", "scan", None), ("orthogonal_projection", "chunk", 2)],
)
def test_split_form_and_aux_equal_value_and_grad(aggregation, batching, chunk_size):
    params, batch, key = nested_params(), make_batch(), jax.random.key(5)
    aux_loss = lambda p, b: (mlp_loss(p, b), {"mean_y": jnp.mean(b["y"])})
    est = zeroth_order(
        aux_loss, num_tangents=6, aggregation=aggregation, batching=batching, chunk_size=chunk_size, has_aux=True
    )

    @jax.jit
    def both(p, b, k):
        (value, aux), d = est.split.directional_derivatives(p, b, key=k)
        return value, aux, d, est.split.estimate_from_directional(p, d, key=k), est.value_and_grad(p, None, b, key=k)

    value, aux, d, grads, ((loss, aux2), reference, _) = both(params, batch, key)
    assert d.shape == (6,) and d.dtype == jnp.float64
    np.testing.assert_allclose(flat(grads), flat(reference), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(value, mlp_loss(params, batch), rtol=1e-15)
    np.testing.assert_allclose(loss, value, rtol=1e-15)
    np.testing.assert_allclose(aux["mean_y"], jnp.mean(batch["y"]), rtol=1e-15)
    np.testing.assert_allclose(aux2["mean_y"], aux["mean_y"], rtol=1e-15)
    with pytest.raises(ValueError, match=r"d: expected shape \(6,\)"):
        est.split.estimate_from_directional(params, jnp.ones(5), key=key)


def test_data_parallel_on_4_devices_reduces_k_plus_1_numbers_and_equals_the_single_device_estimate():
    mesh = par.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    params, batch, key, k = nested_params(), make_batch(32), jax.random.key(6), 5
    args = (par.replicate(params, mesh), par.shard(batch, mesh), par.replicate(key, mesh))
    singles = {"mean": zeroth_order(mlp_loss, num_tangents=k, batching="scan")}
    singles["orthogonal_projection"] = zeroth_order(mlp_loss, num_tangents=k, aggregation="orthogonal_projection")
    parallels = {a: par.data_parallel(e, mesh) for a, e in singles.items()}
    parallels["gradients"] = par.data_parallel(singles["mean"], mesh, reduce="gradients")
    run_all = lambda estimators: jax.jit(
        lambda p, b, k: {n: e.value_and_grad(p, EmptyState(), b, key=k)[:2] for n, e in estimators.items()}
    )
    expected = run_all(singles)(params, batch, key)
    got = run_all(parallels)(*args)
    for name, (loss, grads) in got.items():
        loss1, grads1 = expected["mean" if name == "gradients" else name]
        np.testing.assert_allclose(loss, loss1, rtol=1e-14, err_msg=name)
        np.testing.assert_allclose(flat(grads), flat(grads1), rtol=1e-9, atol=1e-12, err_msg=name)
    projection = lambda p, b, k: parallels["orthogonal_projection"].value_and_grad(p, EmptyState(), b, key=k)[:2]
    report = par.comm_report(projection, *args)
    assert report.count() == 1 and report.total() == (k + 1) * 8  # one all-reduce of k + 1 float64 numbers
    # not vacuous: one device's shard alone gives another estimate
    _, first_shard = step(singles["mean"], params, jax.tree.map(lambda x: x[:8], batch), key)
    assert not np.allclose(flat(first_shard), flat(expected["mean"][1]), rtol=1e-3)


def _bad(**overrides):
    return dict(num_tangents=2, aggregation="mean") | overrides


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (_bad(num_tangents=0), "num_tangents: must be an integer >= 1, got 0"),
        (_bad(num_tangents=2.0), "num_tangents: must be an integer >= 1, got 2.0"),
        (_bad(aggregation="median"), "aggregation: unknown aggregation 'median'; allowed: sum, mean"),
        (_bad(tangents="uniform"), "tangents: unknown tangent distribution 'uniform'; allowed: gaussian, rademacher"),
        (_bad(tangents="rank1"), "tangents: the zeroth-order estimator draws dense tangents .* got 'rank1'"),
        (_bad(epsilon=-1), "epsilon: must be a number > 0, got -1"),
        (_bad(epsilon=0.0), "epsilon: must be a number > 0, got 0.0"),
        (_bad(epsilon=math.nan), "epsilon: must be a number > 0, got nan"),
        (_bad(epsilon=math.inf), r"epsilon: must be a number > 0, got inf \(it must be finite\)"),
        (_bad(epsilon="1e-3"), "epsilon: must be a number > 0, got '1e-3'"),
        (_bad(epsilon=True), "epsilon: must be a number > 0, got True"),
        (_bad(normalize_tangents="yes"), "normalize_tangents: must be True or False, got 'yes'"),
        (_bad(scaling_correction=1), "scaling_correction: must be True or False, got 1"),
        (_bad(has_aux=None), "has_aux: must be True or False, got None"),
        (_bad(batching="pmap"), "batching: unknown batching 'pmap'; allowed: vmap, scan, chunk"),
        (_bad(batching="chunk"), "chunk_size: batching='chunk' needs an integer chunk_size >= 1, got None"),
        (_bad(batching="chunk", chunk_size=0), "chunk_size: batching='chunk' needs an integer chunk_size >= 1"),
        (_bad(chunk_size=4), "chunk_size: only used with batching='chunk'"),
    ],
)
def test_bad_arguments_raise_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        zeroth_order(mlp_loss, **options)


def test_bad_arguments_raise_under_jit_and_bad_inputs_before_any_work():
    with pytest.raises(ValueError, match=r"epsilon: must be a number > 0, got -0\.5"):
        jax.jit(lambda p: zeroth_order(mlp_loss, num_tangents=2, epsilon=-0.5).split)(nested_params())
    with pytest.raises(ValueError, match="epsilon: must be a number > 0 fixed when the estimator is built, got a tra"):
        jax.jit(lambda eps: zeroth_order(mlp_loss, num_tangents=2, epsilon=eps).split)(1e-3)
    # concrete array scalars are numbers too
    zeroth_order(mlp_loss, num_tangents=2, epsilon=np.float32(1e-2))
    zeroth_order(mlp_loss, num_tangents=2, epsilon=jnp.asarray(1e-2))
    with pytest.raises(TypeError, match="loss_fn: expected a callable, got int"):
        zeroth_order(42, num_tangents=2)
    est = zeroth_order(mlp_loss, num_tangents=2)
    with pytest.raises(TypeError, match=r"params: leaf \['w'\] has dtype int32"):
        est.value_and_grad({"w": jnp.ones(3, jnp.int32)}, None, None, key=jax.random.key(0))
    vector = zeroth_order(lambda p, b: p["w"] * 2.0, num_tangents=2)
    with pytest.raises(TypeError, match=r"loss_fn: must return a floating-point scalar; got shape \(3,\)"):
        vector.value_and_grad({"w": jnp.ones(3)}, None, None, key=jax.random.key(0))


def test_options_validate_and_build():
    with pytest.raises(ValueError, match="epsilon: must be a number > 0, got 0"):
        ZeroOrderOptions(epsilon=0)
    with pytest.raises(ValueError, match="epsilon: got 'small'; allowed: a number"):
        ZeroOrderOptions(epsilon="small")
    with pytest.raises(ValueError, match="tangent_dist: got 'rank1'; allowed: gaussian, rademacher"):
        ZeroOrderOptions(tangent_dist="rank1")
    with pytest.raises(ValueError, match="num_tangents: must be an integer >= 1, got 0"):
        ZeroOrderOptions(num_tangents=0)
    with pytest.raises(ValueError, match="chunk_size: batching='chunk' needs an integer chunk_size >= 1"):
        ZeroOrderOptions(batching="chunk")
    with pytest.raises(ValueError, match="batching: tangent_dist='rank1' supports 'vmap' and 'scan', not 'chunk'"):
        ForwardOptions(tangent_dist="rank1", batching="chunk")
    with pytest.raises(ValueError, match="normalize_tangents: not supported with tangent_dist='rank1'"):
        ForwardOptions(tangent_dist="rank1", normalize_tangents=True)
    with pytest.raises(ValueError, match="mode: tangent_dist='rank1' supports mode='forward' only"):
        ForwardOptions(tangent_dist="rank1", mode="simulated")
    with pytest.raises(ValueError, match="chunk_size: only used with batching='chunk'"):
        ForwardOptions(chunk_size=3)
    with pytest.raises(ValueError, match="mode: got 'reverse'; allowed: forward, simulated"):
        ForwardOptions(mode="reverse")
    assert ZeroOrderOptions.data_parallel and ForwardOptions.data_parallel

    params, batch, key = nested_params(), make_batch(), jax.random.key(8)
    aux_problem = Problem(lambda p, b: (mlp_loss(p, b), jnp.mean(b["x"])), has_aux=True)  # has_aux from the problem
    fg = ForwardOptions(num_tangents=6, aggregation="orthogonal_projection", batching="chunk", chunk_size=4)
    built = {
        "zo": ZeroOrderOptions().build(Problem(mlp_loss)),
        "zo_direct": zeroth_order(mlp_loss, num_tangents=16, epsilon=1e-3),
        "fg": fg.build(Problem(mlp_loss)),
        "fg_direct": forward_gradient(mlp_loss, num_tangents=6, aggregation="orthogonal_projection"),
        "zo_aux": ZeroOrderOptions(num_tangents=2, batching="scan").build(aux_problem),
        "fg_aux": ForwardOptions(num_tangents=2).build(aux_problem),
    }
    out = jax.jit(lambda p, b, k: {n: e.value_and_grad(p, None, b, key=k)[:2] for n, e in built.items()})(
        params, batch, key
    )
    np.testing.assert_array_equal(flat(out["zo"][1]), flat(out["zo_direct"][1]))
    np.testing.assert_allclose(flat(out["fg"][1]), flat(out["fg_direct"][1]), rtol=1e-10, atol=1e-13)
    assert built["zo"].split is not None and built["fg"].split is not None
    for name in ("zo_aux", "fg_aux"):
        (value, aux), _ = out[name]
        np.testing.assert_allclose(value, mlp_loss(params, batch), rtol=1e-14)
        np.testing.assert_allclose(aux, jnp.mean(batch["x"]), rtol=1e-15)


def test_flags_shared_with_the_forward_gradient_agree():
    """The command line lists a flag once for every estimator: shared flags need one default (and one type, up to
    the Literal choices, which the CLI joins)."""
    forward = {f.name: f for f in flags_of(ForwardOptions)}
    zo = {f.name: f for f in flags_of(ZeroOrderOptions)}
    shared = sorted(set(forward) & set(zo))
    assert {"tangents", "aggregation", "tangent_dist", "batching", "chunk_size"} <= set(shared)
    assert "zo_epsilon" in zo and "forward_mode" in forward
    for name in shared:
        assert forward[name].default == zo[name].default, name
        if name != "tangent_dist":  # gaussian / rademacher here, rank1 too for the forward gradient
            assert forward[name].type == zo[name].type, name
        assert zo[name].help and forward[name].help, name
