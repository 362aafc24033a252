"""The ways of training on several devices, as runners of :mod:`jaxalgo.runner`: DDP, DASO and AB-training.

Each strategy is an options dataclass (an entry of :data:`jaxalgo.parallel.STRATEGIES`) whose ``check`` refuses
what cannot run on the devices at hand and whose ``make_runner`` gives the runner; the training loop only talks to
the runner protocol. In a multi-process run each process builds only its own rows of every global batch
(``batch_rows``, the rows its devices hold) and the runner assembles the global batch from them; only process 0
writes metrics. Every runner meters the bytes each device sends per step
(:mod:`jaxalgo.parallel._traffic`), read once per program from its compiled HLO.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import EstimatorOptions
from jaxalgo.options import check_fields, option
from jaxalgo.parallel._comm import comm_report
from jaxalgo.parallel._daso import DasoConfig, DasoTrainState, daso, update_schedule, window_comm_report
from jaxalgo.parallel._data_parallel import data_parallel
from jaxalgo.parallel._forward_dp import Reduction
from jaxalgo.parallel._mesh import (
    check_divisible,
    local_batch_rows,
    make_mesh,
    parse_mesh_shape,
    place,
    replicate,
    shard,
    shard_local,
)
from jaxalgo.parallel._traffic import TrafficMeter
from jaxalgo.parallel.ab import (
    AB_AXES,
    ABConfig,
    ABTrainState,
    ab_program_report,
    ab_schedule,
    ab_training,
    check_ab_mesh,
    lr_factor,
)
from jaxalgo.parallel.ab._config import SyncMode
from jaxalgo.parallel.ab._schedule import Event, Phase
from jaxalgo.runner import Experiment, RunnerBase, make_train_step


def _host(tree: Any) -> Any:
    """A replicated global tree as host numpy arrays (works with several processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def data_mesh(text: str, devices: Sequence[jax.Device] | None = None):
    """The ``("node", "local")`` mesh of ``text`` (e.g. ``"2x4"``), or one node per process when empty."""
    shape = parse_mesh_shape(text) if text else None
    if shape is not None and len(shape) != 2:
        raise ValueError(f"mesh: expected two sizes such as '2x4', got {text!r}")
    return make_mesh(shape, devices=devices)


def group_mesh(text: str, sync_mode: SyncMode, devices: Sequence[jax.Device] | None = None):
    """AB-training's ``("group", "dp")`` mesh of ``text`` read as GROUPSxGROUP_SIZE (default: two groups)."""
    shape = parse_mesh_shape(text) if text else None
    if shape is not None and len(shape) != 2:
        raise ValueError(f"mesh: expected two sizes such as '2x4', got {text!r}")
    if shape is None:
        count = len(jax.devices() if devices is None else devices)
        if count % 2:
            raise ValueError(f"mesh: AB-training needs an even number of groups; {count} devices cannot form two")
        shape = (2, count // 2)
    mesh = make_mesh(shape, AB_AXES, devices=devices)
    check_ab_mesh(mesh, sync_mode)
    return mesh


class MeshRunner(RunnerBase):
    """What the multi-device runners share: the mesh, the run key replicated on it, metrics written by process 0
    only, and the bytes sent per step.

    Attributes:
      mesh: the device mesh the steps run on.
      run_key: the per-step key stream, replicated on the mesh.
      is_primary: whether this process writes metrics (process 0).
      batch_rows: with several processes, the contiguous rows of each global batch this process's devices hold
        when the batch is split over all mesh axes (:func:`jaxalgo.parallel.local_batch_rows`); ``None`` (all
        rows) in a single process.
    """

    def __init__(self, experiment: Experiment, mesh: Any):
        super().__init__(experiment)
        self.mesh = mesh
        self.run_key = replicate(experiment.run_key, mesh)
        self.is_primary = jax.process_index() == 0
        self.batch_rows = local_batch_rows(mesh, experiment.batch_size) if jax.process_count() > 1 else None
        self._traffic = TrafficMeter()

    def _place_batch(self, batch: Any) -> Any:
        """The host batch on the mesh, its leading dimension split over all axes: the whole global batch with
        :func:`jaxalgo.parallel.shard` in a single process; with several, this process's :attr:`batch_rows` of it
        (or the whole global batch, cut to them) with :func:`jaxalgo.parallel.shard_local`."""
        if self.batch_rows is None:
            return shard(batch, self.mesh)
        return shard_local(batch, self.mesh, self.experiment.batch_size)

    def _count_traffic_of(self, key: Any, program: Any, *args: Any) -> None:
        """Counts one run of the jitted ``program(*args)`` (its collectives measured on the first call with
        ``key``)."""
        measure = lambda: comm_report(program, *args, mesh=self.mesh)
        self._traffic.add_report(self._traffic.measured(key, measure))

    def record(self, state: Any) -> dict[str, Any]:
        """The bytes counted so far (the epoch's and the run's), so a resumed run reports the same figures."""
        del state
        return {"traffic": self._traffic.totals()}

    def load_record(self, record: dict[str, Any]) -> None:
        self._traffic.load(record.get("traffic"))

    def epoch_metrics(self) -> dict[str, Any]:
        """The bytes each device sent per step this epoch."""
        return self._traffic.metrics()

    def final_metrics(self) -> dict[str, Any]:
        """The bytes each device sent per step over the run."""
        return self._traffic.run_metrics()


class DataParallelRunner(MeshRunner):
    """DDP: the training step of :func:`jaxalgo.runner.make_train_step` on a data-parallel estimator.

    Attributes:
      train_step: the jit-compiled step ``(state, sharded batch, run_key) -> (state, loss)``.
    """

    def __init__(self, experiment: Experiment, options: DDPOptions):
        super().__init__(experiment, options.mesh_on())
        estimator = data_parallel(experiment.estimator, self.mesh, reduce=options.reduce)
        self.train_step = make_train_step(estimator, experiment.optimizer)

    def init(self, fresh: Any) -> Any:
        return replicate(fresh, self.mesh)

    def step(self, state: Any, batch: Any, index: int) -> tuple[Any, jax.Array]:
        del index
        batch = self._place_batch(batch)
        self._count_traffic_of("step", self.train_step, state, batch, self.run_key)
        self._traffic.end_step()
        return self.train_step(state, batch, self.run_key)

    def eval_params(self, state: Any) -> Any:
        return _host(state.params)


class DasoRunner(MeshRunner):
    """DASO: per-phase steps chosen on the host from the step index and the schedule kept in the state, and with
    ``config.program = "window"`` one window program from each send to its merge (:meth:`window`,
    :meth:`run_window`), so that the global average travels while the steps between them compute.

    Attributes:
      daso: the :class:`jaxalgo.parallel.Daso` programs (steps per phase, windows, consensus).
    """

    def __init__(self, experiment: Experiment, options: DasoOptions):
        super().__init__(experiment, options.mesh_on())
        self.config = options.config
        self.daso = daso(experiment.estimator, experiment.optimizer, self.mesh, self.config, reduce=options.reduce)
        self._steps_per_epoch = experiment.steps_per_epoch
        self._epochs = experiment.epochs
        self._schedule = None
        self._epoch_schedule = None
        self._phases: collections.Counter[str] = collections.Counter()
        self._mean = jax.jit(jnp.mean)
        self._step_means = jax.jit(lambda losses: tuple(jnp.mean(losses[:, k]) for k in range(losses.shape[1])))

    def init(self, fresh: Any) -> DasoTrainState:
        return self.daso.init(fresh.params)

    def _schedule_of(self, state: DasoTrainState):
        if self._schedule is None:
            self._schedule = _host(state.daso.schedule)
        return self._schedule

    def step(self, state: DasoTrainState, batch: Any, index: int) -> tuple[DasoTrainState, jax.Array]:
        phase = self.daso.phase(
            index, steps_per_epoch=self._steps_per_epoch, total_epochs=self._epochs, schedule=self._schedule_of(state)
        )
        if self._epoch_schedule is None:
            self._epoch_schedule = self._schedule
        self._phases[phase] += 1
        batch, step = self._place_batch(batch), self.daso.steps[phase]
        self._count_traffic_of(phase, step, state, batch, self.run_key)
        self._traffic.end_step()
        state, loss_per_node = step(state, batch, self.run_key)
        return state, self._mean(loss_per_node)

    def _window_length(self, index: int) -> int:
        """``S + 1`` if step ``index`` is a send whose merge lies in the same epoch, else 1 (the schedule's view)."""
        assert self._schedule is not None  # read from the state by after_step, before the first step
        return self.daso.window_length(
            index, steps_per_epoch=self._steps_per_epoch, total_epochs=self._epochs, schedule=self._schedule
        )

    def after_step(self, index: int, state: DasoTrainState) -> DasoTrainState:
        """Reads the schedule from the state once (the loop calls this before the first step, also after a resume),
        so that :meth:`window` knows it."""
        del index
        self._schedule_of(state)
        return state

    def window(self, index: int, remaining: int) -> int:
        """``S + 1`` (the steps from the send at ``index`` to its merge, run by :meth:`run_window`) with
        ``program = "window"`` when the window fits in the ``remaining`` steps of the epoch; else 1
        (:meth:`~jaxalgo.runner.Runner.step`)."""
        if self.config.program != "window" or self._schedule is None:
            return 1  # the schedule is not known before the state has been seen: that step runs alone
        length = self._window_length(index)
        return length if 1 < length <= remaining else 1

    def run_window(
        self, state: DasoTrainState, batches: list[Any], index: int
    ) -> tuple[DasoTrainState, list[jax.Array]]:
        """The ``len(batches)`` steps from step ``index``: the window program when they are exactly a send and the
        steps up to its merge (:meth:`window`'s answer), else one :meth:`~jaxalgo.runner.Runner.step` after the
        other (the same maths)."""
        length = self._window_length(index) if self._schedule is not None else 1
        if len(batches) < 2 or len(batches) != length:
            return super().run_window(state, batches, index)
        if self._epoch_schedule is None:
            self._epoch_schedule = self._schedule
        self._phases.update(["send", *["local"] * (length - 2), "merge"])
        batches = [self._place_batch(batch) for batch in batches]
        program = self.daso.window(length - 1)
        measure = lambda: window_comm_report(program, state, batches, self.run_key, mesh=self.mesh)
        self._traffic.add_report(self._traffic.measured(("window", length - 1), measure))
        for _ in range(length):
            self._traffic.end_step()
        state, loss_per_node = program(state, batches, self.run_key)
        return state, list(self._step_means(loss_per_node))

    def end_epoch(self, state: DasoTrainState, epoch: int, train_loss: float) -> DasoTrainState:
        """Updates the schedule from the epoch's mean loss, summed in the state (exact across a resume)."""
        del train_loss  # the loop's value covers only the steps since a resume
        loss_sum = multihost_utils.process_allgather(state.daso.loss_sum, tiled=True)
        epoch_loss = float(np.mean(loss_sum)) / self._steps_per_epoch
        schedule = update_schedule(
            self._schedule_of(state), epoch=epoch, train_loss=epoch_loss, total_epochs=self._epochs, config=self.config
        )
        self._schedule = _host(schedule)
        daso_state = state.daso._replace(
            schedule=replicate(schedule, self.mesh),
            loss_sum=place(jnp.zeros_like(loss_sum), self.mesh, P(self.daso.node_axis)),
        )
        return state._replace(daso=daso_state)

    def eval_params(self, state: DasoTrainState) -> Any:
        return _host(self.daso.consensus(state.params))

    def epoch_metrics(self) -> dict[str, Any]:
        """The schedule this epoch ran with, how many steps ran each phase and the bytes sent per step."""
        schedule = self._epoch_schedule
        record = {
            "daso_global_skip": None if schedule is None else int(schedule.global_skip),
            "daso_batches_to_wait": None if schedule is None else int(schedule.batches_to_wait),
            "daso_phases": dict(sorted(self._phases.items())),
            **self._traffic.metrics(),
        }
        self._phases.clear()
        self._epoch_schedule = None
        return record

    def record(self, state: DasoTrainState) -> dict[str, Any]:
        """The bytes counted so far and the epoch's steps per phase, so a resumed run reports the same figures."""
        return {**super().record(state), "daso_phases": dict(self._phases)}

    def load_record(self, record: dict[str, Any]) -> None:
        super().load_record(record)
        self._phases = collections.Counter(record.get("daso_phases", {}))


class ABRunner(MeshRunner):
    """AB-training: the host runs the schedule's transitions (sync, re-SVD) and picks each step's program.

    Attributes:
      ab: the :class:`jaxalgo.parallel.AB` programs (steps per phase, sync, factorize, consensus, sizes).
    """

    def __init__(self, experiment: Experiment, options: ABOptions):
        super().__init__(experiment, options.mesh_on())
        self.config = options.config
        self.ab = ab_training(
            experiment.estimator,
            experiment.optimizer,
            self.mesh,
            experiment.chain,
            experiment.init_params,
            self.config,
            lr=experiment.lr,
        )
        self._lr = experiment.lr
        self._counts: collections.Counter[str] = collections.Counter()
        self._state: ABTrainState | None = None
        self._mean = jax.jit(jnp.mean)

    def init(self, fresh: Any) -> ABTrainState:
        return self.ab.init(fresh.params)

    def record(self, state: ABTrainState) -> dict[str, Any]:
        """What a checkpoint needs beyond the arrays: the stored size of each layer's factors, the epoch's step
        counts and the bytes counted so far."""
        return {**super().record(state), "ab_sizes": self.ab.sizes(state), "ab_counts": dict(self._counts)}

    def load_record(self, record: dict[str, Any]) -> None:
        super().load_record(record)
        self._counts = collections.Counter(record.get("ab_counts", {}))

    def restore_target(self, record: dict[str, Any], fresh: ABTrainState) -> ABTrainState:
        """A state with the factor shapes the checkpoint was written with."""
        sizes = record.get("ab_sizes")
        if sizes is None or sizes == self.ab.sizes(fresh):
            return fresh
        return self.ab.resize(fresh, sizes)

    def _count_ab_traffic(self, program: Event | Phase, state: ABTrainState, batch: Any) -> None:
        """Counts one run of ``program`` at the state's factor sizes (measured once per program and sizes; a
        re-SVD moves no device traffic, see :func:`jaxalgo.parallel.ab_comm`)."""
        if program == "factorize":
            return
        key = (program, tuple(sorted(self.ab.sizes(state).items())))
        measure = lambda: ab_program_report(self.ab, program, state, batch, self.run_key)
        self._traffic.add_report(self._traffic.measured(key, measure))

    def step(self, state: ABTrainState, batch: Any, index: int) -> tuple[ABTrainState, jax.Array]:
        events, phase = ab_schedule(index, self.config)
        batch = self._place_batch(batch)
        for event in events:
            self._count_ab_traffic(event, state, batch)  # at the shapes the transition runs with
            state = self.ab.sync(state) if event == "sync" else self.ab.factorize(state)
            self._counts[event] += 1
        self._counts[phase] += 1
        self._count_ab_traffic(phase, state, batch)
        self._traffic.end_step()
        factor = lr_factor(index, self.config, self._lr)
        state, loss_per_group = self.ab.steps[phase](state, batch, self.run_key, factor)
        self._state = state
        return state, self._mean(loss_per_group)

    def eval_params(self, state: ABTrainState) -> Any:
        """The merged model: while the groups train their own factors, the result of a sync (state unchanged)."""
        step = int(jax.device_get(state.step))
        live = step > 0 and ab_schedule(step - 1, self.config)[1] == "group"
        return self.ab.consensus(state, live)

    def epoch_metrics(self) -> dict[str, Any]:
        """Steps per phase and transitions this epoch, the ranks, the compression ratio and the bytes per step."""
        record: dict[str, Any] = {"ab_counts": dict(sorted(self._counts.items())), **self._traffic.metrics()}
        self._counts.clear()
        if self._state is not None:
            ranks = jax.device_get(self._state.ranks)
            record["ab_ranks"] = {k: int(v) for k, v in ranks.items()}
            record["ab_compression_ratio"] = self.ab.compression(self._state)["compression_ratio"]
        return record


def _check_estimator(estimator: EstimatorOptions) -> None:
    if not type(estimator).data_parallel:
        raise ValueError(
            f"parallel: runs on one device only ({type(estimator).__name__}.data_parallel is False: its estimator "
            "state is per run); use --parallel none"
        )


class MeshStrategy:
    """What the multi-device strategies' options share: validation, the capability check and the runner.

    Subclasses are frozen dataclasses with a ``mesh`` field and set ``runner`` (the runner class, built as
    ``runner(experiment, options)``); AB-training overrides :meth:`mesh_on` for its group mesh.
    """

    single_device: ClassVar[bool] = False
    runner: ClassVar[type]
    mesh: str  # the subclasses' dataclass field

    def __post_init__(self):
        check_fields(self)

    def mesh_on(self, devices: Sequence[jax.Device] | None = None):
        return data_mesh(self.mesh, devices)

    def check(self, estimator: EstimatorOptions, *, batch_size: int, devices: Sequence[jax.Device]) -> None:
        _check_estimator(estimator)
        check_divisible(batch_size, self.mesh_on(devices))

    def make_runner(self, experiment: Experiment) -> MeshRunner:
        return self.runner(experiment, self)


@dataclasses.dataclass(frozen=True)
class DDPOptions(MeshStrategy):
    """DDP: per-shard estimates with the same key and one all-reduce per step (:func:`jaxalgo.parallel.data_parallel`).

    Attributes:
      mesh: devices as NODESxLOCAL, e.g. 2x4 (empty: one node per process); ab: GROUPSxGROUP_SIZE (empty: two
        groups); pipeline: the number of stages S, e.g. 4 (empty: 2, or 1 with a single device or block).
      reduce: what is all-reduced: auto (only the k directional derivatives for weight-perturbation forward
        gradients, else the gradients), directional or gradients.
    """

    mesh: str = ""
    reduce: Reduction = option("auto", flag="parallel_reduce")
    runner: ClassVar[type] = DataParallelRunner


@dataclasses.dataclass(frozen=True)
class DasoOptions(MeshStrategy):
    """DASO (Coquelin et al. 2022): node-local averaging every step, a stale global average every few steps.

    Attributes:
      mesh: devices as NODESxLOCAL, e.g. 2x4 (empty: one node per process).
      reduce: what the node-local average all-reduces: auto, directional or gradients (as for ddp).
      config: DASO's schedule, merge and wire (:class:`jaxalgo.parallel.DasoConfig`).
    """

    mesh: str = ""
    reduce: Reduction = option("auto", flag="parallel_reduce")
    config: DasoConfig = option(default_factory=DasoConfig, prefix="daso_")
    runner: ClassVar[type] = DasoRunner


@dataclasses.dataclass(frozen=True)
class ABOptions(MeshStrategy):
    """AB-training (Coquelin et al., arXiv 2405.01067) on a ``("group", "dp")`` mesh.

    Attributes:
      mesh: devices as GROUPSxGROUP_SIZE, e.g. 2x4 (empty: two groups).
      config: AB-training's schedule, sync and cut (:class:`jaxalgo.parallel.ABConfig`).
    """

    mesh: str = ""
    config: ABConfig = option(default_factory=ABConfig, prefix="ab_")
    runner: ClassVar[type] = ABRunner

    def mesh_on(self, devices: Sequence[jax.Device] | None = None):
        return group_mesh(self.mesh, self.config.sync_mode, devices)


__all__ = [
    "ABOptions",
    "ABRunner",
    "DDPOptions",
    "DasoOptions",
    "DasoRunner",
    "DataParallelRunner",
    "MeshRunner",
    "MeshStrategy",
    "data_mesh",
    "group_mesh",
]
