"""The sweep (jaxalgo.sweep): one vmapped program equals one run after another, selection on validation data
only, resume equals uninterrupted, the fallback and the refusals.

One small problem throughout: a one-hidden-layer MLP (16 units) on digits, 2 epochs of 20 steps, two learning
rates. The oracle of the vmapped program is the sequential path, which trains each value with the plain
single-device runner of ``jaxalgo train`` (the optimizer built with the concrete learning rate).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from jaxalgo import cli, data
from jaxalgo import sweep as sw
from jaxalgo.config import RunConfig
from jaxalgo.workdir import read_metrics

VALUES = (1e-3, 3e-2)
FLAGS = dict(hidden=(16,), epochs=2, batch_size=64, quiet=True, checkpoint_every=15)


def poisoned_digits(**arguments):
    """Digits with every test input NaN: a sweep that read the test split would see NaN metrics."""
    arguments.pop("data_dir", None)
    arguments.pop("standardize", None)
    clean = data.load_dataset("digits", **arguments)
    return dataclasses.replace(clean, x_test=np.full_like(clean.x_test, np.nan))


def _lines(path):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in read_metrics(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = RunConfig.from_flags(**FLAGS)
    vmapped = sw.sweep(config, "lr", VALUES, root / "vmap", mode="vmap", plot=True)
    sequential = sw.sweep(config, "lr", VALUES, root / "seq", mode="sequential", plot=False)
    return {"root": root, "config": config, "vmap": vmapped, "seq": sequential}


def test_vmapped_equals_sequential(runs):
    vmapped, sequential = runs["vmap"], runs["seq"]
    assert (vmapped.mode, sequential.mode) == ("vmap", "sequential")
    assert vmapped.values == sequential.values == VALUES
    for a, b in zip(vmapped.states, sequential.states, strict=True):
        assert int(a.step) == int(b.step) == 40
        chex.assert_trees_all_close(a.params, b.params, rtol=2e-4, atol=2e-6)
        chex.assert_trees_all_close(a.opt_state, b.opt_state, rtol=2e-4, atol=2e-6)
    for value in VALUES:
        name = sw.value_dir("lr", value)
        a, b = (
            _lines(runs["root"] / "vmap" / name / "metrics.jsonl"),
            _lines(runs["root"] / "seq" / name / "metrics.jsonl"),
        )
        assert [sorted(line) for line in a] == [sorted(line) for line in b]
        assert a[-1]["final"] and a[-1]["lr"] == value and a[-1]["steps"] == 40
        for line_a, line_b in zip(a, b, strict=True):
            for key in ("train_loss", "val_loss", "val_accuracy"):
                if key in line_a:
                    np.testing.assert_allclose(line_a[key], line_b[key], rtol=1e-4)
    assert vmapped.best == sequential.best
    # the two learning rates give different models: the lanes are not one model broadcast
    assert vmapped.rows[0]["val_loss"] != pytest.approx(vmapped.rows[1]["val_loss"], rel=1e-3)


def test_outputs_of_a_sweep(runs):
    result, workdir = runs["vmap"], runs["root"] / "vmap"
    assert (workdir / sw.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = sw.read_sweep(workdir)
    assert saved["best"] == result.best and saved["mode"] == "vmap" and saved["values"] == list(VALUES)
    scores = [row["metric"] for row in result.rows]
    assert result.best == VALUES[int(np.argmax(scores))]
    table = sw.format_table(result)
    assert table.count("<- chosen") == 1 and f"{100 * max(scores):.2f}%" in table
    # the printed command trains exactly the chosen configuration
    argv = result.command.split()[1:]
    assert argv[0] == "train"
    parsed = cli.config_from_args(cli.build_parser().parse_args(argv))
    expected = runs["config"].with_flags(lr=result.best, quiet=False)  # the command leaves out --quiet
    assert parsed.flags() == expected.flags()


def test_selection_never_reads_the_test_split(runs, tmp_path):
    config = RunConfig.from_flags(**{**FLAGS, "dataset": "tests.test_sweep:poisoned_digits"})
    poisoned = sw.sweep(config, "lr", VALUES, tmp_path / "poisoned", mode="vmap", plot=False)
    clean = runs["vmap"]
    assert poisoned.best == clean.best
    assert [r["metric"] for r in poisoned.rows] == [r["metric"] for r in clean.rows]
    assert [r["val_loss"] for r in poisoned.rows] == [r["val_loss"] for r in clean.rows]


def test_resume_equals_uninterrupted(runs, tmp_path):
    source = runs["root"] / "vmap"
    copy = tmp_path / "resumed"
    shutil.copytree(source, copy)
    steps = sorted(int(p) for p in os.listdir(copy / "checkpoints") if p.isdigit())
    assert steps == [30, 40]  # checkpoint_every=15 and every epoch's end, 2 kept
    shutil.rmtree(copy / "checkpoints" / "40")  # as if killed after the mid-epoch checkpoint at step 30
    with pytest.raises(FileExistsError, match="resume"):
        sw.sweep(runs["config"], "lr", VALUES, copy, mode="vmap", plot=False)
    resumed = sw.sweep(runs["config"], "lr", VALUES, copy, mode="vmap", resume=True, plot=False)
    for a, b in zip(resumed.states, runs["vmap"].states, strict=True):
        chex.assert_trees_all_equal(a, b)
    for value in VALUES:
        name = sw.value_dir("lr", value)
        assert _lines(copy / name / "metrics.jsonl") == _lines(source / name / "metrics.jsonl")
    assert resumed.rows == tuple(
        {**row, "metrics_path": str(copy / sw.value_dir("lr", row["value"]) / "metrics.jsonl")}
        for row in runs["vmap"].rows
    )
    again = sw.sweep(runs["config"], "lr", VALUES, copy, mode="vmap", resume=True, plot=False)  # finished
    assert again.rows == resumed.rows
    with pytest.raises(ValueError, match=r"values: the sweep in .* has \[0.001, 0.03\]"):
        sw.sweep(runs["config"], "lr", (1e-3, 1e-2), copy, mode="vmap", resume=True, plot=False)


def test_fallback_is_taken_and_reported(tmp_path):
    # the optimizer's build branches on weight_decay > 0 in Python: it cannot be traced, one run after another
    config = RunConfig.from_flags(**{**FLAGS, "epochs": 1})
    result = sw.sweep(config, "weight_decay", (0.0, 1e-3), tmp_path / "wd", plot=False)
    assert result.mode == "sequential"
    assert "weight_decay as a traced value" in result.reason
    assert sw.read_sweep(tmp_path / "wd")["reason"] == result.reason
    assert len(result.rows) == 2 and all(row["metric"] is not None for row in result.rows)
    with pytest.raises(ValueError, match="mode: 'vmap' is not possible here"):
        sw.sweep(config, "weight_decay", (0.0, 1e-3), tmp_path / "wd2", mode="vmap")


def test_a_diverging_value_is_marked_and_never_chosen(tmp_path):
    config = RunConfig.from_flags(**{**FLAGS, "epochs": 1, "optimizer": "sgd"})
    result = sw.sweep(config, "lr", (0.1, 1e30), tmp_path / "nan", mode="vmap", plot=True)
    good, bad = result.rows
    assert good["metric"] is not None and bad["metric"] is None and bad["val_loss"] is None
    assert result.best == 0.1
    final = read_metrics(tmp_path / "nan" / sw.value_dir("lr", 1e30) / "metrics.jsonl")[-1]
    assert final["final"] and final["diverged"] and final["val_loss"] is None
    assert "diverged" in sw.format_table(result)


def test_a_multi_device_strategy_runs_one_after_another():
    assert len(jax.devices()) >= 2
    config = RunConfig.from_flags(**{**FLAGS, "parallel": "ddp"})
    mode, reason = sw.plan(config, "lr", sw.validation_experiment(config, 0.1))
    assert mode == "sequential" and "parallel='ddp'" in reason and "cannot batch" in reason


def test_the_validation_split_is_part_of_the_training_split():
    dataset = data.load_dataset("digits", seed=0)
    split = sw.validation_split(dataset, 0.25, seed=0)
    assert split.num_train + split.num_test == dataset.num_train
    rows = {tuple(r.ravel()) for r in dataset.x_train}
    assert all(tuple(r.ravel()) in rows for r in split.x_test[:50])
    # stratified: each class sends round(0.25 * n_c) of its examples to validation
    for c in range(10):
        n_c = int(np.sum(dataset.y_train == c))
        assert int(np.sum(split.y_test == c)) == round(0.25 * n_c)


def test_select_skips_diverged_values():
    rows = [
        {"value": 1.0, "metric": None, "val_loss": None, "train_loss": None},
        {"value": 2.0, "metric": 0.5, "val_loss": 1.0, "train_loss": 1.0},
        {"value": 3.0, "metric": 0.5, "val_loss": 1.0, "train_loss": 1.0},
        {"value": 4.0, "metric": 0.4, "val_loss": 1.0, "train_loss": 1.0},
    ]
    assert sw.select(rows, maximize=True) == 2.0  # ties go to the value listed first
    assert sw.select(rows, maximize=False) == 4.0
    assert sw.select(rows[:1], maximize=True) is None


def test_parse_values():
    assert sw.parse_values("1e-4:1e-1:4") == (1e-4, 1e-3, 1e-2, 1e-1)
    values = sw.parse_values("1e-4:1e-1:8")
    assert len(values) == 8 and values[0] == 1e-4 and values[-1] == 1e-1
    ratios = np.diff(np.log(values))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)  # log-spaced (4 significant digits)
    assert sw.parse_values("3, 1,2") == (3.0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--option", "nope", "--values", "1e-3:1e-1:3"], "option: unknown option 'nope'"),
        (["--option", "hidden", "--values", "1e-3:1e-1:3"], "option: 'hidden' is not a float option"),
        (["--option", "epochs", "--values", "1,2"], "option: 'epochs' is not a float option"),
        (["--option", "lr", "--values", "1e-1:1e-3:3"], "values: LO:HI:N needs HI > LO"),
        (["--option", "lr", "--values", "1e-3:1e-1:1"], "values: N of LO:HI:N must be an integer >= 2"),
        (["--option", "lr", "--values", "0:1e-1:3"], "values: log spacing needs LO > 0"),
        (["--option", "lr", "--values", "1e-3:1e-1:x"], "values: N of LO:HI:N must be an integer"),
        (["--option", "lr", "--values", "0.1"], "values: a sweep needs at least 2 values, got 1"),
        (["--option", "lr", "--values", "0.1,0.1"], "values: values must be distinct"),
        (["--option", "lr", "--values", "a,b"], "values: expected LO:HI:N or a comma list"),
        (["--option", "lr", "--values=-1,0.1"], "values: -1.0 is not allowed for lr"),
        (["--values", "1e-3:1e-1:3"], "option: give --option FLAG"),
        (["--option", "lr"], "values: give --values"),
        (["--option", "lr", "--values", "1,2", "--val-fraction", "1.5"], "val_fraction: must be in (0, 1)"),
    ],
)
def test_bad_input_is_refused_in_one_line(argv, message, tmp_path, capsys):
    status = cli.main(["sweep", *argv, "--workdir", str(tmp_path / "w"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(tmp_path / "w" / sw.SWEEP_FILE)  # refused before any work


def test_sweep_json_is_strict_json(runs):
    text = (runs["root"] / "vmap" / sw.SWEEP_FILE).read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
