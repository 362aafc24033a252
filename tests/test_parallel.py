"""Data parallelism, DASO and comm_report on 8 simulated CPU devices (2 nodes x 4 local devices).

Oracles: the single-device step on the full batch (DDP), DDP itself (DASO with global_skip 1, S 0), a hand
computation of DASO's merge in numpy, the replica groups of the compiled HLO, and the parameter byte count.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxalgo import parallel as par
from jaxalgo.grads import Estimator, backprop

IN, HIDDEN, OUT, BATCH = 6, 8, 3, 16


def tiny_params(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, OUT)) / np.sqrt(HIDDEN),
    }


def loss_fn(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean(jnp.sum((hidden @ params["w2"] - batch["y"]) ** 2, axis=-1))


def make_batch(seed: int, size: int = BATCH) -> dict:
    kx, ky = jax.random.split(jax.random.key(100 + seed))
    return {"x": jax.random.normal(kx, (size, IN)), "y": jax.random.normal(ky, (size, OUT))}


def random_direction(loss_fn) -> Estimator:
    """A one-tangent forward-gradient estimator (d v with d = <grad, v>, v from the key), written independently."""

    def value_and_grad(params, state, batch, *, key):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        tangent = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)])
        loss, d = jax.jvp(lambda p: loss_fn(p, batch), (params,), (tangent,))
        return loss, jax.tree.map(lambda v: d * v, tangent), state

    return Estimator(lambda params: (), value_and_grad)


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def mesh():
    return par.make_mesh((2, 4))


def single_device_run(estimator, optimizer, params, batches, run_key):
    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads, _ = estimator.value_and_grad(params, (), batch, key=key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for t, batch in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(run_key, t))
        losses.append(float(loss))
    return params, losses


def ddp_run(estimator, optimizer, params, batches, run_key, mesh):
    dp = par.data_parallel(estimator, mesh)

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads, _ = dp.value_and_grad(params, (), batch, key=key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = par.replicate(params, mesh)
    opt_state = par.replicate(optimizer.init(params), mesh)
    losses = []
    for t, batch in enumerate(batches):
        key = par.replicate(jax.random.fold_in(run_key, t), mesh)
        params, opt_state, loss = step(params, opt_state, par.shard(batch, mesh), key)
        losses.append(float(loss))
    return params, losses, step, opt_state


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("which", ["backprop", "forward_gradient"])
def test_ddp_step_equals_single_device_step_on_full_batch(mesh, which):
    estimator = backprop(loss_fn) if which == "backprop" else random_direction(loss_fn)
    optimizer = optax.adam(1e-2)
    batches = [make_batch(t) for t in range(4)]
    run_key = jax.random.key(7)
    single, single_losses = single_device_run(estimator, optimizer, tiny_params(), batches, run_key)
    ddp, ddp_losses, _, _ = ddp_run(estimator, optimizer, tiny_params(), batches, run_key, mesh)
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-5)
    chex.assert_trees_all_close(host(ddp), host(single), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(ddp["w1"]), np.asarray(tiny_params()["w1"]))


def test_replicated_parameter_gradient_trap_is_avoided(mesh):
    """Without the pcast, grad of replicated params comes back summed over the 8 devices: 8x too large."""
    params, batch = tiny_params(), make_batch(0)
    exact = jax.grad(loss_fn)(params, batch)

    def naive(params, batch):
        return jax.lax.pmean(jax.grad(loss_fn)(params, batch), ("node", "local"))

    naive_grads = jax.jit(jax.shard_map(naive, mesh=mesh, in_specs=(P(), P(("node", "local"))), out_specs=P()))(
        par.replicate(params, mesh), par.shard(batch, mesh)
    )
    np.testing.assert_allclose(np.asarray(naive_grads["w2"]), 8 * np.asarray(exact["w2"]), rtol=1e-4, atol=1e-6)

    _, grads, _ = jax.jit(lambda p, b: par.data_parallel(backprop(loss_fn), mesh).value_and_grad(p, (), b, key=None))(
        params, batch
    )
    chex.assert_trees_all_close(host(grads), host(exact), rtol=1e-5, atol=1e-6)


def daso_run(estimator, optimizer, params, batches, run_key, mesh, config, phases):
    d = par.daso(estimator, optimizer, mesh, config)
    state = d.init(params)
    key = par.replicate(run_key, mesh)
    losses = []
    for batch, phase in zip(batches, phases, strict=True):
        state, loss = d.steps[phase](state, par.shard(batch, mesh), key)
        losses.append(np.asarray(loss))
    return d, state, losses


@pytest.mark.parametrize(("comm_dtype", "tol"), [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_daso_with_global_skip_1_and_s_0_equals_ddp(mesh, comm_dtype, tol):
    config = par.DasoConfig(global_skip=1, batches_to_wait=0, warmup_epochs=0, cooldown_epochs=0, comm_dtype=comm_dtype)
    optimizer = optax.sgd(0.05, momentum=0.9)
    batches = [make_batch(t) for t in range(4)]
    phases = [
        par.daso_phase(t, steps_per_epoch=4, total_epochs=1, global_skip=1, batches_to_wait=0, config=config)
        for t in range(4)
    ]
    assert phases == ["blocking"] * 4
    run_key = jax.random.key(3)
    ddp, ddp_losses, _, _ = ddp_run(backprop(loss_fn), optimizer, tiny_params(), batches, run_key, mesh)
    _, state, losses = daso_run(backprop(loss_fn), optimizer, tiny_params(), batches, run_key, mesh, config, phases)
    for node in range(2):
        chex.assert_trees_all_close(
            host(jax.tree.map(lambda x, i=node: x[i], host(state.params))), host(ddp), rtol=tol, atol=tol
        )
    np.testing.assert_allclose([loss.mean() for loss in losses], ddp_losses, rtol=tol)
    assert int(state.step) == 4


def test_daso_send_then_merge_matches_hand_computation(mesh):
    """Send at step 0, local step 1, merge at step 2 (S = 2, w = 2, P = 2 nodes), plain SGD, f32 wire."""
    config = par.DasoConfig(global_skip=4, batches_to_wait=2, comm_dtype="float32")
    lr, params, batches = 0.1, tiny_params(), [make_batch(t) for t in range(3)]
    _, state, _ = daso_run(
        backprop(loss_fn), optax.sgd(lr), params, batches, jax.random.key(0), mesh, config, ["send", "local", "merge"]
    )

    def node_grad(p, batch, node):
        shard = jax.tree.map(lambda x: x[node * 8 : (node + 1) * 8], batch)  # node n holds 8 of the 16 examples
        return jax.grad(loss_fn)(p, shard)

    theta = [params, params]
    for t in range(3):
        theta = [jax.tree.map(lambda p, g: p - lr * g, theta[n], node_grad(theta[n], batches[t], n)) for n in range(2)]
        if t == 0:
            stale_sum = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), theta[0], theta[1])
    s, w, nodes = 2, 2.0, 2
    expected = [
        jax.tree.map(lambda x, tot: (w * s * np.asarray(x) + tot) / (w * s + nodes), th, stale_sum) for th in theta
    ]
    got = host(state.params)
    for n in range(2):
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=n: x[i], got), host(expected[n]), rtol=1e-5, atol=1e-6)
    mean_stale = jax.tree.map(lambda x: x / 2, stale_sum)
    chex.assert_trees_all_close(host(state.daso.inflight), mean_stale, rtol=1e-5, atol=1e-7)
    # the two nodes really differ (the merge did not collapse them into one)
    assert not np.allclose(got["w1"][0], got["w1"][1])


def test_node_local_average_spans_only_the_node(mesh):
    d = par.daso(backprop(loss_fn), optax.sgd(0.1), mesh)
    state = d.init(tiny_params())
    report = par.comm_report(
        d.steps["local"], state, par.shard(make_batch(0), mesh), par.replicate(jax.random.key(0), mesh)
    )
    assert report.collectives, "the local step must average gradients inside the node"
    for c in report.collectives:
        assert c.kind == "all-reduce" and c.level == "node-local" and c.axes == ("local",)
        assert sorted(map(sorted, c.replica_groups)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert report.cross_node_bytes == 0


def test_comm_report_ddp_moves_one_gradient_all_reduce_of_the_parameter_bytes(mesh):
    params = tiny_params()
    _, _, step, opt_state = ddp_run(backprop(loss_fn), optax.sgd(0.1), params, [make_batch(0)], jax.random.key(0), mesh)
    report = par.comm_report(
        step,
        par.replicate(params, mesh),
        opt_state,
        par.shard(make_batch(1), mesh),
        par.replicate(jax.random.key(1), mesh),
    )
    loss_bytes = 4
    assert report.count() == report.count(kind="all-reduce") >= 1
    assert all(
        c.level == "cross-node" and c.axes == ("node", "local") and c.group_size == 8 for c in report.collectives
    )
    assert report.cross_node_bytes == param_bytes(params) + loss_bytes
    assert report.node_local_bytes == 0


@pytest.mark.parametrize("sharded", [False, True])
def test_daso_cross_node_bytes_per_cycle(mesh, sharded):
    skip = 4
    config = par.DasoConfig(global_skip=skip, batches_to_wait=1, sharded=sharded)
    params = tiny_params()
    n = sum(x.size for x in jax.tree.leaves(params))
    d = par.daso(backprop(loss_fn), optax.sgd(0.1), mesh, config)
    state = d.init(params)
    args = (state, par.shard(make_batch(0), mesh), par.replicate(jax.random.key(0), mesh))
    reports = {phase: par.comm_report(d.steps[phase], *args) for phase in par.PHASES}
    cycle = [
        d.phase(t, steps_per_epoch=100, total_epochs=20, schedule=state.daso.schedule)
        for t in range(4 * 100 + 1, 4 * 100 + 5)
    ]
    assert sorted(cycle) == sorted(["send", "merge", "local", "local"])
    per_step = sum(reports[p].cross_node_bytes for p in cycle) / skip
    requested = sum(reports[p].requested_cross_node_bytes for p in cycle) / skip
    ddp_bytes = 4 * n + 4
    local = 4
    chunk = -(-n // local)  # sharded: each local device sends ceil(n / 4) elements
    expected = 4 * (chunk if sharded else n) / skip
    assert per_step == pytest.approx(expected)
    assert requested == pytest.approx(expected / 2)  # bf16 on the wire as requested; XLA:CPU runs it in f32
    assert per_step <= ddp_bytes / skip / (local if sharded else 1) + 4
    send = [c for c in reports["send"].collectives if c.level == "cross-node"]
    assert [c.requested_dtypes for c in send] == [("bf16",)] and [c.dtypes for c in send] == [("f32",)]
    assert reports["merge"].cross_node_bytes == reports["local"].cross_node_bytes == 0
    if sharded:
        # the pieces are all-gathered inside the node, in bf16 as requested
        assert reports["send"].total(level="node-local", kind="all-gather", requested=True) == 2 * chunk


def test_sharded_mean_equals_plain_mean(mesh):
    tree = {"a": jnp.arange(2 * 7.0).reshape(2, 7), "b": jnp.arange(2 * 3.0).reshape(2, 3) ** 2}

    def both(t):
        t = jax.tree.map(lambda x: x[0], t)
        return par.mean_over(t, "node"), par.sharded_mean_over(t, "node", "local")

    plain, sharded = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=P("node"), out_specs=(P(), P())))(
        par.place(tree, mesh, P("node"))
    )
    chex.assert_trees_all_close(host(sharded), host(plain))
    chex.assert_trees_all_close(host(plain), jax.tree.map(lambda x: np.asarray(x).mean(0), tree))


def test_phase_schedule_and_plateau_adaptation():
    config = par.DasoConfig(global_skip=4, batches_to_wait=1, warmup_epochs=1, cooldown_epochs=1)
    phases = [
        par.daso_phase(t, steps_per_epoch=10, total_epochs=3, global_skip=4, batches_to_wait=1, config=config)
        for t in range(30)
    ]
    assert phases[:10] == ["blocking"] * 10  # warm-up
    assert phases[10:20] == ["local", "local", "local", "send", "merge", "local", "local", "send", "merge", "blocking"]
    assert phases[20:] == ["blocking"] * 10  # cool-down
    # A send whose merge would land on the last batch is superseded by the last batch's blocking average.
    late = [
        par.daso_phase(t, steps_per_epoch=8, total_epochs=3, global_skip=4, batches_to_wait=2, config=config)
        for t in range(8, 16)
    ]
    assert late == ["local", "local", "local", "send", "local", "merge", "local", "blocking"]

    config = par.DasoConfig(warmup_epochs=0, cooldown_epochs=0, plateau_patience=2)
    schedule = par.initial_schedule(config)
    trace = []
    for epoch, loss in enumerate([1.0, 0.9, 0.97, 0.96, 0.5, 0.49, 0.48, 0.47, 0.47, 0.47, 0.47]):
        schedule = par.update_schedule(schedule, epoch=epoch, train_loss=loss, total_epochs=100, config=config)
        trace.append((int(schedule.global_skip), int(schedule.batches_to_wait)))
    # 1.0 best; 0.9 beats 0.95; 0.97, 0.96 plateau -> (2, 1) clamped below skip -> (2, 1); 0.5 best;
    # 0.49, 0.48 plateau -> (1, 0); 0.47 beats 0.475; 0.47, 0.47 plateau at skip 1 -> (8, 2)
    assert trace == [(4, 1), (4, 1), (4, 1), (2, 1), (2, 1), (2, 1), (1, 0), (1, 0), (1, 0), (8, 2), (8, 2)]


def test_bad_input_gives_clear_errors(mesh):
    with pytest.raises(ValueError, match=r"mesh: shape 3x4 needs 12 devices, but 8 are available"):
        par.make_mesh((3, 4))
    with pytest.raises(ValueError, match=r"mesh: expected sizes joined by 'x'"):
        par.make_mesh("2by4")
    with pytest.raises(ValueError, match=r"global_skip: must be an integer >= 1, got 0"):
        par.DasoConfig(global_skip=0, batches_to_wait=0)
    with pytest.raises(ValueError, match=r"batches_to_wait: S = 4 must be < global_skip = 4"):
        par.DasoConfig(global_skip=4, batches_to_wait=4)
    with pytest.raises(ValueError, match=r"comm_dtype: unknown dtype 'int8'"):
        par.DasoConfig(comm_dtype="int8")
    with pytest.raises(ValueError, match=r"batch_size: the global batch of 12 examples does not split evenly over 8"):
        par.check_divisible(12, mesh)
    dp = par.data_parallel(backprop(loss_fn), mesh)
    with pytest.raises(ValueError, match=r"batch: leaf \['x'\] has shape \(12, 6\).*divisible by the 8 devices"):
        dp.value_and_grad(tiny_params(), (), make_batch(0, size=12), key=None)
    with pytest.raises(ValueError, match=r"axes: \('dp',\) must be a non-empty subset"):
        par.data_parallel(backprop(loss_fn), mesh, axes=("dp",))
    with pytest.raises(ValueError, match=r"num_processes, process_id: needed together with coordinator_address"):
        par.initialize_distributed("127.0.0.1:1234")


def test_comm_report_parses_iota_and_listed_replica_groups():
    from jaxalgo.parallel._comm import _classify, _parse_groups

    assert _parse_groups("replica_groups=[2,4]<=[8], to_apply", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert _parse_groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert _parse_groups("replica_groups={{0,4},{1,5}}, x", 8) == [[0, 4], [1, 5]]
    assert _parse_groups("replica_groups={}, x", 8) == [list(range(8))]
    assert _parse_groups("source_target_pairs={{0,1},{1,2}}, x", 8) == [[0, 1], [1, 2]]
    names = ("node", "local")
    assert _classify([[0, 4], [1, 5]], (2, 4), names, ("node",)) == (("node",), "cross-node")
    assert _classify([[0, 1, 2, 3]], (2, 4), names, ("node",)) == (("local",), "node-local")
    assert _classify([[0], [1]], (2, 4), names, ("node",)) == ((), "none")
