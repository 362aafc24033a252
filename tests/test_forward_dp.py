"""Data parallelism for weight-perturbation forward gradients (all-reduce of the k directional derivatives only),
on 8 simulated CPU devices, against the single-device estimate on the full global batch."""

from __future__ import annotations

import dataclasses
import itertools
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mlp_problem import loss_fn
from _two_processes import run_two_processes

from jaxalgo import parallel as par
from jaxalgo.config import RunConfig
from jaxalgo.data import iterate_batches
from jaxalgo.grads import (
    DirectionalSplit,
    EmptyState,
    Estimator,
    _combine,
    backprop,
    forward_gradient,
    rank1_forward_gradient,
)
from jaxalgo.train import TrainState, make_runner, make_train_step, setup, train_and_evaluate

AGGREGATIONS = ("sum", "mean", "orthogonal_projection")


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def make_problem(sizes=(5, 7, 3), batch=32, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = jnp.asarray(rng.standard_normal((m, n)) / math.sqrt(m), dtype)
        params[f"b{i}"] = jnp.asarray(0.1 * rng.standard_normal(n), dtype)
    data = {
        "x": jnp.asarray(rng.standard_normal((batch, sizes[0])), dtype),
        "y": jnp.asarray(rng.standard_normal((batch, sizes[-1])), dtype),
    }
    return params, data


def loss_with_aux(params, batch):
    return loss_fn(params, batch), {"mean_x": jnp.mean(batch["x"])}


def dense_forward_gradient(loss, *, num_tangents, aggregation, distribution="gaussian", has_aux=False) -> Estimator:
    """A small dense-tangent forward-gradient estimator written here, independent of the library's rank-1 code.

    Tangent ``i`` (all leaves, one vector of ``n`` numbers) is drawn from ``fold_in(key, i)`` (standard Gaussian or
    Rademacher);
    ``d`` comes from ``jax.jvp``; the estimate is ``V^T c`` with ``c`` from ``jaxalgo.grads._combine``.
    """

    def tangents(params, key):
        leaves, treedef = jax.tree.flatten(params)
        sizes = [x.size for x in leaves]
        dtype = jnp.result_type(*leaves)
        draw = jax.random.normal if distribution == "gaussian" else jax.random.rademacher
        flat_draws = jax.vmap(lambda i: draw(jax.random.fold_in(key, i), (sum(sizes),), dtype))(
            jnp.arange(num_tangents)
        )
        pieces = jnp.split(flat_draws, np.cumsum(sizes)[:-1], axis=1)
        return treedef, [p.reshape(num_tangents, *x.shape).astype(x.dtype) for p, x in zip(pieces, leaves, strict=True)]

    def directional_derivatives(params, batch, *, key):
        treedef, stacked = tangents(params, key)

        def jvp(tangent):
            f = lambda p: loss(p, batch)
            return jax.jvp(f, (params,), (jax.tree.unflatten(treedef, tangent),), has_aux=has_aux)

        out = jvp([t[0] for t in stacked])  # the primal (and aux) once
        d = jax.vmap(lambda t: jvp(t)[1])(stacked)
        return ((out[0], out[2]) if has_aux else out[0]), d

    def estimate_from_directional(params, d, *, key):
        treedef, stacked = tangents(params, key)
        gram = sum(jnp.einsum("i...,j...->ij", v, v) for v in stacked)
        c = _combine.combination_coefficients(aggregation, d, gram if aggregation == "orthogonal_projection" else None)
        return jax.tree.unflatten(treedef, [jnp.tensordot(c, v, axes=1).astype(v.dtype) for v in stacked])

    split = DirectionalSplit(directional_derivatives, estimate_from_directional)

    def value_and_grad(params, state, batch, *, key):
        value, d = directional_derivatives(params, batch, key=key)
        return value, estimate_from_directional(params, d, key=key), state

    return Estimator(lambda params: EmptyState(), value_and_grad, split)


def build(kind, aggregation, *, num_tangents=4, has_aux=False, loss=None):
    loss = loss or (loss_with_aux if has_aux else loss_fn)
    if kind == "rank1":
        return rank1_forward_gradient(loss, num_tangents=num_tangents, aggregation=aggregation, has_aux=has_aux)
    if kind.startswith("library-"):
        return forward_gradient(
            loss,
            num_tangents=num_tangents,
            aggregation=aggregation,
            tangents=kind.removeprefix("library-"),
            batching="scan",
            has_aux=has_aux,
        )
    return dense_forward_gradient(
        loss, num_tangents=num_tangents, aggregation=aggregation, distribution=kind, has_aux=has_aux
    )


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


# every tangent distribution and every aggregation: the library's rank-1 and dense forward gradients, and dense
# Gaussian and Rademacher estimators written in this file
CASES = [("rank1", a) for a in AGGREGATIONS] + [
    ("gaussian", "mean"),
    ("gaussian", "orthogonal_projection"),
    ("rademacher", "orthogonal_projection"),
    ("library-gaussian", "orthogonal_projection"),
    ("library-rademacher", "mean"),
]


def test_estimate_equals_single_device_estimate_on_the_full_batch():
    mesh = par.make_mesh((2, 4))
    params, batch = make_problem()
    key = jax.random.key(3)
    singles = {case: build(*case) for case in CASES}
    parallels = {case: par.data_parallel(e, mesh) for case, e in singles.items()}
    run_all = lambda estimators: jax.jit(
        lambda p, b, k: {c: e.value_and_grad(p, EmptyState(), b, key=k)[:2] for c, e in estimators.items()}
    )
    expected = run_all(singles)(params, batch, key)
    got = run_all(parallels)(par.replicate(params, mesh), par.shard(batch, mesh), par.replicate(key, mesh))
    for case in CASES:
        np.testing.assert_allclose(got[case][0], expected[case][0], rtol=1e-13, err_msg=str(case))
        np.testing.assert_allclose(
            flat(got[case][1]), flat(expected[case][1]), rtol=1e-11, atol=1e-14, err_msg=str(case)
        )
    # not vacuous: one device's shard alone gives a different estimate
    first_shard = jax.jit(lambda p, b, k: singles["rank1", "mean"].value_and_grad(p, EmptyState(), b, key=k)[1])(
        params, jax.tree.map(lambda x: x[:4], batch), key
    )
    assert not np.allclose(flat(first_shard), flat(expected["rank1", "mean"][1]), rtol=1e-3)
    np.testing.assert_allclose(flat(got["rank1", "mean"][1]) * 4, flat(got["rank1", "sum"][1]), rtol=1e-12)


def test_one_axis_mesh_and_has_aux_average_the_loss_and_aux():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    params, batch = make_problem()
    key = jax.random.key(4)
    est = build("rank1", "orthogonal_projection", has_aux=True)
    dp = par.data_parallel(est, mesh)
    step = jax.jit(lambda p, b, k: dp.value_and_grad(p, EmptyState(), b, key=k))
    args = (par.replicate(params, mesh), par.shard(batch, mesh), par.replicate(key, mesh))
    (loss, aux), grads, _ = step(*args)
    report = par.comm_report(step, *args)  # the aux's floating leaves join the same all-reduce: k + 2 numbers
    assert report.count() == 1 and report.total() == (4 + 2) * 8
    _, grads1, _ = jax.jit(lambda p, b, k: est.value_and_grad(p, EmptyState(), b, key=k))(params, batch, key)
    np.testing.assert_allclose(loss, loss_fn(params, batch), rtol=1e-13)
    np.testing.assert_allclose(aux["mean_x"], jnp.mean(batch["x"]), rtol=1e-12)
    np.testing.assert_allclose(flat(grads), flat(grads1), rtol=1e-11, atol=1e-14)


def shards_of(tree):
    """Per-device copies of every leaf, as host arrays."""
    return [[np.asarray(s.data) for s in leaf.addressable_shards] for leaf in jax.tree.leaves(tree)]


def test_every_device_holds_identical_params_after_each_step_equal_to_single_device_training():
    mesh = par.make_mesh((2, 4))
    params, _ = make_problem()
    optimizer = optax.sgd(0.5, momentum=0.9)
    est = build("rank1", "orthogonal_projection", num_tangents=6)
    single_step = make_train_step(est, optimizer)
    parallel_step = make_train_step(par.data_parallel(est, mesh), optimizer)
    fresh = lambda: TrainState(jnp.zeros((), jnp.int32), params, EmptyState(), optimizer.init(params))
    single, parallel = fresh(), par.replicate(fresh(), mesh)
    run_key = jax.random.key(5)
    mesh_key = par.replicate(run_key, mesh)
    start = flat(params)
    for t in range(3):
        _, batch = make_problem(seed=10 + t)
        single, loss = single_step(single, batch, run_key)
        parallel, parallel_loss = parallel_step(parallel, par.shard(batch, mesh), mesh_key)
        for copies in shards_of(parallel.params) + shards_of(parallel.opt_state):
            assert len(copies) == 8
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0])  # bitwise identical on all 8 devices
        np.testing.assert_allclose(parallel_loss, loss, rtol=1e-12)
        np.testing.assert_allclose(flat(parallel.params), flat(single.params), rtol=1e-10, atol=1e-12)
    assert not np.allclose(flat(single.params), start, atol=1e-3)  # training moved the parameters


def test_cross_device_bytes_per_step_are_k_plus_the_loss():
    """float32 here; the DASO test below checks the float64 count."""
    dtype, itemsize = jnp.float32, 4
    mesh = par.make_mesh((2, 4))
    k = 16
    params, batch = make_problem(sizes=(32, 64, 4), dtype=dtype)
    n = flat(params).size
    optimizer = optax.sgd(0.1)
    state = par.replicate(TrainState(jnp.zeros((), jnp.int32), params, EmptyState(), optimizer.init(params)), mesh)
    batch, run_key = par.shard(batch, mesh), par.replicate(jax.random.key(0), mesh)
    est = build("rank1", "orthogonal_projection", num_tangents=k)
    fast = par.comm_report(make_train_step(par.data_parallel(est, mesh), optimizer), state, batch, run_key)
    assert [c.kind for c in fast.collectives] == ["all-reduce"]  # one packed all-reduce
    assert fast.cross_node_bytes == fast.total() == (k + 1) * itemsize
    assert fast.collectives[0].axes == ("node", "local") and fast.node_local_bytes == 0
    ordinary = par.data_parallel(est, mesh, reduce="gradients")
    slow = par.comm_report(make_train_step(ordinary, optimizer), state, batch, run_key)
    assert slow.cross_node_bytes >= n * itemsize  # the ordinary path moves the n-sized gradient
    # and the directional path computes no more than the ordinary one: the rank-1 tangents stay factored (no k x n
    # tangent is materialised, which a pcast of invariant params inside the loss used to cause)
    temp_bytes = lambda e: (
        make_train_step(e, optimizer).lower(state, batch, run_key).compile().memory_analysis().temp_size_in_bytes
    )
    assert temp_bytes(par.data_parallel(est, mesh)) <= temp_bytes(ordinary) < k * n * itemsize


def test_daso_node_local_average_is_k_numbers_and_matches_the_gradient_average():
    """DASO with reduce="auto" averages only d inside each node; its local steps give the same parameters as DASO with
    the ordinary node-local gradient average (an equivalent formulation). (Its global averages, of parameters, are
    DASO's own and tested with it.)"""
    mesh = par.make_mesh((2, 4))
    params, batch = make_problem(sizes=(6, 8, 3))
    k = 5
    est = build("rank1", "mean", num_tangents=k)
    config = par.DasoConfig(global_skip=2, batches_to_wait=1, comm_dtype="float32")
    fast = par.daso(est, optax.sgd(0.3), mesh, config)
    slow = par.daso(est, optax.sgd(0.3), mesh, config, reduce="gradients")
    run_key = par.replicate(jax.random.key(6), mesh)
    sharded = par.shard(batch, mesh)
    local = par.comm_report(fast.steps["local"], fast.init(params), sharded, run_key)
    assert local.count() == 1 and local.cross_node_bytes == 0 and local.node_local_bytes == (k + 1) * 8
    states = {"fast": fast.init(params), "slow": slow.init(params)}
    for name, d in (("fast", fast), ("slow", slow)):
        for _ in range(2):
            states[name], _ = d.steps["local"](states[name], sharded, run_key)
    got, expected = (np.asarray(flat(states[s].params)) for s in ("fast", "slow"))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    w0 = np.asarray(states["fast"].params["w0"])  # stacked per node
    assert not np.allclose(w0[0], w0[1])  # each node took its own steps


def test_bad_reduce_is_rejected_before_any_work():
    mesh = par.make_mesh((2, 4))
    with pytest.raises(ValueError, match="reduce: unknown reduction 'k'; allowed: auto, directional, gradients"):
        par.data_parallel(build("rank1", "mean"), mesh, reduce="k")
    with pytest.raises(ValueError, match="reduce: 'directional' needs an estimator with a directional split"):
        par.data_parallel(backprop(loss_fn), mesh, reduce="directional")
    with pytest.raises(ValueError, match="reduce: 'directional' needs an estimator with a directional split"):
        par.daso(backprop(loss_fn), optax.sgd(0.1), mesh, reduce="directional")
    # backprop keeps the ordinary path under "auto"
    assert par.data_parallel(backprop(loss_fn), mesh).split is None


# Both sides of the multi-process test run this: rank-1 FROG, 3 SGD steps (all aggregations are covered above).
PROGRAM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxalgo import parallel as par
    from jaxalgo.grads import EmptyState, rank1_forward_gradient
    from jaxalgo.train import TrainState, make_train_step

    def loss_fn(p, b):
        h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
        return jnp.mean(jnp.sum((h @ p["w2"] - b["y"]) ** 2, axis=-1))

    def run(mesh):
        k1, k2, kx, ky = jax.random.split(jax.random.key(0), 4)
        params = {"w1": jax.random.normal(k1, (6, 8)) / 3, "b1": jnp.zeros(8), "w2": jax.random.normal(k2, (8, 3)) / 3}
        x, y = jax.random.normal(kx, (3, 16, 6)), jax.random.normal(ky, (3, 16, 3))
        out = {}
        for aggregation, lr in (("orthogonal_projection", 1.0),):
            est = rank1_forward_gradient(loss_fn, num_tangents=16, aggregation=aggregation)
            opt = optax.sgd(lr)
            step = make_train_step(par.data_parallel(est, mesh), opt)
            state = par.replicate(TrainState(jnp.zeros((), jnp.int32), params, EmptyState(), opt.init(params)), mesh)
            run_key = par.replicate(jax.random.key(1), mesh)
            if aggregation == "orthogonal_projection":
                report = par.comm_report(step, state, par.shard({"x": x[0], "y": y[0]}, mesh), run_key)
                out["cross_node_bytes"] = np.array(report.cross_node_bytes)
            losses = []
            for t in range(3):
                state, loss = step(state, par.shard({"x": x[t], "y": y[t]}, mesh), run_key)
                losses.append(float(np.asarray(loss.addressable_data(0))))
            out[aggregation + "_losses"] = np.array(losses)
            for name, value in state.params.items():
                out[aggregation + "_" + name] = np.asarray(value.addressable_data(0))
        return out
    """
)


@pytest.mark.multiprocess
def test_two_processes_agree_with_one_process_on_8_devices(tmp_path):
    outputs = run_two_processes(tmp_path, PROGRAM)

    namespace: dict = {}
    with jax.enable_x64(False):  # the workers run in float32
        exec(PROGRAM, namespace)
        expected = namespace["run"](par.make_mesh((2, 4)))
    assert int(expected["cross_node_bytes"]) == (16 + 1) * 4
    for i, got in enumerate(outputs):
        assert sorted(got) == sorted(expected)
        assert int(got["cross_node_bytes"]) == (16 + 1) * 4  # k + 1 float32 numbers cross the processes
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=f"process {i}: {name}")
    assert expected["orthogonal_projection_losses"][-1] < expected["orthogonal_projection_losses"][0]


DIGITS = {"estimator": "frog", "tangents": 16, "optimizer": "sgd", "lr": 10.0, "hidden": (64,)}
DIGITS |= {"epochs": 10, "batch_size": 64, "seed": 0, "quiet": True}


def test_digits_frog_ddp_2x4_reaches_the_single_device_accuracy(tmp_path):
    """``jaxalgo train --parallel ddp --mesh 2x4 --estimator frog --tangents 16`` against one device, same seed
    and global batch; and the run's DDP step all-reduces only k + 1 numbers."""
    with jax.enable_x64(False):  # as the CLI runs
        single = train_and_evaluate(RunConfig.from_flags(**DIGITS), tmp_path / "single")
        config = RunConfig.from_flags(**DIGITS, parallel="ddp", mesh="2x4")
        ddp = train_and_evaluate(config, tmp_path / "ddp")
        assert single["test_accuracy"] >= 0.88
        assert abs(ddp["test_accuracy"] - single["test_accuracy"]) <= 0.005, (ddp, single)
        experiment = setup(dataclasses.replace(config, epochs=1))
        runner = make_runner(dataclasses.replace(config, epochs=1), experiment)
        batch = next(iterate_batches(experiment.dataset, 64, seed=0, epoch=0))
        state = runner.init(experiment.init_state())
        report = par.comm_report(runner.train_step, state, par.shard(batch, runner.mesh), runner.run_key)
        assert report.cross_node_bytes == report.total() == (16 + 1) * 4


def test_bad_parallel_reduce_fails_before_training(tmp_path):
    flags = {**DIGITS, "epochs": 1, "parallel": "ddp", "mesh": "2x4", "parallel_reduce": "k"}
    message = r"parallel_reduce: got 'k'; allowed: auto, directional, gradients"
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(RunConfig.from_flags(**flags), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
