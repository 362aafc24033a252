"""How the training loop runs a step: on one device, data-parallel (DDP) or with DASO.

``jaxalgo.train`` asks :func:`make_runner` for a runner and then only calls its hooks, so the loop itself is the
same for all three:

- ``init(fresh_state)``: the train state placed where the step expects it (also the target checkpoints are
  restored into, so DASO's in-flight average and schedule are saved and restored with everything else);
- ``step(state, batch, step_index) -> (state, loss)``: one training step (DASO picks its phase from the index);
- ``end_epoch(state, epoch, train_loss) -> state``: DASO's plateau-driven schedule update;
- ``eval_params(state)``: the parameters to evaluate, on the host (DASO: the average over nodes);
- ``epoch_metrics()``: extra fields for the epoch's metrics line (DASO: the schedule and the phases run; every
  data-parallel runner: the bytes each device sent per step, see :mod:`jaxalgo.parallel._traffic`);
- ``final_metrics()``: extra fields for the final line (the bytes per step over the run).

In a multi-process run every process iterates the same global batches and keeps the pieces for its own devices;
only process 0 writes metrics.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from jaxalgo.config import TrainConfig
from jaxalgo.parallel._ab import (
    AB_AXES,
    ABConfig,
    ABTrainState,
    ab_program_report,
    ab_schedule,
    ab_training,
    check_ab_mesh,
    lr_factor,
)
from jaxalgo.parallel._comm import comm_report
from jaxalgo.parallel._daso import DasoConfig, DasoTrainState, daso, update_schedule
from jaxalgo.parallel._data_parallel import data_parallel
from jaxalgo.parallel._forward_dp import REDUCTIONS
from jaxalgo.parallel._mesh import check_divisible, make_mesh, parse_mesh_shape, place, replicate, shard
from jaxalgo.parallel._traffic import TrafficMeter

PARALLEL_MODES: tuple[str, ...] = ("none", "ddp", "daso", "ab")


def daso_config_from(config: TrainConfig) -> DasoConfig:
    """The :class:`DasoConfig` of a run's ``daso_*`` fields (validated by its constructor)."""
    return DasoConfig(
        global_skip=config.daso_global_skip,
        batches_to_wait=config.daso_batches_to_wait,
        warmup_epochs=config.daso_warmup_epochs,
        cooldown_epochs=config.daso_cooldown_epochs,
        merge_weight=config.daso_merge_weight,
        max_global_skip=config.daso_max_global_skip,
        comm_dtype=config.daso_comm_dtype,
        sharded=config.daso_sharded,
        adaptive=config.daso_adaptive,
    )


def ab_config_from(config: TrainConfig) -> ABConfig:
    """The :class:`ABConfig` of a run's ``ab_*`` fields (validated by its constructor)."""
    return ABConfig(
        warmup_steps=config.ab_warmup_steps,
        steps_between_syncs=config.ab_steps_between_syncs,
        ddp_steps_after_sync=config.ab_ddp_steps_after_sync,
        sync_mode=config.ab_sync_mode,
        cutoff=config.ab_cutoff,
        lr_rebound_steps=config.ab_lr_rebound_steps,
        bucket_ratio=config.ab_bucket_ratio,
    )


def mesh_for(config: TrainConfig):
    """The mesh of a run: ``config.mesh`` (e.g. ``"2x4"``) or one node per process; ``("node", "local")`` axes.

    AB-training (``parallel="ab"``) reads the mesh as GROUPSxGROUP_SIZE with axes ``("group", "dp")``; its default
    is two groups.
    """
    shape = parse_mesh_shape(config.mesh) if config.mesh else None
    if shape is not None and len(shape) != 2:
        raise ValueError(f"mesh: expected two sizes such as '2x4', got {config.mesh!r}")
    if config.parallel == "ab":
        if shape is None:
            count = len(jax.devices())
            if count % 2:
                raise ValueError(f"mesh: AB-training needs an even number of groups; {count} devices cannot form two")
            shape = (2, count // 2)
        mesh = make_mesh(shape, AB_AXES)
        check_ab_mesh(mesh, config.ab_sync_mode)
        return mesh
    return make_mesh(shape)


def check_parallel_config(config: TrainConfig) -> None:
    """Raises ValueError (naming the field) for a parallel configuration that cannot run on these devices."""
    if config.parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel: unknown mode {config.parallel!r}; allowed: {', '.join(PARALLEL_MODES)}")
    if config.parallel == "none":
        if config.mesh:
            raise ValueError(f"mesh: {config.mesh!r} is given but parallel is 'none'; use --parallel ddp or daso")
        return
    if config.parallel_reduce not in REDUCTIONS:
        raise ValueError(
            f"parallel_reduce: unknown reduction {config.parallel_reduce!r}; allowed: {', '.join(REDUCTIONS)}"
        )
    mesh = mesh_for(config)
    check_divisible(config.batch_size, mesh)
    if config.parallel == "daso":
        daso_config_from(config)
    if config.parallel == "ab":
        ab_config_from(config)


class SingleDeviceRunner:
    """The plain jit-compiled step of :func:`jaxalgo.train.make_train_step`."""

    is_primary = True

    def __init__(self, experiment: Any):
        from jaxalgo.train import make_train_step

        self.train_step = make_train_step(experiment.estimator, experiment.optimizer)
        self.run_key = experiment.run_key

    def init(self, fresh: Any) -> Any:
        return fresh

    def step(self, state: Any, batch: Any, step_index: int) -> tuple[Any, jax.Array]:
        del step_index
        return self.train_step(state, batch, self.run_key)

    def end_epoch(self, state: Any, epoch: int, train_loss: float) -> Any:
        return state

    def eval_params(self, state: Any) -> Any:
        return state.params

    def epoch_metrics(self) -> dict[str, Any]:
        return {}

    def final_metrics(self) -> dict[str, Any]:
        return {}


def _host(tree: Any) -> Any:
    """A replicated global tree as host numpy arrays (works with several processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


class _MeshRunner:
    """What the multi-device runners share: the mesh of ``config.mesh``, the run key replicated on it, metrics
    written by process 0 only, and the bytes sent per step (:class:`~jaxalgo.parallel._traffic.TrafficMeter`)."""

    def __init__(self, experiment: Any):
        self.mesh = mesh_for(experiment.config)
        self.run_key = replicate(experiment.run_key, self.mesh)
        self.is_primary = jax.process_index() == 0
        self._traffic = TrafficMeter()

    def _count_traffic_of(self, key: Any, program: Any, *args: Any) -> None:
        """Counts one run of the jitted ``program(*args)`` (its collectives measured on the first call with
        ``key``)."""
        measure = lambda: comm_report(program, *args, mesh=self.mesh)
        self._traffic.add_report(self._traffic.measured(key, measure))

    def end_epoch(self, state: Any, epoch: int, train_loss: float) -> Any:
        return state

    def epoch_metrics(self) -> dict[str, Any]:
        """The bytes each device sent per step this epoch."""
        return self._traffic.metrics()

    def final_metrics(self) -> dict[str, Any]:
        """The bytes each device sent per step over the run."""
        return self._traffic.run_metrics()


class DataParallelRunner(_MeshRunner):
    """DDP: the training step of :func:`jaxalgo.train.make_train_step` on a data-parallel estimator.

    For weight-perturbation forward gradients (``estimator.split`` set) the step all-reduces only the ``k``
    directional derivatives and the loss (``config.parallel_reduce = "auto"``); ``"gradients"`` forces the ordinary
    gradient all-reduce.
    """

    def __init__(self, experiment: Any):
        from jaxalgo.train import make_train_step

        super().__init__(experiment)
        estimator = data_parallel(experiment.estimator, self.mesh, reduce=experiment.config.parallel_reduce)
        self.train_step = make_train_step(estimator, experiment.optimizer)

    def init(self, fresh: Any) -> Any:
        return replicate(fresh, self.mesh)

    def step(self, state: Any, batch: Any, step_index: int) -> tuple[Any, jax.Array]:
        del step_index
        batch = shard(batch, self.mesh)
        self._count_traffic_of("step", self.train_step, state, batch, self.run_key)
        self._traffic.end_step()
        return self.train_step(state, batch, self.run_key)

    def eval_params(self, state: Any) -> Any:
        return _host(state.params)


class DasoRunner(_MeshRunner):
    """DASO: per-phase steps chosen on the host from the step index and the schedule kept in the state."""

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        config = experiment.config
        self.config = daso_config_from(config)
        self.daso = daso(
            experiment.estimator, experiment.optimizer, self.mesh, self.config, reduce=config.parallel_reduce
        )
        self._steps_per_epoch = experiment.steps_per_epoch
        self._epochs = config.epochs
        self._schedule = None
        self._epoch_schedule = None
        self._phases: collections.Counter[str] = collections.Counter()
        self._mean = jax.jit(jnp.mean)

    def init(self, fresh: Any) -> DasoTrainState:
        return self.daso.init(fresh.params)

    def _schedule_of(self, state: DasoTrainState):
        if self._schedule is None:
            self._schedule = _host(state.daso.schedule)
        return self._schedule

    def step(self, state: DasoTrainState, batch: Any, step_index: int) -> tuple[DasoTrainState, jax.Array]:
        phase = self.daso.phase(
            step_index,
            steps_per_epoch=self._steps_per_epoch,
            total_epochs=self._epochs,
            schedule=self._schedule_of(state),
        )
        if not self._phases:
            self._epoch_schedule = self._schedule
        self._phases[phase] += 1
        batch, step = shard(batch, self.mesh), self.daso.steps[phase]
        self._count_traffic_of(phase, step, state, batch, self.run_key)
        self._traffic.end_step()
        state, loss_per_node = step(state, batch, self.run_key)
        return state, self._mean(loss_per_node)

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
        return record


class ABRunner(_MeshRunner):
    """AB-training: the host runs the schedule's transitions (sync, re-SVD) and picks each step's program."""

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        config = experiment.config
        self.config = ab_config_from(config)
        self.ab = ab_training(
            experiment.estimator,
            experiment.optimizer,
            self.mesh,
            experiment.chain,
            experiment.init_params,
            self.config,
            lr=config.lr,
        )
        self._lr = config.lr
        self._counts: collections.Counter[str] = collections.Counter()
        self._state: ABTrainState | None = None
        self._mean = jax.jit(jnp.mean)

    def init(self, fresh: Any) -> ABTrainState:
        return self.ab.init(fresh.params)

    def record(self, state: ABTrainState) -> dict[str, Any]:
        """What a checkpoint needs beyond the arrays: the stored size of each layer's factors."""
        return {"ab_sizes": self.ab.sizes(state)}

    def restore_target(self, record: dict[str, Any], fresh: ABTrainState) -> ABTrainState:
        """A state with the factor shapes the checkpoint was written with."""
        sizes = record.get("ab_sizes")
        if sizes is None or sizes == self.ab.sizes(fresh):
            return fresh
        return self.ab.resize(fresh, sizes)

    def _count_ab_traffic(self, program: str, state: ABTrainState, batch: Any) -> None:
        """Counts one run of ``program`` at the state's factor sizes (measured once per program and sizes; a
        re-SVD moves no device traffic, see :func:`jaxalgo.parallel.ab_comm`)."""
        if program == "factorize":
            return
        key = (program, tuple(sorted(self.ab.sizes(state).items())))
        measure = lambda: ab_program_report(self.ab, program, state, batch, self.run_key)
        self._traffic.add_report(self._traffic.measured(key, measure))

    def step(self, state: ABTrainState, batch: Any, step_index: int) -> tuple[ABTrainState, jax.Array]:
        events, phase = ab_schedule(step_index, self.config)
        batch = shard(batch, self.mesh)
        for event in events:
            self._count_ab_traffic(event, state, batch)  # at the shapes the transition runs with
            state = self.ab.sync(state) if event == "sync" else self.ab.factorize(state)
            self._counts[event] += 1
        self._counts[phase] += 1
        self._count_ab_traffic(phase, state, batch)
        self._traffic.end_step()
        factor = lr_factor(step_index, self.config, self._lr)
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


def make_runner(experiment: Any) -> SingleDeviceRunner | DataParallelRunner | DasoRunner | ABRunner:
    """The runner for ``experiment.config.parallel``: ``"none"``, ``"ddp"``, ``"daso"`` or ``"ab"``."""
    mode = experiment.config.parallel
    if mode == "ab":
        return ABRunner(experiment)
    if mode == "ddp":
        return DataParallelRunner(experiment)
    if mode == "daso":
        return DasoRunner(experiment)
    return SingleDeviceRunner(experiment)


__all__ = [
    "PARALLEL_MODES",
    "ABRunner",
    "DasoRunner",
    "DataParallelRunner",
    "SingleDeviceRunner",
    "ab_config_from",
    "check_parallel_config",
    "daso_config_from",
    "make_runner",
    "mesh_for",
]
