"""A seeded fuzz test of the command line: random combinations of valid and invalid flag values, each of which must
either train (one step per epoch on a tiny data set) or exit with status 2 and one line, never a traceback and
never a hang.

Each combination is a valid base command (an estimator, strategy, low-rank method, optimizer or model of the
catalogues) with one to three flags replaced by values drawn from a pool that mixes valid values with non-finite
numbers, out-of-range integers, unknown names, wrong types, impossible combinations and missing paths. The bases
run in-process (``jaxalgo.cli.main``) on the 8 simulated devices of the test session.
"""

from __future__ import annotations

import json
import random
import signal

import pytest

from jaxalgo import cli

SEEDS = range(4)
PER_SEED = 30  # 120 combinations in all
TIME_LIMIT = 120  # seconds per combination

DATA = ["--dataset", "tests._user_plugins:blobs", "--batch-size", "384", "--epochs", "1", "--quiet"]  # 1 step
BASES = [
    ["--hidden", "8"],
    ["--hidden", "8", "--estimator", "frog", "--tangents", "2"],
    ["--hidden", "8", "--estimator", "zo", "--tangents", "2"],
    ["--hidden", "8", "--estimator", "fg-rank1", "--tangents", "2"],
    ["--hidden", "8", "--estimator", "f3"],
    ["--hidden", "8", "--estimator", "drtp"],
    ["--hidden", "8", "--estimator", "fa"],
    ["--hidden", "8", "--parallel", "ddp"],
    ["--hidden", "8", "--lowrank", "oialr", "--lowrank-delay", "0"],
    ["--hidden", "8", "--optimizer", "sgd", "--momentum", "0.9"],
    ["--model", "tests._user_plugins:two_layer_chain"],
]
POOL: dict[str, list[str]] = {
    "--lr": ["0.01", "0", "-1", "nan", "inf", "-inf", "abc", "1e-3"],
    "--weight-decay": ["nan", "inf", "-1", "0.1"],
    "--momentum": ["nan", "-0.5", "0.5"],
    "--epochs": ["0", "-1", "x", "1"],
    "--batch-size": ["0", "-3", "100000", "1.5", "384"],
    "--seed": ["-1", "nan", "7"],
    "--tangents": ["0", "-3", "1000000000", "x", "2"],
    "--hidden": ["0", "-5", "abc", "8,8", "", "100000000"],
    "--activation": ["bogus", "tanh"],
    "--estimator": ["bogus", "dfa", "fa", "frog"],
    "--parallel": ["bogus", "ddp", "daso", "ab"],
    "--parallel-reduce": ["bogus", "gradients"],
    "--daso-comm-dtype": ["bogus", "float32"],
    "--mesh": ["3x3", "abc", "2x4", "0x8"],
    "--test-fraction": ["0", "1", "nan", "0.5", "0.3"],
    "--checkpoint-every": ["-1", "3"],
    "--keep-checkpoints": ["0", "2"],
    "--log-every": ["0", "5"],
    "--loss": ["bogus", "mse", "cross_entropy"],
    "--data-dir": ["/nonexistent-jaxalgo-dir"],
    "--dataset": ["bogus", "nomodule_xyz:fn", "tests._user_plugins:nothing"],
    "--model": ["bogus", "tests._user_plugins:nope", "vit"],
    "--optimizer": ["bogus", "sgd"],
    "--lowrank": ["bogus", "oialr"],
    "--lowrank-cutoff": ["nan", "2", "0.1"],
    "--compute-dtype": ["f16", "bfloat16"],
    "--feedback-init": ["bogus", "binomial"],
    "--zo-epsilon": ["0", "nan", "-1"],
    "--batching": ["bogus", "scan"],
    "--bogus-flag": ["1"],
}


def combinations(seed: int) -> list[list[str]]:
    """``PER_SEED`` argument lists drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    drawn = []
    for _ in range(PER_SEED):
        flags = dict(zip(*[iter(rng.choice(BASES))] * 2, strict=True))
        for _ in range(rng.choice([1, 1, 2, 3])):
            name = rng.choice(sorted(POOL))
            flags[name] = rng.choice(POOL[name])
        data = dict(zip(*[iter(DATA[:-1])] * 2, strict=True))
        data.update({k: v for k, v in flags.items() if k in data})
        flags = {k: v for k, v in flags.items() if k not in data}
        drawn.append(["train", *[x for kv in {**data, **flags}.items() for x in kv], "--quiet"])
    return drawn


class _TimeLimit(Exception):
    pass


def _alarm(signum, frame):
    raise _TimeLimit


@pytest.mark.parametrize("seed", SEEDS)
def test_every_combination_trains_or_exits_2_with_one_line(seed, tmp_path, capsys):
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"trained": 0, "refused": 0}
    try:
        for number, argv in enumerate(combinations(seed)):
            workdir = tmp_path / f"run{number}"
            capsys.readouterr()
            signal.alarm(TIME_LIMIT)
            try:
                status = cli.main([*argv, "--workdir", str(workdir)])
            except SystemExit as exit_:  # argparse
                status = exit_.code
            except _TimeLimit:
                pytest.fail(f"{argv} took over {TIME_LIMIT} s")
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            assert "Traceback" not in err, (argv, err)
            if status == 0:
                with open(workdir / "metrics.jsonl") as f:
                    final = json.loads(f.read().splitlines()[-1])
                assert final["final"] and final["steps"] >= 1, argv
                outcomes["trained"] += 1
            else:
                lines = [line for line in err.splitlines() if line.strip()]
                assert status == 2 and len(lines) == 1 and lines[0].startswith("jaxalgo: error: "), (argv, err)
                outcomes["refused"] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["trained"] >= 3 and outcomes["refused"] >= 20, outcomes  # the mix is not degenerate
    print(f"seed {seed}: {outcomes}")
