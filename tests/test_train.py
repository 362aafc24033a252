"""The training loop: exact resume (in-process and after a SIGKILL), metrics, and errors before training."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalgo
from jaxalgo import train
from jaxalgo.checkpoint import CheckpointMismatchError
from jaxalgo.config import RunConfig
from jaxalgo.options import Entry
from jaxalgo.train import NonFiniteLossError, load_final_params, setup, train_and_evaluate

SMALL = RunConfig.from_flags(hidden=(32,), epochs=2, batch_size=64, checkpoint_every=7, quiet=True, seed=3)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metrics_lines_and_final_record(tmp_path):
    final = train_and_evaluate(SMALL, tmp_path)
    lines = read_metrics(tmp_path)
    assert [line["epoch"] for line in lines] == [1, 2, 2]
    assert lines[-1]["final"] is True
    assert lines[-1]["steps"] == final["steps"] == 2 * (1437 // 64)
    assert 0.0 <= lines[-1]["test_accuracy"] <= 1.0
    assert lines[-1]["seconds"] > 0


def test_resume_after_half_the_epochs_equals_uninterrupted_run(tmp_path):
    full = train_and_evaluate(SMALL, tmp_path / "full")["state"]
    half = RunConfig.from_flags(**{**SMALL.flags(), "epochs": 1})
    train_and_evaluate(half, tmp_path / "split")
    resumed = train_and_evaluate(SMALL, tmp_path / "split", resume=True)["state"]
    assert int(resumed.step) == int(full.step)
    chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(resumed.opt_state, full.opt_state, rtol=1e-6, atol=1e-7)
    # The metrics file holds each epoch once, the change of epochs at the resume, then one final record (the
    # finished 1-epoch run's final line is replaced when the run is extended).
    lines = read_metrics(tmp_path / "split")
    assert [(line.get("epoch"), line.get("event")) for line in lines] == [
        (1, None),
        (None, "resume"),
        (2, None),
        (2, None),
    ]
    assert lines[1] == {"step": 22, "event": "resume", "changed": {"epochs": [1, 2]}}
    assert lines[-1]["final"] and sum(bool(line.get("final")) for line in lines) == 1


KILLED = RunConfig.from_flags(hidden=(512, 512), epochs=6, batch_size=32, checkpoint_every=10, quiet=True, seed=1)


@pytest.fixture(scope="module")
def uninterrupted_512(tmp_path_factory):
    path = tmp_path_factory.mktemp("full")
    state = train_and_evaluate(KILLED, path)["state"]
    return state, [{k: v for k, v in line.items() if k != "seconds"} for line in read_metrics(path)]


def _signal_mid_run(workdir, signum: int) -> subprocess.CompletedProcess:
    """Runs KILLED on the command line and sends ``signum`` once it has checkpointed step 20 or later."""
    command = [sys.executable, "-m", "jaxalgo", "train", "--quiet", "--workdir", str(workdir)]
    command += ["--hidden", "512,512", "--epochs", "6", "--batch-size", "32", "--checkpoint-every", "10"]
    command += ["--seed", "1"]
    env = {**os.environ, "PYTHONPATH": REPO}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 20 for p in checkpoints.iterdir()):
                break
            time.sleep(0.01)
        assert process.poll() is None, f"run ended before it could be signalled: {process.stderr.read()!r}"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


def _assert_resumes_exactly(workdir, uninterrupted_512) -> None:
    full, lines = uninterrupted_512
    resumed = train_and_evaluate(KILLED, workdir, resume=True)["state"]
    assert int(resumed.step) == int(full.step) == 6 * (1437 // 32)
    chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(resumed.opt_state, full.opt_state, rtol=1e-6, atol=1e-7)
    restored = load_final_params(workdir, KILLED)
    chex.assert_trees_all_close(restored.params, full.params, rtol=1e-6, atol=1e-7)
    assert [{k: v for k, v in line.items() if k != "seconds"} for line in read_metrics(workdir)] == lines


def test_resume_after_sigkill_mid_run_equals_uninterrupted_run(tmp_path, uninterrupted_512):
    result = _signal_mid_run(tmp_path, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    killed_at = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 20 <= killed_at < 6 * (1437 // 32)
    _assert_resumes_exactly(tmp_path, uninterrupted_512)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path, signum, uninterrupted_512):
    result = _signal_mid_run(tmp_path, signum)
    assert result.returncode == train.PREEMPTED_EXIT_STATUS, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    match = re.fullmatch(rf"jaxalgo: preempted by {name}: saved a checkpoint at step (\d+) in .*--resume", last)
    assert match, last
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert int(match.group(1)) == saved >= 20  # the step it reached, not the last periodic checkpoint
    _assert_resumes_exactly(tmp_path, uninterrupted_512)


def test_default_config_learns_digits(tmp_path):
    final = train_and_evaluate(RunConfig.from_flags(epochs=8, quiet=True), tmp_path)
    assert final["test_accuracy"] >= 0.95


def test_regression_reports_mae_in_original_units(tmp_path):
    config = RunConfig.from_flags(dataset="diabetes", hidden=(32,), epochs=30, batch_size=32, quiet=True)
    final = train_and_evaluate(config, tmp_path)
    # Predicting the training mean gives an MAE of about 64 on diabetes; a trained net does much better.
    assert 30.0 < final["test_mae"] < 60.0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    # An estimator that returns NaN gradients from its 10th call on, counting calls in its state.
    @dataclasses.dataclass(frozen=True)
    class Poisoned:
        data_parallel: ClassVar[bool] = True

        def build(self, problem):
            return poisoned(problem)

    def poisoned(problem):
        exact = jaxalgo.grads.backprop(problem.loss_fn)

        def value_and_grad(params, count, batch, *, key):
            loss, grads, _ = exact.value_and_grad(params, (), batch, key=key)
            scale = jnp.where(count >= 9, jnp.nan, 1.0)
            return loss, jax.tree.map(lambda g: g * scale, grads), count + 1

        return jaxalgo.grads.Estimator(lambda params: jnp.int32(0), value_and_grad)

    monkeypatch.setitem(jaxalgo.grads.ESTIMATORS, "poisoned", Entry(Poisoned))
    config = RunConfig.from_flags(**{**SMALL.flags(), "estimator": "poisoned", "checkpoint_every": 4, "log_every": 1})
    with pytest.raises(NonFiniteLossError, match=r"at step 11.*last good checkpoint is step 8"):
        train_and_evaluate(config, tmp_path)
    state = load_final_params(tmp_path, config)
    assert int(state.step) == 8
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "transformerxl"}, "model: unknown model 'transformerxl'"),
        ({"dataset": "imagenet"}, "imagenet"),
        ({"estimator": "magic"}, "estimator: unknown estimator 'magic'"),
        ({"optimizer": "lion9"}, "optimizer: unknown optimizer 'lion9'"),
        ({"lr": 0.0}, "lr: must be a number > 0"),
        ({"lr": -1e-3}, "lr: must be a number > 0"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100_000}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"loss": "hinge"}, "loss: unknown loss 'hinge'"),
        ({"dataset": "diabetes", "loss": "cross_entropy"}, "classification loss"),
        ({"dataset": "mnist", "data_dir": "/nonexistent/jaxalgo-test"}, "nonexistent"),
        ({"model": "vit", "vit_dim": 30}, r"vit_dim: got 30, which is not a multiple of heads=4"),
        ({"model": "vit", "vit_depth": 0}, "vit_depth: must be an integer >= 1, got 0"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, changes, message):
    with pytest.raises((ValueError, OSError), match=message):
        train_and_evaluate(SMALL.with_flags(**changes), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="workdir"):
        train_and_evaluate(SMALL, path)


def test_resume_with_different_configuration_is_refused(tmp_path):
    train_and_evaluate(RunConfig.from_flags(**{**SMALL.flags(), "epochs": 1}), tmp_path)
    other = RunConfig.from_flags(**{**SMALL.flags(), "seed": 4})
    with pytest.raises(CheckpointMismatchError, match=r"seed: checkpoint has 3, this run has 4"):
        train_and_evaluate(other, tmp_path, resume=True)


def test_existing_run_without_resume_is_refused(tmp_path):
    train_and_evaluate(RunConfig.from_flags(**{**SMALL.flags(), "epochs": 1}), tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train_and_evaluate(SMALL, tmp_path)


def test_vit_width_and_depth_reach_the_model():
    experiment = setup(RunConfig.from_flags(model="vit", vit_dim=32, vit_depth=3, quiet=True))
    params = experiment.init_params
    assert len(params) == 3 + 2  # patch embedding, 3 Transformer blocks, head
    assert params[1]["attention"]["query"]["kernel"].shape[0] == 32
    assert params[1]["mlp_in"]["kernel"].shape == (32, 64)


def test_summary_shows_the_bytes_sent_by_a_data_parallel_run():
    from jaxalgo.train import format_summary

    final = {"test_accuracy": 0.9, "test_loss": 0.3, "steps": 10, "seconds": 1.0}
    assert "sent per device" not in format_summary(SMALL, final)  # one device: nothing is sent
    final |= {"comm_bytes_per_step": 340012.0, "comm_cross_node_bytes_per_step": 170004.0}
    assert "sent per device  340.0 kB per step (170.0 kB across nodes)" in format_summary(SMALL, final)
