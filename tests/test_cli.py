"""The ``jaxalgo`` command line: flags map to the config, errors are one clear line, runs write metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from jaxalgo import cli
from jaxalgo.config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", "jaxalgo", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_every_config_field_has_a_flag_and_defaults_match():
    args = cli.build_parser().parse_args(["train"])
    assert cli.config_from_args(args) == RunConfig.from_flags()


def test_flags_reach_the_config():
    argv = ["train", "--model", "vit", "--dataset", "breast_cancer", "--optimizer", "sgd", "--lr", "0.5"]
    argv += ["--epochs", "3", "--batch-size", "7", "--seed", "9", "--vit-dim", "96", "--vit-depth", "3"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert (config.model.options.dim, config.model.options.depth) == (96, 3)
    assert (config.model.name, config.dataset, config.optimizer.name) == ("vit", "breast_cancer", "sgd")
    assert (config.optimizer.options.lr, config.epochs, config.batch_size, config.seed) == (0.5, 3, 7, 9)
    argv = ["train", "--hidden", "8,4", "--activation", "tanh", "--estimator", "frog", "--tangents", "4"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert config.model.options.hidden == (8, 4) and config.model.options.activation == "tanh"
    assert config.estimator.options.num_tangents == 4
    assert config.estimator.options.aggregation == "orthogonal_projection"  # pinned by the name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "vit", "--hidden", "8,4"], "hidden: (8, 4) is given but model is 'vit'; it applies to mlp"),
        (["--tangents", "4"], "tangents: 4 is given but estimator is 'backprop'"),
        (["--daso-comm-dtype", "float16"], "daso_comm_dtype: 'float16' is given but parallel is 'none'"),
        (["--estimator", "fg-rank1", "--tangent-dist", "rademacher"], "tangent_dist: estimator 'fg-rank1' always"),
        (["--estimator", "x"], "estimator: unknown estimator 'x'"),
    ],
)
def test_flags_the_chosen_entries_do_not_take_are_refused(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_help_explains_every_flag():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ["--model", "--dataset", "--estimator", "--optimizer", "--lr", "--epochs", "--batch-size"]:
        assert flag in result.stdout
    assert "--workdir" in result.stdout and "--resume" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--estimator", "magic"], "estimator: unknown estimator 'magic'"),
        (["--lr", "0"], "lr: must be a number > 0"),
        (["--batch-size", "5000"], "batch_size"),
        (
            ["--estimator", "frog-activity", "--tangent-dist", "rank1"],
            "tangent_dist: got 'rank1'; allowed: gaussian, rademacher",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_status_2(tmp_path, args, message):
    result = run_cli("train", "--quiet", "--workdir", str(tmp_path / "run"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_short_run_writes_metrics_and_prints_the_table(tmp_path):
    workdir = tmp_path / "run"
    result = run_cli("train", "--epochs", "2", "--hidden", "32", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "steps" in result.stdout
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["final"] is True
    assert lines[-1]["steps"] == 2 * (1437 // 64)
    assert {"test_accuracy", "steps", "seconds"} <= set(lines[-1])
