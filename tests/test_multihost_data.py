"""Multi-host data: each process builds only its own rows of every global batch (``iterate_batches(rows=...)``),
the mesh runners find those rows from the mesh (``batch_rows``) and assemble the global batch with
``shard_local``; a two-process DDP run of the CLI ends where the one-process run on 8 devices does."""

from __future__ import annotations

import json
import textwrap

import jax
import numpy as np
import pytest
from _two_processes import run_cli_in_two_processes, run_two_processes
from jax.sharding import Mesh

from jaxalgo import data
from jaxalgo import parallel as par
from jaxalgo.config import RunConfig
from jaxalgo.train import make_runner, setup, train_and_evaluate


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def _nbytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def _shard_nbytes(tree) -> int:
    """Bytes of the pieces of ``tree``'s global arrays held by this process's devices."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards)


@pytest.mark.parametrize(("rows", "start_step"), [(slice(16, 48), 0), (slice(None, 8), 3), (slice(63, None), 5)])
def test_rows_build_exactly_those_rows_of_each_global_batch(digits, rows, start_step):
    """The oracle is the whole global batch (the default) sliced: same batches, same order, only those rows."""
    full = list(data.iterate_batches(digits, 64, seed=7, epoch=2, start_step=start_step))
    part = list(data.iterate_batches(digits, 64, seed=7, epoch=2, start_step=start_step, rows=rows))
    assert len(part) == len(full) == data.steps_per_epoch(digits.num_train, 64) - start_step
    count = len(range(64)[rows])
    for whole, mine in zip(full, part, strict=True):
        assert sorted(mine) == sorted(whole) == ["idx", "x", "y"]
        for name in whole:
            np.testing.assert_array_equal(mine[name], whole[name][rows])
            assert mine[name].dtype == whole[name].dtype
        # only the requested rows are built: 64 features of float32, one int label and one int32 index per row
        assert _nbytes(mine) == count * (digits.x_train[0].nbytes + digits.y_train[0].nbytes + 4)


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        (slice(0, 0), ValueError, r"rows: expected slice\(start, stop\) with step 1 and 0 <= start < stop <= "),
        (slice(-8, None), ValueError, r"batch_size \(64\), got slice\(-8, None, None\)"),
        (slice(0, 65), ValueError, r"got slice\(0, 65, None\)"),
        (slice(0, 64, 2), ValueError, r"step 1"),
        ((0, 32), TypeError, r"rows: expected a slice of the batch's rows or None, got tuple"),
        (slice(0.0, 32), TypeError, r"rows: expected a slice of ints, got slice\(0.0, 32, None\)"),
    ],
)
def test_bad_rows_are_refused_when_called(digits, rows, error, message):
    with pytest.raises(error, match=message):
        data.iterate_batches(digits, 64, seed=0, epoch=0, rows=rows)


def test_local_batch_rows_are_read_from_the_mesh():
    """Hand-worked: 64 rows over a 2x4 mesh are 8 per device, row-major over (node, local)."""
    mesh = par.make_mesh((2, 4))
    assert par.local_batch_rows(mesh, 64) == slice(0, 64)  # one process holds every device
    assert par.local_batch_rows(mesh, 64, devices=mesh.devices[0]) == slice(0, 32)
    assert par.local_batch_rows(mesh, 64, devices=mesh.devices[1]) == slice(32, 64)
    assert par.local_batch_rows(mesh, 64, devices=[mesh.devices[1, 2]]) == slice(48, 56)
    ab = par.make_mesh((4, 2), par.AB_AXES)
    assert par.local_batch_rows(ab, 32, devices=ab.devices[1:3]) == slice(8, 24)
    with pytest.raises(ValueError, match=r"mesh: devices \[0, 4\] hold rows \['0:8', '32:40'\] of the global batch"):
        par.local_batch_rows(mesh, 64, devices=mesh.devices[:, 0])
    # the mapping is read, not assumed: a mesh that interleaves two halves of the devices refuses them
    devices = np.asarray(jax.devices(), dtype=object)
    interleaved = Mesh(devices.reshape(2, 4).T.reshape(2, 4), par.DATA_AXES)
    with pytest.raises(ValueError, match=r"not one contiguous block"):
        par.local_batch_rows(interleaved, 64, devices=devices[:4])
    with pytest.raises(ValueError, match=r"global_batch_size: the global batch of 60 examples does not split"):
        par.local_batch_rows(mesh, 60)
    with pytest.raises(ValueError, match=r"devices: expected a non-empty subset of the mesh's devices"):
        par.local_batch_rows(par.make_mesh((1, 4), devices=jax.devices()[:4]), 64, devices=jax.devices()[4:])


def test_shard_local_in_one_process_equals_shard(digits):
    mesh = par.make_mesh((2, 4))
    batch = next(data.iterate_batches(digits, 64, seed=0, epoch=0))
    local, placed = par.shard_local(batch, mesh, 64), par.shard(batch, mesh)
    for name, value in batch.items():
        assert local[name].sharding == placed[name].sharding and local[name].shape == value.shape
        np.testing.assert_array_equal(np.asarray(local[name]), value)
    assert _shard_nbytes(local) == _nbytes(batch)
    with pytest.raises(ValueError, match=r"batch\['x'\]: expected a leading dimension of 64 \(the whole global batch"):
        par.shard_local({"x": batch["x"][:32]}, mesh, 64)


def test_mesh_runner_in_one_process_builds_every_row_and_places_as_shard(digits):
    config = RunConfig.from_flags(parallel="ddp", mesh="2x4", hidden=(16,), epochs=1, batch_size=64, quiet=True)
    runner = make_runner(config, setup(config))
    assert runner.batch_rows is None
    batch = next(data.iterate_batches(digits, 64, seed=0, epoch=0))
    placed, expected = runner._place_batch(batch), par.shard(batch, runner.mesh)
    for name in batch:
        assert placed[name].sharding == expected[name].sharding
        np.testing.assert_array_equal(np.asarray(placed[name]), np.asarray(expected[name]))


# Each of two processes (4 devices each): the runner's rows, the host batch it builds and the pieces it holds.
PROGRAM = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jaxalgo import data
    from jaxalgo.config import RunConfig
    from jaxalgo.train import make_runner, setup

    def run(mesh):
        del mesh  # the runner builds its own 2x4 mesh
        config = RunConfig.from_flags(parallel="ddp", mesh="2x4", hidden=(16,), epochs=1, batch_size=64, quiet=True)
        runner = make_runner(config, setup(config))
        rows = runner.batch_rows
        batches = data.iterate_batches(runner.experiment.dataset, 64, seed=0, epoch=0, start_step=2, rows=rows)
        batch = next(batches)
        placed = runner._place_batch(batch)
        out = {"rows": np.array([rows.start, rows.stop])}
        out["host_bytes"] = np.array(sum(v.nbytes for v in batch.values()))
        out["shard_bytes"] = np.array(sum(s.data.nbytes for v in placed.values() for s in v.addressable_shards))
        for name, value in placed.items():
            assert value.shape[0] == 64 and value.sharding.spec == jax.sharding.PartitionSpec(("node", "local"))
            out[name] = multihost_utils.process_allgather(value, tiled=True)
        return out
    """
)


@pytest.mark.multiprocess
def test_two_processes_each_build_and_hold_half_of_every_batch(tmp_path, digits):
    outputs = run_two_processes(tmp_path, PROGRAM)
    whole = list(data.iterate_batches(digits, 64, seed=0, epoch=0))[2]
    one_process = _nbytes(whole)  # what a single process builds and (over its 8 devices) holds
    assert one_process == 64 * (64 * 4 + 4 + 4)  # 64 float32 features, an int32 label and an int32 index per row
    for i, got in enumerate(outputs):
        assert got["rows"].tolist() == [32 * i, 32 * (i + 1)]
        assert int(got["host_bytes"]) == int(got["shard_bytes"]) == one_process // 2 == 8448
        for name, value in whole.items():  # the assembled global batch is the one-process batch
            np.testing.assert_array_equal(got[name], value, err_msg=f"process {i}: {name}")


def _lines(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_cli_ddp_in_two_processes_equals_one_process_on_8_devices(tmp_path):
    """``jaxalgo train --parallel ddp --mesh 2x4`` as two processes of 4 devices (each building its half of every
    batch, ``runner.batch_rows``) against the same run in this one process on 8 devices: the epoch's train loss and
    the evaluations (run by every process on the replicated parameters) agree to float32 rounding (the cross-process
    all-reduce may sum in another order, so they are not always bit-identical); the bytes per step are equal."""
    flags = {"parallel": "ddp", "mesh": "2x4", "hidden": (32,), "lr": 0.03, "epochs": 1, "batch_size": 64, "seed": 3}
    run_cli_in_two_processes(tmp_path / "two", *(f"--{k.replace('_', '-')}={v}" for k, v in _cli(flags).items()))
    with jax.enable_x64(False):  # as the CLI runs
        train_and_evaluate(RunConfig.from_flags(**flags, quiet=True), tmp_path / "one")
    two, one = _lines(tmp_path / "two"), _lines(tmp_path / "one")
    assert [line["epoch"] for line in two] == [line["epoch"] for line in one] == [1, 1]  # one writer
    assert two[-1]["final"] and two[-1]["steps"] == one[-1]["steps"] == 22
    assert one[-1]["test_accuracy"] > 0.8  # the run learned, so the comparison is not vacuous
    for got, expected in zip(two, one, strict=True):
        assert sorted(got) == sorted(expected)
        for key in ("comm_bytes_per_step", "comm_cross_node_bytes_per_step"):
            assert got[key] == expected[key], key
        for key in ("train_loss", "test_loss", "test_accuracy"):
            if key in expected:
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)


def _cli(flags: dict) -> dict:
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in flags.items()}
