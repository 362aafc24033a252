"""Nothing lost, nothing garbage: verified checkpoints with fallback, one writer per workdir, exact run records after
a crash at any point, recovery from divergence with ``--resume --lr``, and clear errors for bad resumes.

The runs are tiny (a 16-unit MLP on 480 Gaussian-blob examples, 5 steps per epoch, a checkpoint every 2 steps) so
that every corruption and every crash point can be tried against one uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _two_processes import without_device_count

from jaxalgo import train, workdir
from jaxalgo.checkpoint import CORRUPT_DIR, MANIFEST, CheckpointCorruptError, Checkpointer
from jaxalgo.config import RunConfig
from jaxalgo.train import NonFiniteLossError, train_and_evaluate
from jaxalgo.workdir import WorkdirBusyError, WorkdirLock, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {
    "dataset": "tests._user_plugins:blobs",
    "hidden": (16,),
    "batch_size": 96,
    "epochs": 2,
    "checkpoint_every": 2,
    "keep_checkpoints": 3,
    "quiet": True,
    "seed": 1,
}
CONFIG = RunConfig.from_flags(FLAGS)  # 480 training examples: 5 steps per epoch, 10 in all


class Crash(Exception):
    """Stands for a kill -9 at a chosen point of the loop."""


def without_time(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same_run(workdir: Path, result: dict, reference: dict) -> None:
    """Bit-identical final state and the same metrics lines (but wall time) as the uninterrupted run."""
    assert int(result["state"].step) == int(reference["state"].step)
    for got, want in zip(host(result["state"].params), host(reference["state"].params), strict=True):
        np.testing.assert_array_equal(got, want)
    assert without_time(read_metrics(workdir / "metrics.jsonl")) == reference["lines"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted")
    result = train_and_evaluate(CONFIG, path)
    return {"state": result["state"], "lines": without_time(read_metrics(path / "metrics.jsonl"))}


def crash_after_saves(monkeypatch, count: int, *, before: bool = False) -> None:
    """Crashes right after the ``count``-th checkpoint is complete (or right before it is written)."""
    calls = {"n": 0}
    save = Checkpointer.save

    def crashing(self, step, state, record):
        calls["n"] += 1
        if before and calls["n"] == count:
            raise Crash(f"before the save at step {step}")
        save(self, step, state, record)
        if not before and calls["n"] == count:
            raise Crash(f"after the save at step {step}")

    monkeypatch.setattr(Checkpointer, "save", crashing)


def crash_on_epoch_line(monkeypatch, epoch: int) -> None:
    """Crashes after the epoch's checkpoint is complete, before its metrics line reaches the file."""
    append = workdir.append_metrics

    def crashing(path, records):
        records = list(records)
        if any(r.get("epoch") == epoch and not r.get("final") for r in records):
            raise Crash(f"before the metrics line of epoch {epoch}")
        append(path, records)

    monkeypatch.setattr(train, "append_metrics", crashing)


def crash_in_step(monkeypatch, at_step: int) -> None:
    """Crashes inside training step ``at_step`` (between checkpoints)."""
    make_runner = train.make_runner

    def wrapped(config, experiment):
        runner = make_runner(config, experiment)
        step = runner.step

        def crashing(state, batch, index):
            if index == at_step:
                raise Crash(f"in step {index}")
            return step(state, batch, index)

        runner.step = crashing
        return runner

    monkeypatch.setattr(train, "make_runner", wrapped)


CRASHES = {
    "after a mid-epoch checkpoint": lambda mp: crash_after_saves(mp, 2),  # step 4
    "between a checkpoint and its epoch line": lambda mp: crash_on_epoch_line(mp, 1),
    "before a mid-epoch checkpoint": lambda mp: crash_after_saves(mp, 4, before=True),  # step 6
    "between two checkpoints": lambda mp: crash_in_step(mp, 8),
    "between the last checkpoint and the final lines": lambda mp: crash_on_epoch_line(mp, 2),
}


@pytest.mark.parametrize("point", list(CRASHES))
def test_a_crash_at_any_point_resumes_to_the_uninterrupted_run_and_metrics(tmp_path, monkeypatch, point, uninterrupted):
    with monkeypatch.context() as patch:
        CRASHES[point](patch)
        with pytest.raises(Crash):
            train_and_evaluate(CONFIG, tmp_path)
    result = train_and_evaluate(CONFIG, tmp_path, resume=True)
    assert_same_run(tmp_path, result, uninterrupted)
    # resuming the finished run changes nothing and says so
    again = train_and_evaluate(CONFIG, tmp_path, resume=True)
    assert again["final"] and again["step"] == 10
    assert without_time(read_metrics(tmp_path / "metrics.jsonl")) == uninterrupted["lines"]


def test_a_corrupt_metrics_file_is_rebuilt_from_the_checkpoint(tmp_path, uninterrupted):
    with pytest.MonkeyPatch.context() as patch:
        crash_after_saves(patch, 3)  # the epoch-1 checkpoint, step 5
        with pytest.raises(Crash):
            train_and_evaluate(CONFIG, tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, \x01 garbage\n')
    result = train_and_evaluate(CONFIG, tmp_path, resume=True)
    assert_same_run(tmp_path, result, uninterrupted)


def test_read_metrics_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, oops\n')
    with pytest.raises(ValueError, match=r"metrics: .*metrics.jsonl line 3 is not valid JSON"):
        read_metrics(path)


# -- fault injection: every kind of file of the newest checkpoint, flipped, truncated or deleted ---------------

KINDS = (
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
    "record/metadata",
    "state/_METADATA",
    "state/_sharding",
    "state/manifest.ocdbt",
    "state/array_metadatas/process_0",
    "state/d/*",
    "state/ocdbt.process_0/manifest.ocdbt",
    "state/ocdbt.process_0/d/*",
    MANIFEST,
)


@pytest.fixture(scope="module")
def crashed_at_step_6(tmp_path_factory):
    """A run killed right after its checkpoint at step 6 (kept: steps 4, 5 and 6)."""
    path = tmp_path_factory.mktemp("crashed")
    with pytest.MonkeyPatch.context() as patch:
        crash_after_saves(patch, 4)
        with pytest.raises(Crash):
            train_and_evaluate(CONFIG, path)
    assert sorted(int(p.name) for p in (path / "checkpoints").iterdir()) == [4, 5, 6]
    return path


def _files_of_kind(step_dir: Path, kind: str) -> list[Path]:
    files = sorted(step_dir.glob(kind), key=lambda p: -p.stat().st_size)
    return [f for f in files if f.is_file()]


def _damage(path: Path, how: str) -> bool:
    """Damages ``path``; False when the damage is impossible (an empty file cannot be flipped or truncated)."""
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif not data:
        return False
    elif how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        path.write_bytes(data[: len(data) // 2])
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_every_damaged_checkpoint_falls_back_or_stops_cleanly(tmp_path, capsys, kind, crashed_at_step_6, uninterrupted):
    outcomes = {}
    for how in ("flip", "truncate", "delete"):
        run = tmp_path / how
        shutil.copytree(crashed_at_step_6, run)
        files = _files_of_kind(run / "checkpoints" / "6", kind)
        assert files, f"no file of kind {kind} in the checkpoint"
        if not _damage(files[0], how):
            continue
        capsys.readouterr()
        try:
            result = train_and_evaluate(CONFIG, run, resume=True)
        except CheckpointCorruptError as error:
            assert "\n" not in str(error)
            outcomes[how] = "stopped"
            continue
        reports = [line for line in capsys.readouterr().err.splitlines() if "checkpoint 6" in line]
        assert_same_run(run, result, uninterrupted)  # never garbage: whatever was restored is exact
        outcomes[how] = "fell back" if reports else "intact"
        if reports:
            assert len(reports) == 1 and "falling back to step 5" in reports[0]
            assert [p.name.split("-")[0] for p in (run / CORRUPT_DIR).iterdir()] == ["6"]
    # every damage is detected from the manifest before orbax reads a file; without the manifest (as in a checkpoint
    # of an older version) the arrays' own checksums verify the checkpoint, which is intact here
    expected = {"flip": "fell back", "truncate": "fell back", "delete": "fell back"}
    if kind == MANIFEST:
        expected["delete"] = "intact"
    assert outcomes == expected


def test_arrays_that_differ_from_their_checksums_are_refused(tmp_path, crashed_at_step_6):
    """Valid orbax data with the wrong content (checkpoint 5's arrays in checkpoint 6, manifest removed) is caught
    by the arrays' checksums and never restored."""
    run = tmp_path / "run"
    shutil.copytree(crashed_at_step_6, run)
    step_6 = run / "checkpoints" / "6"
    shutil.rmtree(step_6 / "state")
    shutil.copytree(run / "checkpoints" / "5" / "state", step_6 / "state")
    (step_6 / MANIFEST).unlink()
    checkpointer = Checkpointer(run / "checkpoints")
    try:
        like = train.make_runner(CONFIG, train.setup(CONFIG)).init(train.setup(CONFIG).init_state())
        with pytest.raises(
            CheckpointCorruptError, match=r"checkpoint 6: \d+ of \d+ arrays differ from their checksums"
        ):
            checkpointer.restore(6, like)
    finally:
        checkpointer.close()


def test_with_no_intact_checkpoint_the_resume_stops_with_one_line(tmp_path, crashed_at_step_6):
    run = tmp_path / "run"
    shutil.copytree(crashed_at_step_6, run)
    for step in (4, 5, 6):
        for data_file in _files_of_kind(run / "checkpoints" / str(step), "state/d/*"):
            _damage(data_file, "flip")
    with pytest.raises(CheckpointCorruptError, match=r"no intact checkpoint .* \(steps 4, 5, 6 failed verification"):
        train_and_evaluate(CONFIG, run, resume=True)


# -- one writer per workdir --------------------------------------------------------------------------------------


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirBusyError, match=rf"in use by process {os.getpid()} on host"):
            WorkdirLock(tmp_path).acquire()
    with WorkdirLock(tmp_path) as lock:  # released: free again, and nothing was left behind to take over
        assert lock.took_over is None


def _cli(workdir: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "jaxalgo", "train", "--workdir", str(workdir), "--quiet"]
    return [*command, "--hidden", "256,256", "--batch-size", "16", "--epochs", "10000", *extra]


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    env = without_device_count({**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    first = subprocess.Popen(_cli(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if (tmp_path / "lock").exists() and (tmp_path / "lock").read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()
        second = subprocess.run(_cli(tmp_path, "--resume"), env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            line for line in second.stderr.strip().splitlines() if line.startswith("jaxalgo: error: workdir:")
        ]
        assert f"in use by process {first.pid}" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    with WorkdirLock(tmp_path) as lock:  # the dead holder's lock is free and its record is taken over
        assert lock.took_over["pid"] == first.pid


# -- divergence: stop at a non-finite loss, recover with --resume --lr ----------------------------------------------


def test_a_diverged_run_recovers_with_resume_and_a_smaller_lr(tmp_path, uninterrupted):
    one_epoch = CONFIG.with_flags(epochs=1)
    train_and_evaluate(one_epoch, tmp_path)
    with pytest.raises(NonFiniteLossError) as stopped:
        diverging = CONFIG.with_flags(lr=1e30, checkpoint_every=0, log_every=1)  # checked every step
        train_and_evaluate(diverging, tmp_path, resume=True)
    message = str(stopped.value)
    assert "The last good checkpoint is step 5" in message
    assert f"jaxalgo train --workdir {tmp_path} --resume --lr 1e+29" in message
    recovered = train_and_evaluate(CONFIG, tmp_path, resume=True)  # the original lr, as a user would lower it
    lines = read_metrics(tmp_path / "metrics.jsonl")
    changes = [line for line in lines if line.get("event") == "resume"]
    assert changes == [{"step": 5, "event": "resume", "changed": {"epochs": [1, 2]}}]
    kept = [line for line in lines if line.get("event") != "resume"]
    assert without_time(kept) == uninterrupted["lines"]
    for got, want in zip(host(recovered["state"].params), host(uninterrupted["state"].params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_resume_takes_the_configuration_from_the_checkpoint(tmp_path):
    train_and_evaluate(CONFIG.with_flags(epochs=1), tmp_path)
    config = train.resume_config(tmp_path, {"epochs": 3, "lr": 5e-4})
    assert config.flags() == CONFIG.with_flags(epochs=3, lr=5e-4).flags()
    assert train.resume_config(tmp_path / "nothing-here", {}) is None


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    train_and_evaluate(CONFIG, tmp_path)
    with pytest.raises(ValueError, match=r"epochs: 1 is fewer than the 2 epochs \(step 10\) .* give --epochs 2"):
        train_and_evaluate(CONFIG.with_flags(epochs=1), tmp_path, resume=True)
