"""DDP and DASO in the training loop and the CLI, on 8 simulated CPU devices (2 nodes x 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from _two_processes import without_device_count

from jaxalgo.config import RunConfig
from jaxalgo.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = {"hidden": (128,), "lr": 3e-3, "epochs": 10, "batch_size": 64, "quiet": True, "seed": 0, "mesh": "2x4"}
# The per-step programs, so that a checkpoint can fall between a send and its merge (the resume test below); the
# default window program takes the same trajectory (tests/test_daso_window.py) but checkpoints only after a merge.
DASO = {"daso_warmup_epochs": 2, "daso_cooldown_epochs": 2, "daso_program": "step"}


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ddp = train_and_evaluate(RunConfig.from_flags(**DIGITS, parallel="ddp"), root / "ddp")
    daso_config = RunConfig.from_flags(**DIGITS, **DASO, parallel="daso", checkpoint_every=12, keep_checkpoints=100)
    daso = train_and_evaluate(daso_config, root / "daso")
    return {"root": root, "ddp": ddp, "daso": daso, "daso_config": daso_config}


def test_daso_on_digits_within_one_point_of_ddp(runs):
    ddp, daso = runs["ddp"]["test_accuracy"], runs["daso"]["test_accuracy"]
    assert ddp >= 0.95
    assert abs(daso - ddp) <= 0.01, (daso, ddp)
    lines = read_metrics(runs["root"] / "daso")
    # warm-up and cool-down epochs are blocking; the ones between run sends, merges and local steps
    for epoch in (0, 1, 8, 9):
        assert lines[epoch]["daso_phases"] == {"blocking": 22}, lines[epoch]
    assert lines[2]["daso_phases"] == {"blocking": 1, "local": 11, "merge": 5, "send": 5}, lines[2]
    assert lines[-1]["final"] and lines[-1]["steps"] == 10 * 22


def test_metrics_carry_the_bytes_sent_per_step(runs):
    """DDP all-reduces every parameter and the loss (4 bytes each) across the nodes; DASO's epochs between warm-up
    and cool-down send less across the nodes than its blocking epochs."""
    n_params = 64 * 128 + 128 + 128 * 10 + 10
    for line in read_metrics(runs["root"] / "ddp"):  # the epochs' lines and the final line (the whole run)
        assert line["comm_bytes_per_step"] == line["comm_cross_node_bytes_per_step"] == 4 * n_params + 4, line
    daso = read_metrics(runs["root"] / "daso")
    assert daso[2]["comm_cross_node_bytes_per_step"] < daso[0]["comm_cross_node_bytes_per_step"], daso[:3]


def test_daso_resume_with_an_average_in_flight_equals_uninterrupted_run(runs):
    """Checkpoint 48 lies between a send (step index 47, batch 3 of epoch 3) and its merge (step index 48): the
    in-flight average, the schedule and the epoch's loss sum must come back from the checkpoint."""
    src, dst = runs["root"] / "daso", runs["root"] / "daso_resumed"
    os.makedirs(dst / "checkpoints")
    shutil.copytree(src / "checkpoints" / "48", dst / "checkpoints" / "48")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    resumed = train_and_evaluate(runs["daso_config"], dst, resume=True)
    full = runs["daso"]["state"]
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, resumed["state"]), jax.tree.map(np.asarray, full), rtol=1e-6, atol=1e-7
    )
    assert resumed["test_accuracy"] == runs["daso"]["test_accuracy"]
    resumed_lines, full_lines = read_metrics(dst), read_metrics(src)
    assert [line["epoch"] for line in resumed_lines] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]
    # every line as the uninterrupted run wrote it: the phase counts and bytes of the resumed epoch (4) cover the
    # steps before the checkpoint too, and its mean loss sums them (float tolerance: the state's is 1e-6 as well)
    for got, want in zip(resumed_lines, full_lines, strict=True):
        exact = {k: v for k, v in want.items() if k != "seconds" and not isinstance(v, float)}
        assert {k: got[k] for k in exact} == exact, (got, want)
        for key in ("train_loss", "test_loss", "comm_bytes_per_step", "comm_cross_node_bytes_per_step"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-6), (key, got, want)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parallel": "ddp", "mesh": "3x4"}, r"mesh: shape 3x4 needs 12 devices, but 8 are available"),
        ({"parallel": "ddp", "mesh": "2x4", "batch_size": 60}, r"batch_size: the global batch of 60 examples"),
        ({"parallel": "daso", "mesh": "2x4", "daso_global_skip": 0}, r"global_skip: must be an integer >= 1"),
        ({"parallel": "daso", "mesh": "2x4", "daso_batches_to_wait": 4}, r"batches_to_wait: S = 4 must be < global"),
        ({"parallel": "horovod"}, r"parallel: unknown mode 'horovod'"),
        ({"mesh": "2x4"}, r"mesh: '2x4' is given but parallel is 'none'"),
    ],
)
def test_bad_parallel_configuration_fails_before_training(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(RunConfig.from_flags(**{**DIGITS, "epochs": 1, **changes}), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_trains_daso_on_simulated_devices(tmp_path):
    command = [sys.executable, "-m", "jaxalgo", "train", "--quiet", "--devices", "8", "--parallel", "daso"]
    command += ["--mesh", "2x4", "--hidden", "64", "--lr", "1e-2", "--epochs", "1", "--daso-warmup-epochs", "1"]
    command += ["--daso-sharded", "--workdir", str(tmp_path / "cli")]
    env = without_device_count({**os.environ, "PYTHONPATH": REPO})
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = read_metrics(tmp_path / "cli")
    assert lines[-1]["final"] and lines[-1]["steps"] == 22 and lines[-1]["test_accuracy"] > 0.2
    assert lines[0]["daso_phases"] == {"blocking": 22}
