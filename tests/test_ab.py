"""AB-training on 8 simulated CPU devices (2 groups x 4).

Oracles: the Eckart-Young error of the truncated SVD; DDP itself (a sync every step in "full" mode without
truncation); a per-group single-device simulation of the group phase written here with plain jax and optax (chain
rule through W = A B, each group on its own slice of the batch); numpy formulas of the four sync modes; the replica
groups of the compiled HLO; the parameter byte counts; an uninterrupted run (exact resume).
"""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _two_processes import run_cli_in_two_processes, run_two_processes

from jaxalgo import losses, models
from jaxalgo import parallel as par
from jaxalgo.config import RunConfig
from jaxalgo.grads import backprop
from jaxalgo.train import make_train_step, train_and_evaluate

BATCH = 32


def tiny_model(dtype=jnp.float64, inputs=12):
    chain = models.mlp((inputs,), 5, hidden=(10,), key=jax.random.key(0))
    fn, params = models.split_chain(chain)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    loss_fn = lambda p, b: losses.softmax_cross_entropy(fn.apply(p, b["x"]), b["y"])
    return fn, params, loss_fn


def make_batch(seed, dtype=np.float64, size=BATCH, inputs=12):
    rng = np.random.RandomState(seed)
    return {"x": rng.randn(size, inputs).astype(dtype), "y": rng.randint(0, 5, size).astype(np.int32)}


def build(config, optimizer=None, dtype=jnp.float64, inputs=12):
    fn, params, loss_fn = tiny_model(dtype, inputs)
    mesh = par.ab_mesh(4, sync_mode=config.sync_mode)
    optimizer = optimizer or optax.adam(1e-2)
    ab = par.ab_training(backprop(loss_fn), optimizer, mesh, fn, params, config, lr=1e-2)
    return ab, params, loss_fn, mesh


def host(x):
    return np.asarray(jax.device_get(x))


def kernel(params, name):
    return params[int(name.split("/")[0])]["linear"]["kernel"]


def test_factors_reproduce_w_up_to_the_truncation():
    with jax.enable_x64(True):
        config = par.ABConfig(warmup_steps=0, cutoff=0.4, bucket_ratio=1.0)
        ab, params, _, _ = build(config)
        assert [x.name for x in ab.layers] == ["0/linear", "1/linear"]
        state = ab.factorize(ab.init(params))
        for layer in ab.layers:
            w = np.asarray(kernel(params, layer.name))
            s = np.linalg.svd(w, compute_uv=False)
            rank = int(host(state.ranks[layer.name]))
            assert rank == max(1, int(np.sum(s >= 0.4 * s[0])))
            a, b = (host(state.train["factors"][layer.name][k]) for k in "AB")
            assert a.shape == (2, layer.m, rank) and b.shape == (2, rank, layer.n)
            for g in range(2):  # Eckart-Young: the error is the cut part of the spectrum
                np.testing.assert_allclose(np.linalg.norm(w - a[g] @ b[g]), np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-9)
        # at full rank (the ranks given explicitly) the factorisation is exact
        state = ab.factorize(state, ranks={x.name: x.full_rank for x in ab.layers})
        for layer in ab.layers:
            a, b = (host(state.train["factors"][layer.name][k]) for k in "AB")
            np.testing.assert_allclose(a[1] @ b[1], np.asarray(kernel(params, layer.name)), atol=1e-12)


def run_schedule(ab, state, batches, run_key, lr):
    for step, batch in enumerate(batches):
        events, phase = par.ab_schedule(step, ab.config)
        for event in events:
            state = ab.sync(state) if event == "sync" else ab.factorize(state)
        state, _ = ab.steps[phase](state, batch, run_key, par.lr_factor(step, ab.config, lr))
    return state


def test_sync_every_step_in_full_mode_without_truncation_equals_ddp():
    """Cycle of one step: sync (W = mean A B), one data-parallel step, re-SVD at full rank. Every transition runs
    each step, and the trajectory must be DDP's (moments of W kept, 1-D parameters averaged)."""
    with jax.enable_x64(True):
        config = par.ABConfig(
            warmup_steps=1, steps_between_syncs=1, ddp_steps_after_sync=1, cutoff=None, lr_rebound_steps=0
        )
        ab, params, loss_fn, mesh = build(config)
        batches = [make_batch(i) for i in range(5)]
        run_key = par.replicate(jax.random.key(0), mesh)
        state = run_schedule(ab, ab.init(params), batches, run_key, 1e-2)
        ddp_step = make_train_step(par.data_parallel(backprop(loss_fn), mesh), optax.adam(1e-2))
        from jaxalgo.train import TrainState

        ddp = par.replicate(TrainState(jnp.zeros((), jnp.int32), params, (), optax.adam(1e-2).init(params)), mesh)
        for batch in batches:
            ddp, _ = ddp_step(ddp, par.shard(batch, mesh), run_key)
        for g in range(2):
            got = jax.tree.map(lambda x, g=g: host(x)[g], state.train["params"])
            chex.assert_trees_all_close(got, jax.tree.map(host, ddp.params), rtol=1e-9, atol=1e-11)


def wide(params, name, only_b):
    """Whether the oracle factorises this kernel through its transpose: with "only-b", a wide W (m < n)."""
    w = kernel(params, name)
    return only_b and w.shape[0] < w.shape[1]


def group_oracle(params, batch, layers, ranks, num_steps, lr, group, num_groups, only_b=False, inputs=12):
    """One group's phase on one device: factors from the SVD, the group's slice of the batch, its factor trained.
    The factors are of W, or of W^T for a wide W with "only-b" (then B is the short factor)."""
    _, _, loss_fn = tiny_model(inputs=inputs)
    rows = BATCH // num_groups
    batch = jax.tree.map(lambda x: x[group * rows : (group + 1) * rows], batch)
    factors = {}
    for layer in layers:
        w = np.asarray(kernel(params, layer.name))
        u, s, vt = np.linalg.svd(w.T if wide(params, layer.name, only_b) else w, full_matrices=False)
        r = ranks[layer.name]
        factors[layer.name] = (u[:, :r] * np.sqrt(s[:r]), np.sqrt(s[:r])[:, None] * vt[:r])
    train_a = group < num_groups // 2 and not only_b
    shared = jax.tree.map(lambda x: x, params)
    trained = {"shared": shared, "f": {k: v[0] if train_a else v[1] for k, v in factors.items()}}
    frozen = {k: v[1] if train_a else v[0] for k, v in factors.items()}

    def loss(trained):
        p = trained["shared"]
        for name, f in trained["f"].items():
            a, b = (f, frozen[name]) if train_a else (frozen[name], f)
            w = (a @ b).T if wide(params, name, only_b) else a @ b
            block = int(name.split("/")[0])
            p = tuple(
                {**blk, "linear": {**blk["linear"], "kernel": w}} if i == block else blk for i, blk in enumerate(p)
            )
        return loss_fn(p, batch)

    tx = optax.adam(lr)

    @jax.jit
    def step(trained, opt):
        updates, opt = tx.update(jax.grad(loss)(trained), opt, trained)
        return optax.apply_updates(trained, updates), opt

    opt = tx.init(trained)
    for _ in range(num_steps):
        trained, opt = step(trained, opt)
    out = {}
    for name, f in trained["f"].items():
        out[name] = (np.asarray(f), frozen[name]) if train_a else (frozen[name], np.asarray(f))
    return trained["shared"], out


@pytest.mark.parametrize("mode", ["full", "only-b"])
def test_group_phase_and_sync_match_a_per_group_oracle(mode):
    """The MLP is 6-10-5 for "only-b", so its first, wide kernel is factorised through its transpose."""
    inputs = 6 if mode == "only-b" else 12
    with jax.enable_x64(True):
        config = par.ABConfig(
            warmup_steps=0,
            steps_between_syncs=3,
            ddp_steps_after_sync=0,
            sync_mode=mode,
            cutoff=0.3,
            lr_rebound_steps=0,
            bucket_ratio=1.0,
        )
        ab, params, _, mesh = build(config, inputs=inputs)
        assert [x.transposed for x in ab.layers] == [mode == "only-b", False]
        batch = make_batch(7, inputs=inputs)
        run_key = par.replicate(jax.random.key(0), mesh)
        state = run_schedule(ab, ab.init(params), [batch] * 3, run_key, 1e-2)
        ranks = {k: int(host(v)) for k, v in state.ranks.items()}
        only_b = mode == "only-b"
        oracles = [group_oracle(params, batch, ab.layers, ranks, 3, 1e-2, g, 2, only_b, inputs) for g in range(2)]
        for g, (shared, factors) in enumerate(oracles):
            for name, (a, b) in factors.items():
                np.testing.assert_allclose(host(state.train["factors"][name]["A"])[g], a, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(host(state.train["factors"][name]["B"])[g], b, rtol=1e-8, atol=1e-10)
            for block in range(2):
                np.testing.assert_allclose(
                    host(state.train["params"][block]["linear"]["bias"])[g], shared[block]["linear"]["bias"], rtol=1e-8
                )
        merged = ab.sync(state)  # the sync of step 3: W merged by the mode, biases averaged over all devices
        for name in ranks:
            (a0, b0), (a1, b1) = oracles[0][1][name], oracles[1][1][name]
            expected = (a0 @ b0 + a1 @ b1) / 2 if mode == "full" else a0 @ (b0 + b1) / 2
            expected = expected.T if wide(params, name, only_b) else expected
            for g in range(2):
                np.testing.assert_allclose(
                    kernel(jax.tree.map(lambda x, g=g: host(x)[g], merged.train["params"]), name),
                    expected,
                    rtol=1e-8,
                    atol=1e-10,
                )
        bias = host(merged.train["params"][1]["linear"]["bias"])
        np.testing.assert_allclose(
            bias[0], (oracles[0][0][1]["linear"]["bias"] + oracles[1][0][1]["linear"]["bias"]) / 2, rtol=1e-8
        )
        np.testing.assert_array_equal(bias[0], bias[1])


@pytest.mark.parametrize("mode", ["with-stale", "only-learned"])
def test_sync_modes_merge_the_factors_as_specified(mode):
    """Groups with different factors (set by hand): the merged W follows the mode's formula."""
    with jax.enable_x64(True):
        config = par.ABConfig(warmup_steps=0, sync_mode=mode, cutoff=None, bucket_ratio=1.0)
        ab, params, _, mesh = build(config)
        state = ab.factorize(ab.init(params))
        rng = np.random.RandomState(3)
        factors = {
            name: {k: rng.randn(*host(v).shape) for k, v in f.items()} for name, f in state.train["factors"].items()
        }
        train = {"params": state.train["params"], "factors": par.place(factors, mesh, jax.P("group"))}
        merged = ab.sync(state._replace(train=train))
        for name, f in factors.items():
            a, b = f["A"], f["B"]
            # 2 groups: "only-learned" takes A from group 0 (the A-group) and B from group 1 (the B-group)
            expected = a.mean(0) @ b.mean(0) if mode == "with-stale" else a[0] @ b[1]
            got = kernel(jax.tree.map(lambda x: host(x)[1], merged.train["params"]), name)
            np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.fixture(scope="module")
def digits_models():
    out = {}
    for name, options in (("mlp", {"hidden": (256, 256)}), ("vit", {"depth": 1})):
        chain = models.build_model(name, input_shape=(8, 8, 1), num_outputs=10, key=jax.random.key(0), **options)
        fn, params = models.split_chain(chain)
        out[name] = (fn, params, lambda p, b, fn=fn: losses.softmax_cross_entropy(fn.apply(p, b["x"]), b["y"]))
    return out


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_group_phase_reductions_stay_in_the_group_and_a_cycle_costs_under_0_3_of_ddp(digits_models, name):
    fn, params, loss_fn = digits_models[name]
    config = par.ABConfig(warmup_steps=0, steps_between_syncs=20, ddp_steps_after_sync=1, bucket_ratio=1.0)
    mesh = par.ab_mesh(4)
    ab = par.ab_training(backprop(loss_fn), optax.adam(1e-3), mesh, fn, params, config)
    ranks = {x.name: max(1, x.full_rank // 8) for x in ab.layers}
    state = ab.factorize(ab.init(params), ranks=ranks)
    rng = np.random.RandomState(0)
    batch = {"x": rng.randn(64, 8, 8, 1).astype(np.float32), "y": rng.randint(0, 10, 64).astype(np.int32)}
    comm = par.ab_comm(ab, state, batch, par.replicate(jax.random.key(0), mesh))
    group = comm["group"]
    assert group.collectives and all(c.axes == ("dp",) and c.group_size == 4 for c in group.collectives), str(group)
    for c in group.collectives:  # replica groups: the 4 contiguous devices of each group
        assert sorted(map(sorted, c.replica_groups)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    dense = sum(x.size for x in jax.tree.leaves(params))
    factored = sum(x.m * x.n for x in ab.layers)
    size_a = sum(x.m * ranks[x.name] for x in ab.layers)
    size_b = sum(x.n * ranks[x.name] for x in ab.layers)
    # the packed buffer of the trained factors and the shared parameters, and the group's loss (4 bytes)
    assert group.total(requested=True) == 4 * (max(size_a, size_b) + dense - factored) + 4
    assert comm["ddp"].total(requested=True) == 4 * dense + 4
    assert comm["bytes"]["factorize"] <= 4 * 8 * len(ab.layers)  # only the agreed ranks (pmax)
    ratio = comm["cycle_bytes"] / comm["bytes"]["ddp"]
    assert ratio <= 0.3, (name, ratio, comm["bytes"])
    assert ab.compression(state)["compression_ratio"] > 1


def test_sync_bytes_of_each_mode(digits_models):
    """What a sync all-reduces across groups, from the HLO: ``full`` every composed ``W`` (m n per layer), the
    factor modes ``A`` and ``B`` ((m + n) r), ``only-b`` only ``B`` (r min(m, n)); on top, the same shared
    parameters and their optimizer moments in every mode."""
    fn, params, loss_fn = digits_models["mlp"]
    mesh = par.ab_mesh(4)
    sync_bytes = {}
    for mode in par.SYNC_MODES:
        config = par.ABConfig(warmup_steps=0, sync_mode=mode, bucket_ratio=1.0)
        ab = par.ab_training(backprop(loss_fn), optax.adam(1e-3), mesh, fn, params, config)
        ranks = {x.name: max(1, x.full_rank // 8) for x in ab.layers}
        state = ab.factorize(ab.init(params), ranks=ranks)
        report = par.comm_report(ab.sync_program, state.train, state.opt_state, mesh=mesh)
        assert all(c.axes == ("group",) for c in report.collectives), str(report)
        sync_bytes[mode] = report.total(requested=True)
    layers = ab.layers
    shared = sync_bytes["full"] - 4 * sum(x.m * x.n for x in layers)
    factors = 4 * sum((x.m + x.n) * ranks[x.name] for x in layers)
    assert shared > 0
    assert sync_bytes["with-stale"] == sync_bytes["only-learned"] == shared + factors
    # only-b factorises the wide 64 x 256 kernel through its transpose: B is r x min(m, n)
    assert sync_bytes["only-b"] == shared + 4 * sum(ranks[x.name] * min(x.m, x.n) for x in layers)


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match="group_size: 3 does not divide the 8 devices"):
        par.ab_mesh(3)
    with pytest.raises(ValueError, match="1 groups is an odd number"):
        par.ab_mesh(8)
    par.ab_mesh(8, sync_mode="only-b")  # all groups train B: any number of groups
    for cutoff in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="cutoff: must be a number in the open interval"):
            par.ABConfig(cutoff=cutoff)
    with pytest.raises(ValueError, match="sync_mode: unknown mode 'half'"):
        par.ABConfig(sync_mode="half")
    with pytest.raises(ValueError, match="ddp_steps_after_sync: 5 must be <= steps_between_syncs = 4"):
        par.ABConfig(steps_between_syncs=4, ddp_steps_after_sync=5)
    with pytest.raises(ValueError, match="mesh: 1 groups is an odd number"):
        train_and_evaluate(RunConfig.from_flags(parallel="ab", mesh="1x8", quiet=True), "/tmp/never-created-ab")
    with pytest.raises(ValueError, match="cutoff"):
        train_and_evaluate(RunConfig.from_flags(parallel="ab", ab_cutoff=1.0, quiet=True), "/tmp/never-created-ab")


def test_schedule_and_learning_rate_rebound():
    config = par.ABConfig(warmup_steps=2, steps_between_syncs=4, ddp_steps_after_sync=1, lr_rebound_steps=2)
    got = [par.ab_schedule(t, config) for t in range(11)]
    assert got[:2] == [((), "ddp")] * 2
    assert got[2:7] == [((), "ddp"), (("factorize",), "group"), ((), "group"), ((), "group"), (("sync",), "ddp")]
    assert got[7] == (("factorize",), "group")
    factors = [par.lr_factor(t, config, 1e-3) for t in range(9)]
    np.testing.assert_allclose(factors, [1, 1, 1, 0.01, 0.505, 1, 0.01, 0.01, 0.505])


# digits, 11 steps per epoch, on the 2 x 4 mesh
AB_RUN = {"epochs": 2, "batch_size": 128, "quiet": True, "parallel": "ab", "mesh": "2x4", "ab_cutoff": 0.3}
AB_RUN |= {"ab_ddp_steps_after_sync": 1}


def test_resume_in_the_group_phase_at_cut_ranks_equals_the_uninterrupted_run(tmp_path):
    config = RunConfig.from_flags(
        **AB_RUN, hidden=(32,), lr=3e-3, ab_warmup_steps=4, ab_steps_between_syncs=6, checkpoint_every=16,
        keep_checkpoints=10,
    )  # fmt: skip
    full = train_and_evaluate(config, tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoints" / "16"
    with open(checkpoint / "record" / "metadata") as f:
        record = json.load(f)
    assert record["ab_sizes"] != {"0/linear": 32}  # factors stored below full rank (64x32 -> 32)
    # the checkpoint holds diverged groups (step index 15 was a group step); the resumed run starts with a sync
    schedule = par.ABConfig(warmup_steps=4, steps_between_syncs=6, ddp_steps_after_sync=1)
    assert par.ab_schedule(15, schedule) == ((), "group") and par.ab_schedule(16, schedule) == (("sync",), "ddp")
    os.makedirs(tmp_path / "resumed" / "checkpoints")
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / "16")
    resumed = train_and_evaluate(config, tmp_path / "resumed", resume=True)
    chex.assert_trees_all_equal(jax.tree.map(host, resumed["state"]), jax.tree.map(host, full["state"]))
    assert resumed["test_accuracy"] == full["test_accuracy"]


def test_metrics_carry_the_bytes_sent_per_step(tmp_path):
    """Epoch 1 is warm-up (DDP's bytes); epoch 2 is one data-parallel step, a re-SVD (no device traffic) and ten
    group steps at the cut rank. Oracle: parameter counts of the 64-128-10 MLP (its 64 x 128 kernel is factorised;
    the 128 x 10 one is too skinny and is shared like the biases)."""
    config = RunConfig.from_flags(
        **AB_RUN, hidden=(128,), ab_warmup_steps=11, ab_steps_between_syncs=11, ab_bucket_ratio=1.0
    )
    out = train_and_evaluate(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rank = int(host(out["state"].ranks["0/linear"]))  # set by the one re-SVD of epoch 2
    assert rank < 64
    shared = 128 * 10 + 128 + 10
    ddp = 4 * (64 * 128 + shared)
    group = 4 * (max(64 * rank, rank * 128) + shared) + 4  # the packed buffer (B is larger) and the group's loss
    assert lines[0]["ab_counts"] == {"ddp": 11}
    assert lines[0]["comm_bytes_per_step"] == ddp + 4 and lines[0]["comm_cross_node_bytes_per_step"] == ddp
    assert lines[1]["ab_counts"] == {"ddp": 1, "factorize": 1, "group": 10}
    assert lines[1]["comm_bytes_per_step"] == pytest.approx((ddp + 4 + 10 * group) / 11, rel=1e-12)
    assert lines[1]["comm_cross_node_bytes_per_step"] == pytest.approx(ddp / 11, rel=1e-12)
    assert lines[2]["final"]  # the whole run: both epochs
    assert lines[2]["comm_bytes_per_step"] == pytest.approx((12 * (ddp + 4) + 10 * group) / 22, rel=1e-12)
    assert lines[2]["comm_cross_node_bytes_per_step"] == pytest.approx(12 * ddp / 22, rel=1e-12)


def test_cli_flags_reach_the_config():
    from jaxalgo.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        "train --parallel ab --mesh 2x4 --ab-warmup-steps 7 --ab-steps-between-syncs 9 --ab-ddp-steps-after-sync 2 "
        "--ab-sync-mode only-learned --ab-cutoff 0.25 --ab-lr-rebound-steps 3 --ab-bucket-ratio 1.5".split()
    )
    config = config_from_args(args).flags()
    assert (config["parallel"], config["mesh"], config["ab_sync_mode"]) == ("ab", "2x4", "only-learned")
    assert (config["ab_warmup_steps"], config["ab_steps_between_syncs"], config["ab_ddp_steps_after_sync"]) == (7, 9, 2)
    assert (config["ab_cutoff"], config["ab_lr_rebound_steps"], config["ab_bucket_ratio"]) == (0.25, 3, 1.5)


# Both sides of the multi-process test run this: warm-up, re-SVD with the agreed cut, group steps, syncs.
PROGRAM = """
import jax, jax.numpy as jnp, numpy as np, optax
from jaxalgo import losses, models
from jaxalgo import parallel as par
from jaxalgo.grads import backprop

def run(mesh):
    del mesh  # AB-training needs the ("group", "dp") axes: one group of 4 devices per process
    mesh = par.ab_mesh(4)
    fn, params = models.split_chain(models.mlp((12,), 5, hidden=(10,), key=jax.random.key(0)))
    loss_fn = lambda p, b: losses.softmax_cross_entropy(fn.apply(p, b["x"]), b["y"])
    config = par.ABConfig(warmup_steps=1, steps_between_syncs=3, ddp_steps_after_sync=1, cutoff=0.3,
                          lr_rebound_steps=2, bucket_ratio=1.0)
    ab = par.ab_training(backprop(loss_fn), optax.adam(1e-2), mesh, fn, params, config, lr=1e-2)
    run_key = par.replicate(jax.random.key(1), mesh)
    state = ab.init(params)
    rng = np.random.RandomState(0)
    for step in range(9):
        batch = {"x": rng.randn(32, 12).astype(np.float32), "y": rng.randint(0, 5, 32).astype(np.int32)}
        events, phase = par.ab_schedule(step, config)
        for event in events:
            state = ab.sync(state) if event == "sync" else ab.factorize(state)
        state, _ = ab.steps[phase](state, par.shard(batch, mesh), run_key, par.lr_factor(step, config, 1e-2))
    comm = par.ab_comm(ab, state, par.shard(batch, mesh), run_key)
    out = {f"rank_{k}": np.asarray(v.addressable_data(0)) for k, v in state.ranks.items()}
    out["group_cross_node_bytes"] = np.array(comm["cross_node_bytes"]["group"])
    out["sync_cross_node_bytes"] = np.array(comm["cross_node_bytes"]["sync"])
    merged = ab.consensus(state, True)
    for i, leaf in enumerate(jax.tree.leaves(merged)):
        out[f"merged_{i}"] = np.asarray(leaf)
    return out
"""


@pytest.mark.multiprocess
def test_two_processes_one_group_each_agree_with_one_process_on_8_devices(tmp_path):
    """jax.distributed over gloo, a group per process: the cut agreed over processes, the group phase sends nothing
    across processes, and the merged model equals the single-process run's."""
    outputs = run_two_processes(tmp_path, PROGRAM)
    namespace: dict = {}
    with jax.enable_x64(False):  # the workers run in float32
        exec(PROGRAM, namespace)
        expected = namespace["run"](None)
    assert int(expected["group_cross_node_bytes"]) == 0 and int(expected["sync_cross_node_bytes"]) > 0
    assert any(int(v) < 10 for k, v in expected.items() if k.startswith("rank_"))  # the cut took effect
    for i, got in enumerate(outputs):
        assert sorted(got) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=f"process {i}: {name}")


@pytest.mark.multiprocess
def test_cli_in_two_processes_resumes_exactly(tmp_path):
    """``jaxalgo train --parallel ab`` as two processes (one group each): a run stopped after 1 epoch and resumed to
    2 ends where an uninterrupted 2-epoch run does (checkpoints written and read by both processes); only process
    0 writes metrics, with the bytes per step."""
    args = ["--parallel", "ab", "--mesh", "2x4", "--hidden", "64", "--ab-warmup-steps", "10"]
    args += ["--ab-steps-between-syncs", "8", "--ab-cutoff", "0.3"]
    run_cli_in_two_processes(tmp_path / "full", *args, "--epochs", "2")
    run_cli_in_two_processes(tmp_path / "resumed", *args, "--epochs", "1")
    run_cli_in_two_processes(tmp_path / "resumed", *args, "--epochs", "2", "--resume")
    full, resumed = (
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("full", "resumed")
    )
    assert [line["epoch"] for line in full] == [1, 2, 2]  # one writer
    assert resumed[-1]["final"] and resumed[-1]["steps"] == full[-1]["steps"] == 44
    for key in ("test_loss", "test_accuracy"):
        assert resumed[-1][key] == full[-1][key]
    assert resumed[-2]["ab_ranks"] == full[-2]["ab_ranks"] and min(full[-2]["ab_ranks"].values()) < 64
    assert 0 < full[-1]["comm_cross_node_bytes_per_step"] < full[-1]["comm_bytes_per_step"]
