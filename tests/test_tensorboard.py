"""``--tensorboard``: the event files, read back by TensorBoard's own reader, equal the metrics file's epoch lines,
also after a resume (no point duplicated or lost)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from jaxalgo.cli import main
from jaxalgo.config import RunConfig
from jaxalgo.tensorboard_log import MissingExtraError, TensorBoardWriter
from jaxalgo.train import train_and_evaluate

# 11 steps per epoch on digits (1437 training examples, batch 128); the smallest model that trains
TINY = dict(hidden=(8,), epochs=1, batch_size=128, quiet=True, seed=5)


def metrics_lines(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_points(lines) -> list[tuple[str, int, float]]:
    """The oracle, from the format train.py writes: every number of every epoch line (neither the final line nor
    an event), but its step, epoch and seconds, at the line's step; a dict of numbers gives one point per key."""
    points = []
    for line in lines:
        if "epoch" not in line or line.get("final") or "event" in line:
            continue
        for key, value in line.items():
            if key in ("step", "epoch", "seconds"):
                continue
            values = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in values:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                tag = key if sub is None else f"{key}/{sub}"
                points.append((tag, line["step"], float(np.float32(v))))
    return sorted(points)


def raw_points(directory) -> list[tuple[str, int, float]]:
    """Every scalar of every event file in ``directory``, as written (no de-duplication, no purge)."""
    points = []
    for name in sorted(os.listdir(directory)):
        for event in EventFileLoader(os.path.join(directory, name)).Load():
            for value in event.summary.value:
                number = (
                    float(tensor_util.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                )
                points.append((value.tag, event.step, number))
    return sorted(points)


def shown_points(directory) -> list[tuple[str, int, float]]:
    """What TensorBoard shows: its EventAccumulator over the directory."""
    accumulator = EventAccumulator(os.fspath(directory), size_guidance={SCALARS: 0})
    accumulator.Reload()
    return sorted(
        (tag, event.step, event.value) for tag in accumulator.Tags()["scalars"] for event in accumulator.Scalars(tag)
    )


def assert_events_equal_metrics(workdir):
    expected = expected_points(metrics_lines(workdir))
    assert expected, "the run wrote no epoch line"
    board = os.path.join(workdir, "tensorboard")
    assert raw_points(board) == expected
    assert shown_points(board) == expected


def test_writer_turns_epoch_lines_into_scalars_and_rewrite_replaces_them(tmp_path):
    lines = [
        {"step": 0, "event": "oialr_convert", "trainable_fraction": 0.5},
        {"step": 10, "epoch": 1, "train_loss": 1.25, "test_accuracy": 0.5, "seconds": 2.0, "ranks": {"a": 3, "b": 4}},
        {"step": 20, "epoch": 2, "train_loss": 0.75, "converted": True, "skip": None, "name": "x", "seconds": 3.0},
        {"final": True, "step": 20, "epoch": 2, "test_accuracy": 0.75, "steps": 20, "seconds": 3.5},
    ]
    writer = TensorBoardWriter(tmp_path, started=1000.0)
    writer.rewrite(lines[:2])
    writer.add(lines[2:])
    writer.close()
    # the event and the final line, and the bool, None and str fields, are no scalars
    epoch_1 = [("train_loss", 10, 1.25), ("test_accuracy", 10, 0.5), ("ranks/a", 10, 3.0), ("ranks/b", 10, 4.0)]
    assert raw_points(tmp_path) == sorted([*epoch_1, ("train_loss", 20, 0.75)])
    walltimes = {e.step: e.wall_time for e in EventFileLoader(writer.event_files()[0]).Load() if e.summary.value}
    assert walltimes == {10: 1002.0, 20: 1003.0}
    writer.rewrite(lines[1:2])  # a resume from step 10: the point of step 20 goes
    writer.close()
    assert len(writer.event_files()) == 1
    assert [p for p in raw_points(tmp_path) if p[0] == "train_loss"] == [("train_loss", 10, 1.25)]


def test_event_files_equal_the_metrics_of_a_resumed_run(tmp_path):
    # one epoch without TensorBoard, then two more with it: the event files hold the first epoch too
    train_and_evaluate(RunConfig.from_flags(**TINY), tmp_path)
    assert not os.path.exists(tmp_path / "tensorboard")
    train_and_evaluate(RunConfig.from_flags(**{**TINY, "epochs": 2, "tensorboard": True}), tmp_path, resume=True)
    lines = metrics_lines(tmp_path)
    assert [(line.get("epoch"), line.get("event")) for line in lines] == [
        (1, None),
        (None, "resume"),
        (2, None),
        (2, None),
    ]
    assert_events_equal_metrics(tmp_path)


def test_points_after_the_restored_checkpoint_are_not_duplicated(tmp_path):
    # a two-epoch run whose last checkpoint is lost: the resume restores epoch 1 and trains epoch 2 again, while
    # the event files of the first attempt already hold epoch 2
    config = RunConfig.from_flags(**{**TINY, "epochs": 2, "tensorboard": True})
    train_and_evaluate(config, tmp_path)
    first = raw_points(tmp_path / "tensorboard")
    assert sorted({step for _, step, _ in first}) == [11, 22]
    shutil.rmtree(tmp_path / "checkpoints" / "22")
    train_and_evaluate(config, tmp_path, resume=True)
    assert [line.get("epoch") for line in metrics_lines(tmp_path)] == [1, 2, 2]
    assert_events_equal_metrics(tmp_path)
    assert raw_points(tmp_path / "tensorboard") == first  # the same steps, each once; the run is deterministic


def test_a_missing_tensorboardx_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else find_spec(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install jaxalgo\[tensorboard\]"):
        train_and_evaluate(RunConfig.from_flags(**TINY, tensorboard=True), tmp_path / "api")
    assert main(["train", "--tensorboard", "--quiet", "--workdir", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install jaxalgo[tensorboard]" in err
    assert not os.path.exists(tmp_path / "api") and not os.path.exists(tmp_path / "cli")
