"""Pipeline parallelism on simulated CPU devices: F3 / DRTP stages that update as microbatches stream through, and
the GPipe backprop baseline.

Oracles (all independent of the pipeline code):

- F3, DRTP, last-layer-only: the single-device ``per_block`` estimator (:func:`jaxalgo.grads.f3`) in the ordinary
  training step with batch size ``b`` and the same batch order: the same parameters after every microbatch and the
  same error buffer (float64);
- F3 without draining between epochs: the same single-device run whose buffer writes land ``S - 1`` microbatches
  late (the analysis in :mod:`jaxalgo.parallel.pipeline._feedback`);
- GPipe: single-device backprop with gradient accumulation over the ``M`` microbatches (``optax.MultiSteps``);
- the split: every contiguous cut, enumerated;
- memory and bytes: the sizes of the arrays each program keeps and sends, from the compiled programs.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalgo import cli, grads, losses, models
from jaxalgo.checkpoint import newest_record
from jaxalgo.config import RunConfig
from jaxalgo.parallel import comm_report
from jaxalgo.parallel import pipeline as pl
from jaxalgo.runner import TrainState, make_train_step
from jaxalgo.train import train_and_evaluate

N, B, CLASSES, FEATURES = 24, 4, 3, 6


def _data(input_shape=(FEATURES,), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, *input_shape)), rng.integers(0, CLASSES, N).astype(np.int32)


def _problem(fn, y, input_shape=(FEATURES,)):
    return grads.Problem.from_chain(
        fn,
        losses.softmax_cross_entropy,
        loss_name="cross_entropy",
        input_shape=input_shape,
        num_outputs=CLASSES,
        train_targets=y,
        key=jax.random.key(3),
    )


def _mlp64():
    fn, params = models.split_chain(
        models.mlp((FEATURES,), CLASSES, hidden=(8, 7, 5), activation="tanh", key=jax.random.key(0))
    )
    return fn, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


def _orders(epochs):
    return [np.random.default_rng([1, e]).permutation(N) for e in range(epochs)]


def _microbatches(x, y, orders):
    for order in orders:
        for start in range(0, N - B + 1, B):
            rows = order[start : start + B]
            yield {"x": x[rows], "y": y[rows], "idx": rows.astype(np.int32)}


def _stack(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _reference(problem, options, tx, params, microbatches, delay=0):
    """The single-device ``per_block`` run, one step per microbatch: the parameters after every step (index k: after
    k microbatches) and the final error buffer. With ``delay`` the buffer rows a step writes become readable only
    ``delay + 1`` steps later (the no-drain pipeline's timing)."""
    est = options.build(problem)
    step = make_train_step(est, tx)
    state = TrainState.fresh(params, est, tx)
    history, pending = [jax.tree.map(np.asarray, params)], []
    landed = np.array(state.estimator_state.errors) if delay else None
    for m, batch in enumerate(microbatches):
        if delay:
            while pending and pending[0][0] <= m - delay - 1:
                _, idx, rows = pending.pop(0)
                landed[idx] = rows
            state = state._replace(estimator_state=state.estimator_state._replace(errors=jnp.asarray(landed)))
        state, _ = step(state, batch, jax.random.key(0))
        if delay:
            pending.append((m, batch["idx"], np.asarray(state.estimator_state.errors)[batch["idx"]]))
        history.append(jax.tree.map(np.asarray, state.params))
    if delay:
        for _, idx, rows in pending:
            landed[idx] = rows
        return history, landed
    errors = getattr(state.estimator_state, "errors", None)
    return history, None if errors is None else np.asarray(errors)


# -- the split ------------------------------------------------------------------------------------------------


def _score(sizes, cut):
    stages = [sum(sizes[a:b]) for a, b in itertools.pairwise(cut)]
    return max(stages), sum(p * p for p in stages)


def test_balanced_split_is_the_best_contiguous_cut():
    rng = np.random.default_rng(5)
    for _ in range(30):
        sizes = rng.integers(0, 50, rng.integers(1, 8)).tolist()
        for stages in range(1, len(sizes) + 1):
            got = pl.balanced_split(sizes, stages)
            cuts = [(0, *c, len(sizes)) for c in itertools.combinations(range(1, len(sizes)), stages - 1)]
            score = lambda c, sizes=sizes: _score(sizes, c)
            best = min(score(c) for c in cuts)
            flat = (0, *[b for _, b in got])
            assert score(flat) == best, (sizes, stages, got)
    _, params = models.split_chain(models.mlp((FEATURES,), CLASSES, hidden=(8, 7, 5), key=jax.random.key(0)))
    split = pl.split_stages(params, 3)
    assert split.bounds == ((0, 1), (1, 2), (2, 4)) and split.params == (56, 63, 58)
    assert "stage 2: blocks 2-3 (58 params)" in str(split)
    with pytest.raises(ValueError, match=r"num_stages: got 5, but the chain has only 4 blocks; allowed: 1 to 4"):
        pl.split_stages(params, 5)
    with pytest.raises(ValueError, match=r"bounds: got \[\(0, 2\), \(3, 4\)\]; allowed: 2 contiguous"):
        pl.split_stages(params, 2, bounds=[(0, 2), (3, 4)])


# -- F3, DRTP, last-layer-only against the single-device per-block run --------------------------------------


@pytest.fixture(scope="module")
def mlp_f3():
    """F3 on the MLP's 4 blocks over 3 stages (1 | 1 | 2 blocks), one microbatch per call, float64, Adam."""
    with jax.enable_x64(True):
        fn, params = _mlp64()
        x, y = _data()
        problem, options, tx = _problem(fn, y), grads.FeedbackOptions(), optax.adam(1e-2)
        pipe = pl.feedback_pipeline(
            problem, options, tx, pl.stage_mesh(3), params=params, num_microbatches=1, microbatch_size=B
        )
        yield {"pipe": pipe, "params": params, "problem": problem, "options": options, "tx": tx, "x": x, "y": y}


def test_f3_pipeline_equals_the_single_device_run_after_every_microbatch(mlp_f3):
    """Microbatch m meets stage s at tick m + s, after the stage has updated on microbatches 0..m-1; the pipeline
    drains at the end of each epoch. Stage s's blocks after call m equal the reference after the microbatches that
    have passed stage s (all of them after a drain)."""
    pipe, S, spe = mlp_f3["pipe"], 3, N // B
    with jax.enable_x64(True):
        batches = list(_microbatches(mlp_f3["x"], mlp_f3["y"], _orders(2)))
        history, errors = _reference(mlp_f3["problem"], mlp_f3["options"], mlp_f3["tx"], mlp_f3["params"], batches)
        state, worst, idle = pipe.init(mlp_f3["params"]), 0.0, []
        for m, batch in enumerate(batches):
            epoch, position = divmod(m, spe)
            drain = position == spe - 1
            state, out = pipe.run(state, batch, drain=drain)
            idle.append(out.busy)
            got = pipe.block_params(state)
            for block in range(4):
                stage = pipe.split.stage_of(block)
                passed = epoch * spe + (position + 1 if drain else max(0, position - stage + 1))
                worst = max(worst, _max_diff(got[block], history[passed][block]))
            if drain:
                assert pl.idle_ticks(idle) == (S * (S - 1), S * (spe + S - 1))  # fill and drain once per epoch
                idle = []
        assert worst <= 1e-14, worst
        np.testing.assert_allclose(pipe.error_buffer(state), errors, rtol=0, atol=1e-14)
        assert not np.allclose(errors, jax.nn.one_hot(mlp_f3["y"], CLASSES))  # the buffer was written


def test_without_draining_rows_are_read_early_exactly_as_analysed(mlp_f3):
    """Draining only at the end of the run: the pipeline equals the single-device run whose buffer writes land S - 1
    microbatches late, and it differs from the exact run (stale_reads counts the early reads)."""
    pipe, S = mlp_f3["pipe"], 3
    with jax.enable_x64(True):
        orders = _orders(3)
        batches = list(_microbatches(mlp_f3["x"], mlp_f3["y"], orders))
        late, late_errors = _reference(
            mlp_f3["problem"], mlp_f3["options"], mlp_f3["tx"], mlp_f3["params"], batches, delay=S - 1
        )
        exact, _ = _reference(mlp_f3["problem"], mlp_f3["options"], mlp_f3["tx"], mlp_f3["params"], batches)
        state = pipe.init(mlp_f3["params"])
        for m, batch in enumerate(batches):
            state, _ = pipe.run(state, batch, drain=m == len(batches) - 1)
        stale = pl.stale_reads(orders, B, S)
        assert stale > 0
        assert pl.stale_reads(orders, B, 1) == 0
        assert _max_diff(pipe.block_params(state), late[-1]) <= 1e-14
        np.testing.assert_allclose(pipe.error_buffer(state), late_errors, rtol=0, atol=1e-14)
        assert _max_diff(pipe.block_params(state), exact[-1]) > 1e-6


@pytest.mark.parametrize(("variant", "stages", "microbatches"), [("delayed_error", 1, 3), ("one_hot_target", 4, 3)])
def test_one_stage_and_drtp_equal_the_single_device_run_per_step(variant, stages, microbatches):
    """One stage is today's single-device run; DRTP's signal (the target) needs no buffer, so the pipeline is exact
    with or without draining (here it drains only at the end of the run)."""
    with jax.enable_x64(True):
        fn, params = _mlp64()
        x, y = _data(seed=1)
        problem, options, tx = _problem(fn, y), grads.FeedbackOptions(variant=variant), optax.adam(1e-2)
        pipe = pl.feedback_pipeline(
            problem, options, tx, pl.stage_mesh(stages), params=params, num_microbatches=microbatches, microbatch_size=B
        )
        batches = list(_microbatches(x, y, _orders(2)))
        history, errors = _reference(problem, options, tx, params, batches)
        state, calls = pipe.init(params), len(batches) // microbatches
        for k in range(calls):
            drain = k == calls - 1
            state, _ = pipe.run(state, _stack(batches[k * microbatches : (k + 1) * microbatches]), drain=drain)
            done = (k + 1) * microbatches
            for block in range(4):
                passed = done if drain else done - pipe.split.stage_of(block)
                assert _max_diff(pipe.block_params(state)[block], history[passed][block]) <= 1e-14
        if variant == "delayed_error":
            np.testing.assert_allclose(pipe.error_buffer(state), errors, rtol=0, atol=1e-14)


def test_f3_pipeline_on_the_vit_equals_the_single_device_run():
    """The ViT's patch embedding, Transformer blocks and head are different stages (padded to one layout). SGD with
    momentum: the attention key bias has an identically zero true gradient, whose float64 rounding noise differs
    between any two compiled programs and which Adam would normalise to lr * noise / eps. Each call of 3 microbatches
    drains, so every call ends with all its microbatches through all stages."""
    with jax.enable_x64(True):
        module = models.vit((4, 4, 1), CLASSES, dim=8, depth=1, heads=2, mlp_dim=8, patch_size=2, key=jax.random.key(0))
        fn, params = models.split_chain(module)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x, y = _data((4, 4, 1))
        problem, options = _problem(fn, y, (4, 4, 1)), grads.FeedbackOptions()
        tx = optax.sgd(0.02, momentum=0.9)
        pipe = pl.feedback_pipeline(
            problem, options, tx, pl.stage_mesh(3), params=params, num_microbatches=3, microbatch_size=B
        )
        assert pipe.split.bounds == ((0, 1), (1, 2), (2, 3))
        batches = list(_microbatches(x, y, _orders(2)))
        history, errors = _reference(problem, options, tx, params, batches)
        state = pipe.init(params)
        for k in range(len(batches) // 3):  # every call drains (one program to compile; the MLP test streams)
            state, _ = pipe.run(state, _stack(batches[3 * k : 3 * k + 3]), drain=True)
            assert _max_diff(pipe.block_params(state), history[3 * k + 3]) <= 1e-13
        np.testing.assert_allclose(pipe.error_buffer(state), errors, rtol=0, atol=1e-13)


# -- GPipe ----------------------------------------------------------------------------------------------------


def test_gpipe_equals_backprop_with_gradient_accumulation():
    with jax.enable_x64(True):
        fn, params = _mlp64()
        x, y = _data(seed=2)
        problem, tx, S, M = _problem(fn, y), optax.adam(1e-2), 3, 3
        pipe = pl.gpipe(problem, tx, pl.stage_mesh(S), params=params, num_microbatches=M, microbatch_size=B)
        accumulate = optax.MultiSteps(tx, every_k_schedule=M, accumulator_dtype=jnp.float64)
        reference, acc_state, grad = params, accumulate.init(params), jax.jit(jax.grad(problem.loss_fn))
        update = jax.jit(accumulate.update)
        state = pipe.init(params)
        batches = list(_microbatches(x, y, _orders(1)))
        for k in range(len(batches) // M):
            group = batches[k * M : (k + 1) * M]
            expected = [float(problem.loss_fn(reference, batch)) for batch in group]  # at the step's params
            state, out = pipe.run(state, {key: v for key, v in _stack(group).items() if key != "idx"})
            for batch in group:
                updates, acc_state = update(grad(reference, batch), acc_state, reference)
                reference = optax.apply_updates(reference, updates)
            assert _max_diff(pipe.block_params(state), reference) <= 1e-14
            np.testing.assert_allclose(pl.finished_losses(out), expected, rtol=1e-13)
            for mask in (out.busy, out.backward_busy):  # each wave: S (S - 1) idle of S (M + S - 1) stage-ticks
                idle, total = pl.idle_ticks([mask])
                assert idle / total == pl.gpipe_idle_fraction(S, M) == 2 / 5


# -- memory and bytes from the compiled programs --------------------------------------------------------------


def test_compiled_memory_f3_keeps_one_microbatch_gpipe_keeps_all_and_the_bytes_they_send():
    """float32 MLP 32-256-256-10 on 2 stages, microbatches of 128: an activation row block is 128 KiB. F3's
    program holds the same temp memory for any M (one microbatch in flight per stage); GPipe's grows by (at
    least) one stage-input per added microbatch. Per tick (one microbatch per link), F3 sends its activations,
    error signal, labels, indices and a valid flag forward and the new error rows back; GPipe sends activations
    forward and their gradients back."""
    fn, params = models.split_chain(models.mlp((32,), 10, hidden=(256, 256), key=jax.random.key(0)))
    b, width, labels = 128, 256, np.zeros(4096, np.int32)
    problem = grads.Problem.from_chain(
        fn,
        losses.softmax_cross_entropy,
        loss_name="cross_entropy",
        input_shape=(32,),
        num_outputs=10,
        train_targets=labels,
        key=jax.random.key(1),
    )
    mesh, tx = pl.stage_mesh(2), optax.adam(1e-3)
    temps = {"f3": [], "gpipe": []}
    for M in (4, 8):
        batch = {"x": np.zeros((M * b, 32), np.float32), "y": labels[: M * b], "idx": np.arange(M * b, dtype=np.int32)}
        f3 = pl.feedback_pipeline(
            problem, grads.FeedbackOptions(), tx, mesh, params=params, num_microbatches=M, microbatch_size=b
        )
        gp = pl.gpipe(problem, tx, mesh, params=params, num_microbatches=M, microbatch_size=b)
        args = {
            "f3": (f3.program(drain=False), f3.init(params), f3.place_batch(batch)),
            "gpipe": (gp.program(), gp.init(params), gp.place_batch(batch)),
        }
        for name, (program, state, placed) in args.items():
            lowered = program.lower(state, placed)
            temps[name].append(lowered.compile().memory_analysis().temp_size_in_bytes)
            if M == 4:
                report = comm_report(lowered, mesh=mesh)
                sent = report.total(kind="collective-permute")
                act = b * width * 4
                if name == "f3":
                    assert sent == act + b * 10 * 4 + b * 4 + b * 4 + 1 + (b * 10 * 4 + b * 4 + 1)
                else:
                    assert sent == 2 * act
    assert temps["f3"][0] == temps["f3"][1]
    assert temps["gpipe"][1] - temps["gpipe"][0] >= 4 * b * width * 4
    assert temps["gpipe"][1] > temps["f3"][1] + 8 * b * width * 4 * 0.9


# -- refusals -------------------------------------------------------------------------------------------------


def test_refusals_name_the_reason_and_what_to_use(tmp_path):
    devices = jax.devices()[:4]
    options = pl.PipelineOptions(mesh="4", microbatches=4)
    with pytest.raises(ValueError, match=r"parallel: feeds back the current output's error .*update locking.*use f3"):
        options.check(grads.ESTIMATORS["dfa"].make(), batch_size=64, devices=devices)
    for name in ("fa", "frog"):
        with pytest.raises(
            ValueError, match=r"parallel: has no pipeline form: .*backward pass.*backprop for the GPipe"
        ):
            options.check(grads.ESTIMATORS[name].make(), batch_size=64, devices=devices)
    with pytest.raises(ValueError, match=r"microbatches: got 3, which does not divide the batch of 64 examples"):
        pl.PipelineOptions(microbatches=3).check(grads.FeedbackOptions(), batch_size=64, devices=devices)
    with pytest.raises(ValueError, match=r"microbatches: got 2 with 4 stages; allowed: at least 4"):
        pl.PipelineOptions(mesh="4", microbatches=2).check(grads.FeedbackOptions(), batch_size=64, devices=devices)
    with pytest.raises(ValueError, match=r"mesh: the pipeline takes one size"):
        pl.PipelineOptions(mesh="2x2")
    with pytest.raises(ValueError, match=r"mesh: 8 stages need 8 devices, 4 are available"):
        pl.PipelineOptions(mesh="8").check(grads.FeedbackOptions(), batch_size=64, devices=devices)
    for name in ("f3", "drtp", "llo", "backprop"):
        options.check(grads.ESTIMATORS[name].make(), batch_size=64, devices=devices)
    fn, params = models.split_chain(models.mlp((FEATURES,), CLASSES, hidden=(8, 7, 5), key=jax.random.key(0)))
    with pytest.raises(ValueError, match=r"estimator: variant 'current_error' \(dfa\) .*update locking"):
        pl.feedback_pipeline(
            _problem(fn, np.zeros(N, np.int32)),
            grads.FeedbackOptions(variant="current_error"),
            optax.adam(1e-3),
            pl.stage_mesh(2),
            params=params,
            num_microbatches=2,
            microbatch_size=2,
        )
    config = RunConfig.from_flags(parallel="pipeline", mesh="5", estimator="f3", microbatches=8, quiet=True)
    with pytest.raises(ValueError, match=r"mesh: 5 stages for a model of 3 blocks; allowed: 1 to 3"):
        train_and_evaluate(config, tmp_path)


# -- the training loop ----------------------------------------------------------------------------------------


def test_f3_trains_on_the_pipeline_and_resumes_with_microbatches_in_flight(tmp_path):
    """Checkpoint 6 lies one step into epoch 2: two microbatches are still in flight (3 stages, 4 microbatches per
    step); the resumed run ends with the uninterrupted run's state and metrics. Each epoch fills and drains once."""
    flags = {"parallel": "pipeline", "mesh": "3", "microbatches": 4, "estimator": "f3", "hidden": (32, 32)}
    flags |= {"batch_size": 256, "epochs": 2, "checkpoint_every": 6, "keep_checkpoints": 10, "quiet": True}
    config = RunConfig.from_flags(flags)
    full = train_and_evaluate(config, tmp_path / "full")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "6", tmp_path / "resumed" / "checkpoints" / "6")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")
    resumed = train_and_evaluate(config, tmp_path / "resumed", resume=True)
    steps = 2 * (1437 // 256)
    assert int(resumed["state"].step) == int(full["state"].step) == steps
    for a, b in zip(jax.tree.leaves(resumed["state"]), jax.tree.leaves(full["state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    read = lambda name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in read("resumed")] == [1, 2, 2]
    final = read("resumed")[-1]
    assert final == {**read("full")[-1], "seconds": final["seconds"]}
    assert final["pipeline_stages"] == 3 and final["pipeline_split"] == [[0, 1], [1, 2], [2, 3]]
    assert final["pipeline_idle_fraction"] == pytest.approx(2 / (steps / 2 * 4 + 2))  # S - 1 of K M + S - 1 ticks


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--estimator", "dfa"], r"parallel: estimator 'dfa' feeds back the current output's error .*update locking"),
        (["--estimator", "fa"], r"parallel: estimator 'fa' has no pipeline form: .*backward pass.*use f3"),
        (["--estimator", "fg"], r"parallel: estimator 'fg' has no pipeline form"),
        (["--estimator", "f3", "--microbatches", "5"], r"microbatches: got 5, which does not divide the batch of 64"),
        (["--estimator", "drtp", "--mesh", "4", "--microbatches", "2"], r"microbatches: got 2 with 4 stages"),
        (
            ["--estimator", "f3", "--mesh", "5", "--microbatches", "8"],
            r"mesh: 5 stages for a model of 3 blocks; allowed: 1 to 3",
        ),
        (["--estimator", "llo", "--mesh", "2x2"], r"mesh: the pipeline takes one size, its number of stages"),
    ],
)
def test_the_command_line_refuses_in_one_line_with_exit_status_2(argv, message, tmp_path, capsys):
    """``jaxalgo train`` (its entry point in-process: the 8 simulated devices of conftest) before any step."""
    status = cli.main(["train", "--parallel", "pipeline", "--workdir", str(tmp_path), "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "checkpoints").exists()


def test_gpipe_trains_and_resumes_exactly_through_the_command_line(tmp_path):
    """``jaxalgo train --parallel pipeline --estimator backprop`` interrupted at checkpoint 3 (mid-epoch: 5 steps)
    and continued with ``--resume`` (the flags come from the checkpoint): every array of the final checkpoint has the
    uninterrupted run's checksum, and the final metrics line is the same, with the pipeline's figures."""
    argv = ["train", "--parallel", "pipeline", "--mesh", "2", "--microbatches", "4", "--estimator", "backprop"]
    argv += ["--hidden", "16,16", "--batch-size", "256", "--epochs", "1", "--checkpoint-every", "3"]
    argv += ["--keep-checkpoints", "10", "--quiet"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main([*argv, "--workdir", str(full)]) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "3", resumed / "checkpoints" / "3")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    assert cli.main(["train", "--resume", "--workdir", str(resumed), "--quiet"]) == 0
    want, got = newest_record(full / "checkpoints"), newest_record(resumed / "checkpoints")
    assert got["state_sha256"] == want["state_sha256"] and len(want["state_sha256"]) > 3
    read = lambda path: [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    final = read(resumed)[-1]
    assert final == {**read(full)[-1], "seconds": final["seconds"]}
    assert final["steps"] == 1437 // 256 and final["pipeline_split"] == [[0, 1], [1, 3]]
    assert final["pipeline_idle_fraction"] == pl.gpipe_idle_fraction(2, 4) == 1 / 5  # both waves, every step
    # a microbatch's 16-wide activations (64 rows, float32) to stage 1 and their gradients back
    assert final["pipeline_bytes_per_microbatch"] == 2 * 64 * 16 * 4
