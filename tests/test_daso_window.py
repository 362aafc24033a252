"""DASO's window program (the send to its merge in one compiled program) and its wire of changes, on 8 simulated CPU
devices (2 nodes x 4).

Oracles: the per-step DASO programs (the window must reproduce their trajectory bit for bit, and their bytes), the
dataflow of the compiled HLO (the cross-node average neither reads from nor feeds the loop of the steps between
the send and the merge), and an exact float64 average of the nodes' parameters (one bf16 global average).
"""

from __future__ import annotations

import inspect
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxalgo import data
from jaxalgo import parallel as par
from jaxalgo import train as train_module
from jaxalgo.config import RunConfig
from jaxalgo.grads import backprop
from jaxalgo.runner import run_keys
from jaxalgo.train import make_runner, setup, train_and_evaluate

IN, HIDDEN, OUT, BATCH = 6, 8, 3, 16

# 1437 digits / 128 = 11 steps per epoch. Epoch 0 warm-up (blocking); epochs 1-2 global_skip 4, S 2 (windows of 3
# at steps 3 and 7 of the epoch); a plateau after epoch 2 (patience 1, every loss counts as no progress) gives
# global_skip 2, S 1 for epoch 3 (windows of 2 at 1, 3, 5, 7; the send at 9 has no merge: the epoch's last batch is
# blocking, so it runs alone); epoch 4 is the cool-down.
SCHEDULE = {
    "hidden": (16,),
    "batch_size": 128,
    "epochs": 5,
    "lr": 3e-3,
    "seed": 1,
    "quiet": True,
    "parallel": "daso",
    "mesh": "2x4",
    "daso_warmup_epochs": 1,
    "daso_cooldown_epochs": 1,
    "daso_global_skip": 4,
    "daso_batches_to_wait": 2,
    "daso_max_global_skip": 4,
    "daso_plateau_patience": 1,
    "daso_plateau_threshold": 0.9,
}
WINDOWS = {1: [(3, 3), (7, 3)], 2: [(3, 3), (7, 3)], 3: [(1, 2), (3, 2), (5, 2), (7, 2)]}  # epoch: (offset, length)


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


def make_batch(seed: int) -> dict:
    kx, ky = jax.random.split(jax.random.key(100 + seed))
    return {"x": jax.random.normal(kx, (BATCH, IN)), "y": jax.random.normal(ky, (BATCH, OUT))}


def host(tree):
    return jax.tree.map(np.asarray, tree)


def drive(config: RunConfig):
    """Trains with the runner protocol driven by hand, as the training loop does: ``window`` says how many steps
    the next call runs, ``run_window`` runs them; returns the state, the losses, the epoch metrics and the calls."""
    experiment = setup(config)
    runner = make_runner(config, experiment)
    state = runner.after_step(0, runner.init(experiment.init_state()))
    spe, seed = experiment.steps_per_epoch, run_keys(config.seed).data_seed
    losses, lines, calls, step = [], [], [], 0
    for epoch in range(config.epochs):
        batches = data.iterate_batches(experiment.dataset, config.batch_size, seed=seed, epoch=epoch)
        offset = 0
        while offset < spe:
            count = runner.window(step, spe - offset)
            if count == 1:
                state, loss = runner.step(state, next(batches), step)
                new = [loss]
            else:
                assert runner.window(step, count - 1) == 1  # a window that does not fit runs step by step
                state, new = runner.run_window(state, [next(batches) for _ in range(count)], step)
                calls.append((epoch, offset, count))
            assert len(new) == count
            losses += [float(x) for x in new]
            step, offset = step + count, offset + count
            state = runner.after_step(step, state)
        state = runner.end_epoch(state, epoch, float(np.mean(losses[-spe:])))
        lines.append(runner.epoch_metrics())
    return runner, state, losses, lines, calls


def assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def per_step():
    """Per-step DASO driven by hand: the reference trajectory, losses and metrics."""
    return drive(RunConfig.from_flags(**SCHEDULE, daso_program="step"))


def test_window_runner_reproduces_per_step_daso_bit_for_bit(per_step):
    """Warm-up, windows of S = 2, a plateau that changes the schedule to S = 1, a send without a merge and the
    cool-down: the window runner ends in the per-step runner's exact state, with the same losses, phase counts and
    bytes per step."""
    runner, state, losses, lines, calls = drive(RunConfig.from_flags(**SCHEDULE))
    _, reference, reference_losses, reference_lines, reference_calls = per_step
    assert reference_calls == []  # program "step" never asks for a window
    assert {e: [(o, n) for f, o, n in calls if f == e] for e in range(5)} == {0: [], **WINDOWS, 4: []}
    assert runner.daso.window.cache_info().currsize == 2  # one program for S = 2, one for S = 1
    schedules = [(line["daso_global_skip"], line["daso_batches_to_wait"]) for line in lines]
    assert schedules[1:4] == [(4, 2), (4, 2), (2, 1)]
    assert lines[3]["daso_phases"] == {"blocking": 1, "local": 1, "merge": 4, "send": 5}
    assert_identical(state, reference)
    assert int(state.step) == 5 * 11
    assert losses == reference_losses
    assert lines == reference_lines  # schedules, phases and the traffic meter's bytes per step
    assert lines[1]["comm_cross_node_bytes_per_step"] < lines[0]["comm_cross_node_bytes_per_step"]


def test_window_through_the_training_loop_equals_per_step_daso(per_step, tmp_path):
    """``train_and_evaluate`` with the default window program: the per-step state and metrics."""
    if "run_window" not in inspect.getsource(train_module):
        pytest.skip("the training loop does not call run_window yet")
    result = train_and_evaluate(RunConfig.from_flags(**SCHEDULE), tmp_path / "run")
    _, reference, _, reference_lines, _ = per_step
    assert_identical(result["state"], reference)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    epochs = [line for line in lines if "epoch" in line and not line.get("final")]
    fields = ("daso_global_skip", "daso_batches_to_wait", "daso_phases", "comm_bytes_per_step")
    assert [{k: line[k] for k in fields} for line in epochs] == [
        {k: line[k] for k in fields} for line in reference_lines
    ]


def test_window_is_asked_only_for_a_send_whose_merge_fits_in_the_epoch():
    config = par.DasoConfig(global_skip=4, batches_to_wait=2, warmup_epochs=1, cooldown_epochs=1)
    window = lambda step, s=2, skip=4: par.daso_window(
        step, steps_per_epoch=10, total_epochs=3, global_skip=skip, batches_to_wait=s, config=config
    )
    # epoch 1: sends at 3 and 7; 7's merge would fall on the last batch (9), which is blocking instead
    assert [window(t) for t in range(10, 20)] == [1, 1, 1, 3, 1, 1, 1, 1, 1, 1]
    assert [window(t) for t in range(10)] == [1] * 10  # warm-up: blocking
    assert [window(t, s=1, skip=2) for t in range(10, 20)] == [1, 2, 1, 2, 1, 2, 1, 2, 1, 1]
    assert [window(t, s=0, skip=1) for t in range(10, 20)] == [1] * 10  # S = 0: blocking
    with pytest.raises(ValueError, match=r"program: unknown program 'async'; allowed: window, step"):
        par.DasoConfig(program="async")


def entry_dataflow(hlo: str) -> tuple[dict[str, str], dict[str, set[str]], str]:
    """The entry computation of a compiled HLO module: ``(op of each instruction, its operands, the root)``."""
    body = hlo[hlo.index("\nENTRY") :]
    body = body[: body.index("\n}")]
    ops, operands, root = {}, {}, None
    lines = body.splitlines()[1:]
    for line in lines:
        match = re.match(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*.+?\s+([a-z][\w\-]*)\(", line)
        if match:
            ops[match.group(2)] = match.group(3)
            root = match.group(2) if match.group(1) else root
    for line in lines:
        match = re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=", line)
        if match:
            used = set(re.findall(r"%([\w.\-]+)", line[match.end() :])) & set(ops)
            operands[match.group(1)] = used - {match.group(1)}
    return ops, operands, root


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("sharded", [False, True])
def test_the_cross_node_average_overlaps_the_steps_between_send_and_merge(sharded):
    """In the compiled window program (S = 2) the all-reduce over the node axis reads only what the send step
    computed, and its result reaches the output only through the merge after the loop of the S steps: it neither
    feeds the loop nor depends on it (so the scheduler is free to overlap them). Its bytes count once, the loop's
    node-local averages S times."""
    mesh = par.make_mesh((2, 4))
    config = par.DasoConfig(global_skip=4, batches_to_wait=2, warmup_epochs=0, cooldown_epochs=0, sharded=sharded)
    d = par.daso(backprop(loss_fn), optax.adam(1e-2), mesh, config)
    state, key = d.init(tiny_params()), par.replicate(jax.random.key(0), mesh)
    batches = [par.shard(make_batch(t), mesh) for t in range(3)]
    lowered = d.window(2).lower(state, batches, key)
    ops, operands, root = entry_dataflow(lowered.compile().as_text())
    users: dict[str, set[str]] = {}
    for name, inputs in operands.items():
        for source in inputs:
            users.setdefault(source, set()).add(name)
    report = par.comm_report(lowered, mesh=mesh)
    cross = [c for c in report.collectives if c.level == "cross-node"]
    assert len(cross) == 1 and cross[0].axes == ("node",) and cross[0].requested_dtypes == ("bf16",)
    average = cross[0].name
    assert average in ops, "the cross-node average must be in the entry computation, outside the loop"
    (loop,) = [name for name, op in ops.items() if op == "while"]
    before, after = closure(average, operands), closure(average, users)
    assert loop not in before, "the average must not read anything the loop computes"
    assert loop not in after, "nothing the loop reads may depend on the average"
    send_average = [n for n in before if ops[n] == "all-reduce"]
    assert send_average, "the average reads the send step's update (after its node-local gradient average)"
    assert root in after and after & closure(loop, users), "the merge combines the average and the loop's result"
    inner = [c for c in report.collectives if c.name not in ops]
    assert inner and all(c.level == "node-local" for c in inner)  # the loop body averages only inside the node
    counted = par.window_comm_report(d.window(2), state, batches, key, mesh=mesh)
    assert counted.requested_cross_node_bytes == report.requested_cross_node_bytes
    loop_bytes = sum(c.requested_bytes for c in inner)
    assert counted.total(requested=True) == report.total(requested=True) + (2 - 1) * loop_bytes


def test_one_bf16_global_average_is_accurate_to_the_change_not_to_the_weights():
    """Nodes 1e-3 apart from the last global average (an Adam step's size): the new wire (the changes in bf16,
    added to the float32 average) lands within 2^-7 of the change of the exact average; the old wire (the weights
    in bf16) misses that bound by two orders of magnitude. The wire stays bf16: 2 bytes per parameter."""
    mesh = par.make_mesh((2, 4))
    config = par.DasoConfig(global_skip=1, batches_to_wait=0, warmup_epochs=0, cooldown_epochs=0)
    d = par.daso(backprop(loss_fn), optax.sgd(0.0), mesh, config)  # lr 0: the blocking step is the average alone
    last = tiny_params()
    leaves, treedef = jax.tree.flatten(last)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    changes = treedef.unflatten([1e-3 * jax.random.normal(k, (2, *x.shape)) for k, x in zip(keys, leaves, strict=True)])
    nodes = jax.tree.map(lambda x, c: x[None] + c, last, changes)
    state = d.init(last)
    state = state._replace(params=par.place(nodes, mesh, P("node")))
    args = (par.shard(make_batch(0), mesh), par.replicate(jax.random.key(0), mesh))
    report = par.comm_report(d.steps["blocking"], state, *args)
    new, _ = d.steps["blocking"](state, *args)

    def old_wire(tree):  # the previous scheme, written here: the weights themselves averaged in bf16
        return par.mean_over(jax.tree.map(lambda x: x[0], tree), "node", dtype=jnp.bfloat16)

    old = jax.jit(jax.shard_map(old_wire, mesh=mesh, in_specs=P("node"), out_specs=P()))(
        par.place(nodes, mesh, P("node"))
    )
    exact = jax.tree.map(lambda x: np.asarray(x, np.float64).mean(0), nodes)
    change = max(float(np.max(np.abs(np.asarray(c, np.float64)))) for c in jax.tree.leaves(changes))
    weight = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(exact))
    bound = 2.0**-7 * change + 2.0**-23 * weight
    error = lambda got: max(
        float(np.max(np.abs(np.asarray(g, np.float64) - e)))
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(exact), strict=True)
    )
    new_error = max(error(jax.tree.map(lambda x, n=n: np.asarray(x)[n], new.params)) for n in range(2))
    assert new_error <= bound, (new_error, bound)
    assert error(old) > 100 * bound, (error(old), bound)
    for got, want in zip(jax.tree.leaves(host(new.daso.inflight)), jax.tree.leaves(host(new.params)), strict=True):
        np.testing.assert_array_equal(got, want[0])  # the float32 average is kept for the next changes
        assert got.dtype == np.float32
    n = sum(x.size for x in jax.tree.leaves(last))
    cross = [c for c in report.collectives if c.level == "cross-node"]
    assert [c.requested_dtypes for c in cross] == [("bf16",)] and report.requested_cross_node_bytes == 2 * n
