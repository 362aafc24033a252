"""OIALR inside the training loop: conversion and cuts on schedule, metrics, exact resume, bounded compilations."""

from __future__ import annotations

import itertools
import json
import os

import chex
import pytest

from jaxalgo.cli import build_parser, config_from_args
from jaxalgo.config import RunConfig
from jaxalgo.train import load_final_params, train_and_evaluate

# 22 steps per epoch on digits (1437 training examples, batch 64).
SMALL = RunConfig.from_flags(
    hidden=(48, 48),
    epochs=4,
    batch_size=64,
    seed=2,
    quiet=True,
    lowrank="oialr",
    lowrank_delay=20,
    lowrank_frequency=10,
    lowrank_cutoff=0.5,
    checkpoint_every=35,
)


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(
        ["train", "--lowrank", "oialr", "--lowrank-delay", "7", "--lowrank-frequency", "3", "--lowrank-cutoff", "0.3"]
    )
    config = config_from_args(args).flags()
    assert (config["lowrank"], config["lowrank_delay"], config["lowrank_frequency"], config["lowrank_cutoff"]) == (
        "oialr",
        7,
        3,
        0.3,
    )


def test_oialr_run_converts_cuts_and_resumes_exactly(tmp_path):
    full = train_and_evaluate(SMALL, tmp_path / "full")
    lines = read_metrics(tmp_path / "full")
    events = [line for line in lines if "event" in line]
    assert next(e["event"] for e in events) == "oialr_convert" and events[0]["step"] == 20
    checks = [e for e in events if e["event"] == "oialr_check"]
    assert [e["step"] for e in checks] == list(range(30, 88 + 1, 10))
    # ranks only decrease; the trainable fraction follows the ranks
    for a, b in itertools.pairwise(checks):
        assert all(b["lowrank_ranks"][k] <= v for k, v in a["lowrank_ranks"].items())
    final = lines[-1]
    assert final["final"] and final["lowrank_converted"]
    ranks = final["lowrank_ranks"]
    assert set(ranks) == {"0/linear", "1/linear", "2/linear"}  # 48x10 head: 10 > 48 / 10, eligible
    dense = 64 * 48 + 48 + 48 * 48 + 48 + 48 * 10 + 10
    trainable = ranks["0/linear"] ** 2 + 48 + ranks["1/linear"] ** 2 + 48 + ranks["2/linear"] ** 2 + 10
    assert final["trainable_fraction"] == pytest.approx(trainable / dense)
    assert final["trainable_fraction"] < 0.6
    # one compilation before conversion, then one per distinct set of shapes
    assert 2 <= final["compilations"] <= 2 + len(checks)
    # the final checkpoint restores into the factorised shapes
    loaded = load_final_params(tmp_path / "full", SMALL)
    chex.assert_trees_all_close(loaded.params, full["state"].params)
    # resume from the checkpoint of step 35 (after conversion and a cut): the same end state
    half = SMALL.with_flags(**{"epochs": 2})
    train_and_evaluate(half, tmp_path / "split")
    resumed = train_and_evaluate(SMALL, tmp_path / "split", resume=True)
    assert int(resumed["state"].step) == int(full["state"].step)
    chex.assert_trees_all_close(resumed["state"].params, full["state"].params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(resumed["state"].opt_state, full["state"].opt_state, rtol=1e-6, atol=1e-7)
    assert read_metrics(tmp_path / "split")[-1]["lowrank_ranks"] == ranks
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])


def test_step_zero_conversion_and_factored_params(tmp_path):
    config = SMALL.with_flags(**{"epochs": 1, "lowrank_delay": 0, "checkpoint_every": 0})
    final = train_and_evaluate(config, tmp_path)
    params = final["state"].params
    assert set(params[0]["linear"]) == {"U", "S", "V", "bias"}
    assert set(params[2]["linear"]) == {"U", "S", "V", "bias"}
    assert params[1]["linear"]["S"].shape == (48, 48)  # converted at full rank, exactly


def test_after_conversion_forward_gradients_draw_tangents_on_the_trainable_leaves_only():
    """FROG with k = the number of trainable numbers returns the exact gradient of the converted model; with
    tangents on the frozen U and V too it would not (tests/test_lowrank.py checks that half in float64)."""
    import jax
    import numpy as np

    from jaxalgo import lowrank
    from jaxalgo.data import iterate_batches
    from jaxalgo.train import make_loss_fn, make_runner, setup

    def converted(tangents):
        config = RunConfig.from_flags(
            hidden=(8,), estimator="frog", tangents=tangents, lowrank="oialr", lowrank_delay=0
        )
        experiment = setup(config)
        trainer = make_runner(config, experiment).trainer
        return experiment, trainer, trainer.after_step(0, experiment.init_state())

    _, _, state = converted(1)
    k = sum(x.size for x in jax.tree.leaves(lowrank.trainable_part(state.params)))
    experiment, trainer, state = converted(k)
    assert trainer.status.converted
    batch = next(iterate_batches(experiment.dataset, 64, seed=0, epoch=0))
    estimator = trainer.estimator
    _, grads, _ = estimator.value_and_grad(state.params, estimator.init(state.params), batch, key=jax.random.key(0))
    exact = jax.grad(make_loss_fn(trainer.chain, experiment.output_loss))(state.params, batch)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(exact))
    chex.assert_trees_all_close(grads, exact, atol=1e-3 * scale)


def test_oialr_on_a_users_own_model_keeps_the_users_loss_after_conversion():
    """No Experiment, no run configuration: a plain chain, a 10x-scaled loss given as ``loss_of_chain``. After the
    conversion the step still computes that loss (the old hook silently rebuilt the configured one, 10x smaller);
    without ``loss_of_chain`` the trainer refuses instead of guessing."""
    import jax
    import numpy as np
    import optax

    from jaxalgo import grads, losses, lowrank, models

    fn, params = models.split_chain(models.mlp((12,), 5, hidden=(16,), key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (32, 12))
    batch = {"x": x, "y": jax.random.randint(jax.random.key(2), (32,), 0, 5), "idx": np.arange(32)}

    def loss_of_chain(chain):
        return lambda p, b: 10.0 * losses.softmax_cross_entropy(chain.apply(p, b["x"]), b["y"])

    problem = grads.Problem(loss_of_chain(fn), fn, loss_of_chain=loss_of_chain)
    trainer = lowrank.OIALRTrainer(
        problem, params, optax.adam(1e-3), lowrank.OIALRConfig(delay=0), build_estimator=grads.BackpropOptions().build
    )
    state = trainer.after_step(0, trainer.init_state(params))
    assert trainer.status.converted and trainer.chain is not fn
    expected = 10.0 * float(losses.softmax_cross_entropy(trainer.chain.apply(state.params, x), batch["y"]))
    _, loss = trainer.train_step(state, batch, jax.random.key(3))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="problem: OIALR needs loss_of_chain"):
        lowrank.OIALRTrainer(
            grads.Problem(loss_of_chain(fn), fn), params, optax.adam(1e-3), lowrank.OIALRConfig(),
            build_estimator=grads.BackpropOptions().build,
        )  # fmt: skip
