"""F3, DFA, DRTP, FA and last-layer-only against independent oracles.

Oracles: hand-written DFA / FA updates for a tanh MLP (explicit deltas and outer products, no autodiff), DRTP as
the first epoch of F3, the buffer against a separate forward pass, the two execution modes against each other,
and compiled memory of the two modes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalgo
from jaxalgo import data, losses
from jaxalgo.checkpoint import Checkpointer
from jaxalgo.config import RunConfig
from jaxalgo.grads import DelayedFeedbackState, FeedbackState, dfa, drtp, f3, fa, feedback_matrices, last_layer_only
from jaxalgo.train import CHECKPOINT_DIR, make_train_step, train_and_evaluate

N, D, C = 24, 6, 4
KEY = jax.random.key(7)


def _problem(dtype=jnp.float64, hidden=(5, 3), n=N):
    """A tiny tanh MLP and a classification set, in ``dtype``."""
    chain = jaxalgo.models.mlp((D,), C, hidden=hidden, activation="tanh", key=jax.random.key(0))
    fn, params = jaxalgo.models.split_chain(chain)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, D)).astype(dtype)
    y = rng.integers(0, C, size=n).astype(np.int32)
    return fn, params, x, y


def _batch(x, y, idx):
    """A batch of numpy arrays (no device gathers to compile)."""
    idx = np.asarray(idx, np.int32)
    return {"x": x[idx], "y": y[idx], "idx": idx}


def _vg(est):
    """``est.value_and_grad`` jitted (one compilation instead of many eager op compilations)."""
    return jax.jit(lambda params, state, batch: est.value_and_grad(params, state, batch, key=KEY))


def _tanh_mlp_forward(params, x):
    """Pre-activations and activations of a tanh MLP with a linear head, written out."""
    hs, pre = [x], []
    for index, p in enumerate(params):
        a = hs[-1] @ p["linear"]["kernel"] + p["linear"]["bias"]
        pre.append(a)
        hs.append(a if index == len(params) - 1 else jnp.tanh(a))
    return hs, pre


def _hand_dfa(params, feedback, x, t, e):
    """Hand-written DFA/DRTP/F3 update of a tanh MLP with sigmoid + BCE (summed hidden, mean head)."""
    hs, pre = _tanh_mlp_forward(params, x)
    grads = []
    for index in range(len(params) - 1):
        delta = (e @ feedback[index]) * (1.0 - jnp.tanh(pre[index]) ** 2)
        grads.append({"linear": {"kernel": hs[index].T @ delta, "bias": delta.sum(0)}})
    delta_out = (jax.nn.sigmoid(hs[-1]) - t) / x.shape[0]
    grads.append({"linear": {"kernel": hs[-2].T @ delta_out, "bias": delta_out.sum(0)}})
    return tuple(grads)


def _assert_trees_close(a, b, rtol=1e-12, atol=1e-13):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def _assert_trees_equal(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


@pytest.mark.parametrize("mode", ["surrogate", "per_block"])
def test_dfa_and_drtp_match_hand_written_updates(mode):
    with jax.enable_x64(True):
        fn, params, x, y = _problem()
        t = jax.nn.one_hot(y, C, dtype=jnp.float64)
        batch = _batch(x, y, np.arange(8))
        for build, error in ((dfa, "current"), (drtp, "target")):
            est = build(fn, losses.sigmoid_bce, input_shape=(D,), mode=mode, key=KEY)
            state = est.init(params)
            loss, grads, _ = _vg(est)(params, state, batch)
            z = fn.apply(params, batch["x"])
            e = t[:8] - jax.nn.sigmoid(z) if error == "current" else t[:8]
            _assert_trees_close(grads, _hand_dfa(params, state.feedback, batch["x"], t[:8], e))
            np.testing.assert_allclose(loss, losses.sigmoid_bce(z, batch["y"]), rtol=1e-14)


def test_f3_with_the_current_error_in_its_buffer_equals_dfa():
    with jax.enable_x64(True):
        fn, params, x, y = _problem()
        est_f3 = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, key=KEY)
        est_dfa = dfa(fn, losses.sigmoid_bce, input_shape=(D,), key=KEY)
        state = est_f3.init(params)
        current = jax.nn.one_hot(y, C, dtype=jnp.float64) - jax.nn.sigmoid(fn.apply(params, x))
        state = state._replace(errors=current)
        batch = _batch(x, y, [3, 1, 4, 15, 9, 2])
        _, g_f3, _ = _vg(est_f3)(params, state, batch)
        _, g_dfa, _ = _vg(est_dfa)(params, est_dfa.init(params), batch)
        _assert_trees_close(g_f3, g_dfa)
        # the variant "current_error" of f3 is DFA itself
        est_cur = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=None, variant="current_error", key=KEY)
        _, g_cur, _ = _vg(est_cur)(params, est_cur.init(params), batch)
        _assert_trees_equal(g_cur, g_dfa)


def _train_epoch(est, params, x, y, batch_size, seed, epoch=0, state=None):
    """One epoch of Adam on permuted batches; returns params, estimator state and the batches' index arrays."""
    tx = optax.adam(1e-2)
    state = est.init(params) if state is None else state
    opt_state = tx.init(params)

    @jax.jit
    def step(params, state, opt_state, batch):
        _, grads, state = est.value_and_grad(params, state, batch, key=KEY)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    perm = data.epoch_permutation(len(y), seed=seed, epoch=epoch)
    batches = [perm[i : i + batch_size] for i in range(0, len(y) - batch_size + 1, batch_size)]
    history = []
    for idx in batches:
        history.append(params)
        params, state, opt_state = step(params, state, opt_state, _batch(x, y, idx))
    return params, state, batches, history


def test_first_epoch_of_f3_is_drtp_exactly():
    fn, params, x, y = _problem(jnp.float32)
    est_drtp = drtp(fn, losses.sigmoid_bce, input_shape=(D,), key=KEY)
    p_drtp, _, _, _ = _train_epoch(est_drtp, params, x, y, 5, seed=1)
    est_f3 = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, variant="delayed_error", key=KEY)
    p_f3, state, _, _ = _train_epoch(est_f3, params, x, y, 5, seed=1)
    _assert_trees_equal(p_f3, p_drtp)
    assert not np.array_equal(state.errors, jax.nn.one_hot(y, C))  # the buffer moved on; epoch 2 will differ


@pytest.mark.parametrize(
    ("loss", "activation", "regression"),
    [(losses.sigmoid_bce, jax.nn.sigmoid, False), (losses.mse, lambda z: z, True)],
)
def test_buffer_holds_the_error_of_each_samples_last_visit(loss, activation, regression):
    with jax.enable_x64(True):
        fn, params, x, y = _problem()
        targets = jax.nn.one_hot(y, C, dtype=jnp.float64)
        if regression:
            y = targets = jnp.asarray(np.random.default_rng(1).normal(size=(N, C)))
        est = f3(fn, loss, input_shape=(D,), train_targets=y, key=KEY)
        buffer0 = est.init(params).errors
        np.testing.assert_array_equal(buffer0, targets)  # initialised to the targets
        _, state, batches, history = _train_epoch(est, params, x, y, 5, seed=2)
        expected = np.array(targets)
        for idx, p in zip(batches, history, strict=True):  # an independent forward pass at each step's params
            expected[idx] = targets[idx] - activation(fn.apply(p, x[idx]))
        np.testing.assert_allclose(state.errors, expected, rtol=1e-12, atol=1e-13)
        visited = np.concatenate(batches)
        assert len(visited) == 20 and len(set(visited.tolist())) == 20  # 4 samples dropped, still the targets
        skipped = np.setdiff1d(np.arange(N), visited)
        np.testing.assert_array_equal(state.errors[skipped], targets[skipped])


def test_both_modes_agree_on_mlp_and_vit_in_float64():
    with jax.enable_x64(True):
        fn, params, x, y = _problem()
        cases = [(fn, params, x, y, (D,))]
        vit = jaxalgo.models.vit((4, 4, 1), C, patch_size=2, dim=8, depth=1, heads=2, mlp_dim=8, key=jax.random.key(1))
        vfn, vparams = jaxalgo.models.split_chain(vit)
        vparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), vparams)
        cases.append((vfn, vparams, _images(), y, (4, 4, 1)))
        for chain, p, xs, ys, shape in cases:
            state_errors = jnp.asarray(np.random.default_rng(3).normal(size=(N, C)))
            batch = _batch(xs, ys, [0, 5, 7, 11, 20])
            # the modes differ in where e comes from: before the forward (buffer, target) or after it (DFA, whose
            # two modes are checked against the hand-written oracle above)
            for variant in ("delayed_error_one_hot",) if shape == (D,) else ("delayed_error",):
                results = []
                for mode in ("surrogate", "per_block"):
                    est = f3(
                        chain,
                        losses.softmax_cross_entropy,
                        input_shape=shape,
                        train_targets=ys,
                        variant=variant,
                        mode=mode,
                        hidden_reduction="mean",
                        key=KEY,
                    )
                    state = est.init(p)
                    if isinstance(state, DelayedFeedbackState):
                        state = state._replace(errors=state_errors)
                    results.append(_vg(est)(p, state, batch))
                _assert_trees_close(results[0], results[1], rtol=1e-11, atol=1e-13)
            assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(results[0][1][1]))


def _images():
    return np.random.default_rng(4).normal(size=(N, 4, 4, 1))


def test_error_variants():
    with jax.enable_x64(True):
        fn, params, x, y = _problem()
        t = jax.nn.one_hot(y, C, dtype=jnp.float64)
        z = fn.apply(params, x)
        batch = _batch(x, y, np.arange(N))
        stored = jnp.asarray(np.random.default_rng(5).normal(size=(N, C)))

        def run(variant, loss=losses.sigmoid_bce):
            est = f3(fn, loss, input_shape=(D,), train_targets=y, variant=variant, key=KEY)
            state = est.init(params)._replace(errors=stored)
            return _vg(est)(params, state, batch)[2].errors

        np.testing.assert_allclose(run("delayed_error"), t - jax.nn.sigmoid(z), rtol=1e-13)
        # for logit-space losses the loss gradient is the error (canonical links)
        np.testing.assert_allclose(run("delayed_loss"), t - jax.nn.sigmoid(z), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(run("delayed_error", losses.softmax_cross_entropy), t - jax.nn.softmax(z), 1e-13)
        np.testing.assert_allclose(run("delayed_error_softmax"), t - jax.nn.softmax(z), rtol=1e-13)
        np.testing.assert_allclose(run("delayed_loss_softmax"), t - jax.nn.softmax(z), rtol=1e-12, atol=1e-14)

        # the one-hot form feeds back t * stored: only the true class's stored error reaches the hidden blocks
        def grads(variant, errors):
            est = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, variant=variant, key=KEY)
            return _vg(est)(params, est.init(params)._replace(errors=errors), batch)[1]

        _assert_trees_close(grads("delayed_error_one_hot", stored), grads("delayed_error", t * stored))


def test_last_layer_only_trains_only_the_head():
    with jax.enable_x64(True):
        fn, params, x, y = _problem()
        est = last_layer_only(fn, losses.sigmoid_bce, input_shape=(D,), key=KEY)
        batch = _batch(x, y, np.arange(8))
        _, grads, _ = _vg(est)(params, est.init(params), batch)
        assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[:-1]))
        exact = jax.grad(lambda p: losses.sigmoid_bce(fn.apply(p, batch["x"]), batch["y"]))(params)
        _assert_trees_close(grads[-1], exact[-1])


def test_fa_matches_hand_written_feedback_alignment():
    with jax.enable_x64(True):
        fn, params, x, y = _problem(hidden=(5, 4, 3))
        est = fa(fn, losses.softmax_cross_entropy, key=KEY)
        state = est.init(params)
        assert [b.shape for b in state.feedback] == [(4, 5), (3, 4), (C, 3)]
        loss, grads, _ = _vg(est)(params, state, {"x": x, "y": y})
        hs, pre = _tanh_mlp_forward(params, x)
        delta = (jax.nn.softmax(hs[-1]) - jax.nn.one_hot(y, C)) / N
        expected = [None] * len(params)
        for index in reversed(range(len(params))):
            expected[index] = {"linear": {"kernel": hs[index].T @ delta, "bias": delta.sum(0)}}
            if index > 0:
                delta = (delta @ state.feedback[index - 1]) * (1.0 - jnp.tanh(pre[index - 1]) ** 2)
        _assert_trees_close(grads, tuple(expected))
        np.testing.assert_allclose(loss, losses.softmax_cross_entropy(hs[-1], y), rtol=1e-14)


def test_feedback_inits():
    key = jax.random.key(3)
    shapes = [(4, 300), (4, 7)]
    kaiming = feedback_matrices(key, shapes, "kaiming_uniform")
    assert float(jnp.abs(kaiming[0]).max()) <= 1 / np.sqrt(300) and float(jnp.abs(kaiming[0]).max()) > 0.9 / np.sqrt(
        300
    )
    _assert_trees_equal(kaiming, feedback_matrices(key, shapes, "kaiming_uniform"))  # reproducible from the key
    assert not np.array_equal(kaiming[0], feedback_matrices(jax.random.key(4), shapes, "kaiming_uniform")[0])
    assert set(np.unique(feedback_matrices(key, shapes, "trinomial")[0]).tolist()) == {-1.0, 0.0, 1.0}
    assert set(np.unique(feedback_matrices(key, shapes, "binomial")[0]).tolist()) == {0.0, 1.0}
    pm = feedback_matrices(key, shapes, "identity")[1]
    np.testing.assert_array_equal(pm, np.concatenate([np.eye(4), -np.eye(4)], axis=1)[:, :7])


def test_feedback_matrices_are_bit_identical_after_training():
    """Through the real training step (optimizer with weight decay): B lives in the estimator state only."""
    fn, params, x, y = _problem(jnp.float32)
    est = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, feedback_init="trinomial", key=KEY)
    tx = optax.adamw(1e-2, weight_decay=0.5)
    step = make_train_step(est, tx)
    from jaxalgo.train import TrainState

    state = TrainState(jnp.zeros((), jnp.int32), params, est.init(params), tx.init(params))
    before = jax.tree.map(np.array, state.estimator_state.feedback)
    for idx in np.arange(N).reshape(4, 6):
        state, _ = step(state, _batch(x, y, idx), KEY)
    _assert_trees_equal(state.estimator_state.feedback, before)
    assert not np.array_equal(state.estimator_state.errors, jax.nn.one_hot(y, C))


def test_per_block_mode_needs_less_temp_memory_than_the_surrogate():
    """Deep MLP, activations much larger than weights: per-block holds about one block's activations."""
    batch_size, width, depth = 2048, 128, 8
    chain = jaxalgo.models.mlp((16,), 10, hidden=(width,) * depth, activation="tanh", key=jax.random.key(0))
    fn, params = jaxalgo.models.split_chain(chain)
    batch = {
        "x": jax.ShapeDtypeStruct((batch_size, 16), jnp.float32),
        "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        "idx": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }

    def temp_bytes(est):
        state = jax.eval_shape(est.init, params)
        step = lambda p, s, b: est.value_and_grad(p, s, b, key=KEY)[1:]
        return jax.jit(step).lower(params, state, batch).compile().memory_analysis().temp_size_in_bytes

    labels = np.zeros(4 * batch_size, np.int32)
    temp = {
        mode: temp_bytes(f3(fn, losses.sigmoid_bce, input_shape=(16,), train_targets=labels, mode=mode, key=KEY))
        for mode in ("surrogate", "per_block")
    }
    activation = batch_size * width * 4  # bytes of one hidden block's output
    assert temp["per_block"] <= 4 * activation < temp["surrogate"] - depth // 2 * activation, temp


def test_checkpoint_resume_keeps_the_buffer(tmp_path):
    config = RunConfig.from_flags(
        estimator="f3",
        hidden=(16,),
        activation="tanh",
        loss="sigmoid_bce",
        batch_size=512,
        epochs=2,
        quiet=True,
    )
    full = train_and_evaluate(config, tmp_path / "full")
    half = dataclasses.replace(config, epochs=1)
    train_and_evaluate(half, tmp_path / "resumed")
    resumed = train_and_evaluate(config, tmp_path / "resumed", resume=True)
    assert resumed["test_loss"] == full["test_loss"]

    def final_state(workdir):
        checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
        try:
            step = checkpointer.latest_step()
            record = checkpointer.read_record(step)
            from jaxalgo.train import setup

            fresh = setup(RunConfig.from_dict(record["config"])).init_state()
            return checkpointer.restore(step, fresh)
        finally:
            checkpointer.close()

    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert isinstance(a.estimator_state, DelayedFeedbackState)
    _assert_trees_equal(a.estimator_state, b.estimator_state)
    initial = jax.nn.one_hot(data.load_dataset("digits", seed=0).y_train, 10)
    assert not np.array_equal(a.estimator_state.errors, initial)  # the buffer was written and restored
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] and lines[-1]["steps"] == full["steps"]


def test_cli_flags_reach_the_estimator(tmp_path):
    from jaxalgo.cli import main

    flags = [
        "--f3-variant",
        "delayed_loss",
        "--feedback-init",
        "binomial",
        "--feedback-mode",
        "surrogate",
        "--feedback-reduction",
        "mean",
    ]
    argv = [
        "train",
        "--estimator",
        "f3",
        "--hidden",
        "8",
        "--activation",
        "tanh",
        "--epochs",
        "1",
        "--batch-size",
        "512",
        "--quiet",
        "--workdir",
        str(tmp_path),
        *flags,
    ]
    assert main(argv) == 0
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and 0.0 <= final["test_accuracy"] <= 1.0
    checkpointer = Checkpointer(os.path.join(tmp_path, CHECKPOINT_DIR))
    try:
        config = checkpointer.read_record(checkpointer.latest_step())["config"]
    finally:
        checkpointer.close()
    assert (config["f3_variant"], config["feedback_init"], config["feedback_mode"], config["feedback_reduction"]) == (
        "delayed_loss",
        "binomial",
        "surrogate",
        "mean",
    )
    for name, state_type in (
        ("dfa", FeedbackState),
        ("drtp", FeedbackState),
        ("fa", FeedbackState),
        ("llo", FeedbackState),
        ("f3", DelayedFeedbackState),
    ):
        experiment = jaxalgo.train.setup(RunConfig.from_flags(estimator=name, hidden=(8,), feedback_init="binomial"))
        state = experiment.estimator.init(experiment.init_params)
        assert isinstance(state, state_type)
        assert set(np.unique(state.feedback[0]).tolist()) == {0.0, 1.0}


def test_bad_input():
    fn, params, x, y = _problem(jnp.float32)
    est = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, key=KEY)
    state = est.init(params)
    with pytest.raises(ValueError, match=r"batch: .*idx"):
        est.value_and_grad(params, state, {"x": x[:4], "y": y[:4]}, key=KEY)
    other = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=np.zeros(N + 5, np.int32), key=KEY)
    with pytest.raises(ValueError, match=r"state.errors: .*24 rows .* 29 examples"):
        other.value_and_grad(params, state, _batch(x, y, [0, 1]), key=KEY)
    with pytest.raises(ValueError, match=r"batch\['idx'\]: indices must lie in \[0, 24\)"):
        est.value_and_grad(params, state, {"x": x[:2], "y": y[:2], "idx": jnp.asarray([0, 24])}, key=KEY)
    with pytest.raises(ValueError, match=r"variant: got 'delayed'; allowed: delayed_error"):
        f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, variant="delayed", key=KEY)
    with pytest.raises(ValueError, match=r"feedback_init: unknown initialisation 'gaussian'; allowed: kaiming"):
        dfa(fn, losses.sigmoid_bce, input_shape=(D,), feedback_init="gaussian", key=KEY)
    with pytest.raises(ValueError, match=r"mode: got 'async'"):
        drtp(fn, losses.sigmoid_bce, input_shape=(D,), mode="async", key=KEY)
    with pytest.raises(ValueError, match=r"variant: 'delayed_error_softmax' needs class targets"):
        f3(fn, losses.mse, input_shape=(D,), train_targets=y, variant="delayed_error_softmax", key=KEY)
    with pytest.raises(ValueError, match=r"output_activation: got None with a custom output_loss"):
        dfa(fn, lambda z, t: jnp.mean(z), input_shape=(D,), key=KEY)
    vit_fn, _ = jaxalgo.models.split_chain(
        jaxalgo.models.vit((4, 4, 1), C, patch_size=2, dim=8, depth=1, heads=2, mlp_dim=8, key=jax.random.key(1))
    )
    with pytest.raises(ValueError, match=r"chain: feedback alignment .* block 0 is a PatchEmbedding"):
        fa(vit_fn, losses.softmax_cross_entropy, key=KEY)
    for field, value in (
        ("f3_variant", "x"),
        ("feedback_init", "x"),
        ("feedback_mode", "x"),
        ("feedback_reduction", "x"),
    ):
        with pytest.raises(ValueError, match=rf"{field}: got 'x'; allowed"):
            jaxalgo.train.setup(RunConfig.from_flags(estimator="f3").with_flags(**{field: value}))
    with pytest.raises(ValueError, match=r"parallel: estimator 'f3' runs on one device only"):
        jaxalgo.train.setup(RunConfig.from_flags(estimator="f3", parallel="ddp"))
    assert isinstance(drtp(fn, losses.sigmoid_bce, input_shape=(D,), key=KEY).init(params), FeedbackState)


# -- sample indices out of range under jit ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_block", "surrogate"])
def test_out_of_range_index_under_jit_gives_nan_and_writes_no_row(mode):
    """Under jit a bad index cannot raise; it must not read or write a clamped (or wrapped) row either."""
    fn, params, x, y = _problem(jnp.float32)
    est = f3(fn, losses.sigmoid_bce, input_shape=(D,), train_targets=y, mode=mode, key=KEY)
    state = est.init(params)
    state = state._replace(errors=jnp.asarray(np.random.default_rng(6).normal(size=(N, C)), jnp.float32))
    step = _vg(est)
    loss, grads, new = step(params, state, _batch(x, y, [0, 1]))  # a good batch: finite, rows 0 and 1 written
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    for bad in (N, N + 100, -1):
        batch = {"x": x[[0, 1]], "y": y[[0, 1]], "idx": np.asarray([0, bad], np.int32)}
        loss, grads, new = step(params, state, batch)
        assert np.isnan(loss), bad  # the guaranteed result: NaN, never a plausible number
        for g in jax.tree.leaves(grads[:-1]):  # every hidden block's gradient (the NaN row reaches all of it)
            assert np.isnan(g).all(), bad
        if mode == "per_block":  # the head waits on the NaN hidden gradients
            assert all(np.isnan(g).all() for g in jax.tree.leaves(grads[-1])), bad
        np.testing.assert_array_equal(new.errors[1:], state.errors[1:])  # no clamped / wrapped row written
        assert not np.array_equal(new.errors[0], state.errors[0])  # the good index is still written
        with pytest.raises(ValueError, match=r"batch\['idx'\]: indices must lie in \[0, 24\)"):
            est.value_and_grad(params, state, batch, key=KEY)  # eagerly: an error


# -- options beside the code ------------------------------------------------------------------------------------


def test_options_literals_list_exactly_the_allowed_values():
    import typing

    from jaxalgo.grads._f3 import F3_VARIANTS, FEEDBACK_PRESETS, HIDDEN_REDUCTIONS, MODES, FeedbackOptions
    from jaxalgo.grads._fa import FAOptions
    from jaxalgo.grads._feedback import FEEDBACK_INITS
    from jaxalgo.options import flags_of

    hints = typing.get_type_hints(FeedbackOptions)
    assert typing.get_args(hints["variant"]) == F3_VARIANTS
    assert typing.get_args(hints["init"]) == FEEDBACK_INITS
    assert typing.get_args(hints["mode"]) == MODES
    assert typing.get_args(hints["reduction"]) == HIDDEN_REDUCTIONS
    assert typing.get_args(typing.get_type_hints(FAOptions)["init"]) == FEEDBACK_INITS
    flags = {f.name: f.default for f in flags_of(FeedbackOptions)}
    assert flags == {
        "f3_variant": "delayed_error",
        "feedback_init": "kaiming_uniform",
        "feedback_mode": "per_block",
        "feedback_reduction": "sum",
    }
    assert {f.name for f in flags_of(FAOptions)} == {"feedback_init"}
    assert FeedbackOptions.data_parallel is False and FAOptions.data_parallel is False
    assert set(FEEDBACK_PRESETS) == {"f3", "dfa", "drtp", "llo"}
    for name, fixed in FEEDBACK_PRESETS.items():  # every preset's pinned value is a legal Literal value
        assert FeedbackOptions(**fixed).variant == fixed.get("variant", "delayed_error"), name
    assert [FEEDBACK_PRESETS[n]["variant"] for n in ("dfa", "drtp", "llo")] == [
        "current_error",
        "one_hot_target",
        "zeros",
    ]
    with pytest.raises(ValueError, match=r"variant: got 'delayed'; allowed: .*delayed_error"):
        FeedbackOptions(variant="delayed")
    with pytest.raises(ValueError, match=r"init: got 'gaussian'"):
        FAOptions(init="gaussian")


def _feedback_problem(fn, y, loss="sigmoid_bce", **fields):
    from jaxalgo.grads._estimator import Problem

    output_loss = losses.get_loss(loss)
    fields = {
        "chain": fn,
        "output_loss": output_loss,
        "loss_name": loss,
        "input_shape": (D,),
        "num_outputs": C,
        "train_targets": y,
        "key": KEY,
        **fields,
    }
    return Problem(lambda p, b: output_loss(fn.apply(p, b["x"]), b["y"]), **fields)


def test_feedback_options_build_the_same_estimator_as_the_functions():
    from jaxalgo.grads._f3 import FeedbackOptions
    from jaxalgo.grads._fa import FAOptions

    fn, params, x, y = _problem(jnp.float32)
    batch = _batch(x, y, [3, 1, 4, 15, 9, 2])
    common = dict(input_shape=(D,), output_activation="sigmoid", key=KEY)
    cases = [
        (FeedbackOptions(), f3(fn, losses.sigmoid_bce, train_targets=y, **common)),
        (
            FeedbackOptions("delayed_loss_one_hot", "trinomial", "surrogate", "mean"),
            f3(
                fn,
                losses.sigmoid_bce,
                train_targets=y,
                variant="delayed_loss_one_hot",
                feedback_init="trinomial",
                mode="surrogate",
                hidden_reduction="mean",
                **common,
            ),
        ),
        (FeedbackOptions("current_error", mode="surrogate"), dfa(fn, losses.sigmoid_bce, mode="surrogate", **common)),
        (
            FeedbackOptions("one_hot_target", "binomial"),
            drtp(fn, losses.sigmoid_bce, feedback_init="binomial", **common),
        ),
        (FeedbackOptions("zeros"), last_layer_only(fn, losses.sigmoid_bce, **common)),
        (FAOptions("identity"), fa(fn, losses.sigmoid_bce, feedback_init="identity", key=KEY)),
    ]
    problem = _feedback_problem(fn, y)
    for options, direct in cases:
        built = options.build(problem)
        state = built.init(params)
        _assert_trees_equal(state, direct.init(params))
        _assert_trees_equal(_vg(built)(params, state, batch), _vg(direct)(params, state, batch))
    # the output nonlinearity follows loss_name (cross_entropy: softmax), else the output loss
    for loss_name in ("cross_entropy", None):
        problem = _feedback_problem(fn, y, "cross_entropy")
        problem = dataclasses.replace(problem, loss_name=loss_name)
        direct = dfa(fn, losses.softmax_cross_entropy, input_shape=(D,), output_activation="softmax", key=KEY)
        state = direct.init(params)
        built = FeedbackOptions("current_error").build(problem)
        _assert_trees_equal(_vg(built)(params, state, batch), _vg(direct)(params, state, batch))


def test_feedback_options_say_what_the_problem_lacks():
    from jaxalgo.grads._f3 import FeedbackOptions
    from jaxalgo.grads._fa import FAOptions

    fn, _, _, y = _problem(jnp.float32)
    with pytest.raises(ValueError, match=r"problem: f3 needs train_targets"):
        FeedbackOptions().build(_feedback_problem(fn, y, train_targets=None))
    FeedbackOptions("current_error").build(_feedback_problem(fn, y, train_targets=None))  # DFA has no buffer
    with pytest.raises(ValueError, match=r"problem: dfa needs chain, key"):
        FeedbackOptions("current_error").build(_feedback_problem(fn, y, chain=None, key=None))
    with pytest.raises(ValueError, match=r"problem: llo needs input_shape"):
        FeedbackOptions("zeros").build(_feedback_problem(fn, y, input_shape=None))
    with pytest.raises(ValueError, match=r"problem: fa needs output_loss"):
        FAOptions().build(_feedback_problem(fn, y, output_loss=None))
    with pytest.raises(ValueError, match=r"loss_name: got 'hinge'; allowed: sigmoid_bce"):
        FeedbackOptions().build(_feedback_problem(fn, y, loss_name="hinge"))


@pytest.mark.parametrize("name", ["f3", "dfa", "drtp", "llo", "fa"])
def test_options_reproduce_the_training_runs_estimator(name):
    """The estimator a run builds for ``--estimator name`` gives bit-identical updates to the options' build."""
    from jaxalgo.grads._estimator import Problem
    from jaxalgo.grads._f3 import FEEDBACK_PRESETS, FeedbackOptions
    from jaxalgo.grads._fa import FAOptions

    config = RunConfig.from_flags(estimator=name, hidden=(8,), activation="tanh", feedback_init="trinomial", seed=3)
    experiment = jaxalgo.train.setup(config)
    dataset = experiment.dataset
    problem = Problem(
        experiment.loss_fn,
        chain=experiment.chain,
        output_loss=experiment.output_loss,
        loss_name=losses.default_loss(dataset.task),  # config.loss "auto"
        input_shape=dataset.input_shape,
        train_targets=dataset.y_train,
        key=jax.random.fold_in(jax.random.key(config.seed), 3),  # the run's feedback key: stream 3 of the seed
    )
    options = FAOptions("trinomial") if name == "fa" else FeedbackOptions(init="trinomial", **FEEDBACK_PRESETS[name])
    built, run = options.build(problem), experiment.estimator
    params = experiment.init_params
    state = run.init(params)
    _assert_trees_equal(built.init(params), state)
    batch = next(data.iterate_batches(dataset, 32, seed=0, epoch=0))
    _assert_trees_equal(_vg(built)(params, state, batch), _vg(run)(params, state, batch))
