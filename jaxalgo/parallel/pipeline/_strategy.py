"""The pipeline as a strategy of the training loop: ``jaxalgo train --parallel pipeline --mesh S --microbatches M``.

An estimator runs on the pipeline if its options class declares how (the ``pipeline`` ClassVar, never its name):
``"feedback"`` (:class:`jaxalgo.grads.FeedbackOptions`: F3, DRTP, last-layer-only; every stage updates on its own,
the pipeline never flushes) or ``"backprop"`` (GPipe: forward wave, backward wave, one update, flush). DFA is a
feedback variant whose signal is the current output's error, so it is refused (update locking), as is every
estimator without a pipeline form (FA and the forward-gradient estimators, whose block updates need the later
blocks).

One training step is one call of the pipeline: ``M`` microbatches of ``batch_size / M`` examples. For the feedback
pipeline that is ``M`` parameter updates per stage; the microbatches in flight stay in the state (a checkpoint saves
them, so a run resumed mid-epoch continues exactly), and the pipeline drains in the last step of every epoch, so the
run is exactly the single-device run with batch size ``batch_size / M``. (Keeping it full across epochs, the
library's ``run(..., drain=False)``, is not offered here: where the run drains would depend on ``--epochs``, which a
resumed run may change.) The loss of a step is the mean loss of the microbatches that left the last stage during it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxalgo.grads import EstimatorOptions, FeedbackOptions
from jaxalgo.options import check_fields, option
from jaxalgo.parallel._comm import CommReport, comm_report
from jaxalgo.parallel._strategies import MeshRunner
from jaxalgo.parallel.pipeline._feedback import SIGNAL_BEFORE_FORWARD, FeedbackPipeline, feedback_pipeline, mean_loss
from jaxalgo.parallel.pipeline._gpipe import GPipe, GPipeOutput, gpipe
from jaxalgo.parallel.pipeline._schedule import idle_ticks
from jaxalgo.parallel.pipeline._stages import check_microbatches, stage_mesh
from jaxalgo.runner import Experiment

PIPELINE_FORMS: tuple[str, ...] = ("feedback", "backprop")
"""The values an estimator options class may declare as its ``pipeline`` ClassVar."""

_INSTEAD = (
    "use f3 (the stored error of the previous visit), drtp (the target) or llo, or backprop for the GPipe baseline"
)


def pipeline_form(estimator: EstimatorOptions) -> str | None:
    """How ``estimator`` runs on the pipeline (its options class's ``pipeline`` ClassVar), or None."""
    form = getattr(type(estimator), "pipeline", None)
    return form if form in PIPELINE_FORMS else None


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Pipeline parallelism over a ("stage",) mesh: the chain's blocks cut into stages balanced by parameter count.

    Attributes:
      mesh: devices as NODESxLOCAL, e.g. 2x4 (empty: one node per process); ab: GROUPSxGROUP_SIZE (empty: two
        groups); pipeline: the number of stages S, e.g. 4 (empty: 2, or 1 with a single device or block).
      microbatches: pipeline: microbatches per step M; each holds batch_size / M examples (for f3, drtp and llo a
        stage updates on every microbatch and the pipeline drains once per epoch; for backprop, GPipe accumulates
        over the M and flushes every step).
    """

    mesh: str = ""
    microbatches: int = option(4, flag="microbatches")

    single_device: ClassVar[bool] = False

    def __post_init__(self):
        check_fields(self)
        if self.microbatches < 1:
            raise ValueError(f"microbatches: got {self.microbatches}; allowed: an integer >= 1")
        if self.mesh:
            self.num_stages(None)

    def num_stages(self, devices: Sequence[jax.Device] | None, num_blocks: int | None = None) -> int:
        """``S`` from ``mesh`` (default: 2, or fewer with one device or one block)."""
        if not self.mesh:
            count = len(jax.devices() if devices is None else devices)
            return max(1, min(2, count, num_blocks or 2))
        text = self.mesh.strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(
                f"mesh: the pipeline takes one size, its number of stages (e.g. 4); got {self.mesh!r}; allowed: an "
                "integer >= 1"
            )
        stages = int(text)
        if devices is not None and stages > len(devices):
            raise ValueError(f"mesh: {stages} stages need {stages} devices, {len(devices)} are available")
        return stages

    def check(self, estimator: EstimatorOptions, *, batch_size: int, devices: Sequence[jax.Device]) -> None:
        """Refuses estimators without a pipeline form or with update locking, and batch, stage and microbatch
        counts that do not fit."""
        form = pipeline_form(estimator)
        if form is None or (form == "feedback") != isinstance(estimator, FeedbackOptions):
            raise ValueError(
                "parallel: has no pipeline form: its update of a block needs the later blocks (a backward pass "
                "through the later stages, or the whole model at once), so a stage cannot update on its own; "
                + _INSTEAD
            )
        if isinstance(estimator, FeedbackOptions) and estimator.variant not in SIGNAL_BEFORE_FORWARD:
            raise ValueError(
                f"parallel: feeds back the current output's error (variant {estimator.variant!r}), so no stage can "
                "update before its microbatch has left the last stage (update locking: the pipeline would stall "
                "as a backward pass does); " + _INSTEAD
            )
        stages = self.num_stages(devices)
        check_microbatches(batch_size, self.microbatches)
        if form == "feedback" and self.microbatches < stages:
            raise ValueError(
                f"microbatches: got {self.microbatches} with {stages} stages; allowed: at least {stages} (so that "
                "every step finishes a microbatch, whose loss the step reports)"
            )

    def make_runner(self, experiment: Experiment) -> PipelineRunner:
        return PipelineRunner(experiment, self)


class PipelineRunner(MeshRunner):
    """The feedback pipeline or GPipe in the training loop; see the module docstring.

    Attributes:
      pipe: the :class:`jaxalgo.parallel.pipeline.FeedbackPipeline` or :class:`jaxalgo.parallel.pipeline.GPipe`.
      form: ``"feedback"`` or ``"backprop"``.
    """

    def __init__(self, experiment: Experiment, options: PipelineOptions):
        options.check(experiment.estimator_options, batch_size=experiment.batch_size, devices=jax.devices())
        num_blocks = experiment.chain.num_blocks
        stages = options.num_stages(jax.devices(), num_blocks)
        if stages > num_blocks:
            raise ValueError(
                f"mesh: {stages} stages for a model of {num_blocks} blocks; allowed: 1 to {num_blocks} (each stage "
                "holds at least one whole block)"
            )
        super().__init__(experiment, stage_mesh(stages))
        self.batch_rows = None  # every process builds the whole batch; it is replicated on the stages
        estimator = experiment.estimator_options
        self.form = pipeline_form(estimator)
        self.options = options
        size = check_microbatches(experiment.batch_size, options.microbatches)
        common = dict(params=experiment.init_params, num_microbatches=options.microbatches, microbatch_size=size)
        self.pipe: FeedbackPipeline | GPipe
        if isinstance(estimator, FeedbackOptions):
            self.pipe = feedback_pipeline(experiment.problem, estimator, experiment.optimizer, self.mesh, **common)
        else:
            self.pipe = gpipe(experiment.problem, experiment.optimizer, self.mesh, **common)
        self._steps_per_epoch = experiment.steps_per_epoch
        self._ticks = {"epoch": [0, 0], "run": [0, 0]}  # idle and total stage-ticks
        self._per_microbatch = 0
        self._executables: dict[str, tuple[Any, CommReport]] = {}  # per program: compiled, its collectives

    def init(self, fresh: Any) -> Any:
        if isinstance(self.pipe, FeedbackPipeline):
            return self.pipe.init(fresh.params, fresh.estimator_state)
        return self.pipe.init(fresh.params)

    def _drains(self, index: int) -> bool:
        """Whether step ``index`` is its epoch's last, which drains the feedback pipeline."""
        return (index + 1) % self._steps_per_epoch == 0

    def _program(self, index: int) -> tuple[Any, int, str]:
        """The jitted call step ``index`` runs, its ticks, and its key among the compiled programs."""
        if isinstance(self.pipe, FeedbackPipeline):
            drain = self._drains(index)
            ticks = self.pipe.ticks(drain=drain)
            return self.pipe.program(drain=drain), ticks, f"feedback, {ticks} ticks"  # one program with one stage
        return self.pipe.program(), self.pipe.ticks(), "step"

    def _compiled(self, key: str, program: Any, state: Any, placed: Any) -> tuple[Any, CommReport]:
        """``program`` compiled once for these arguments, and the collectives of that compiled program (one
        compilation serves the traffic report and the steps; calling the jitted program would compile it again)."""
        if key not in self._executables:
            lowered = program.lower(state, placed)
            self._executables[key] = (lowered.compile(), comm_report(lowered, mesh=self.mesh))
        return self._executables[key]

    def step(self, state: Any, batch: Any, index: int) -> tuple[Any, jax.Array]:
        self.pipe.check_batch(batch)
        placed = self.pipe.place_batch(batch)
        program, ticks, key = self._program(index)
        executable, report = self._compiled(key, program, state, placed)
        # every collective sits in the tick loops: it runs once per tick and carries one microbatch
        self._per_microbatch = report.total(requested=True)
        self._traffic.add(self._per_microbatch * ticks, report.requested_cross_node_bytes * ticks)
        self._traffic.end_step()
        state, output = executable(state, placed)
        masks = [output.busy, *([output.backward_busy] if isinstance(output, GPipeOutput) else [])]
        idle, total = idle_ticks(masks)
        for counts in self._ticks.values():
            counts[0] += idle
            counts[1] += total
        return state, jnp.asarray(mean_loss(output), jnp.float32)

    def eval_params(self, state: Any) -> Any:
        return self.pipe.block_params(state)

    def _figures(self, scope: str) -> dict[str, Any]:
        idle, total = self._ticks[scope]
        return {
            "pipeline_stages": self.pipe.num_stages,
            "pipeline_split": [list(b) for b in self.pipe.split.bounds],
            "pipeline_microbatch_size": self.pipe.microbatch_size,
            "pipeline_idle_fraction": idle / total if total else None,
            "pipeline_bytes_per_microbatch": self._per_microbatch,
        }

    def epoch_metrics(self) -> dict[str, Any]:
        """The stages, the split, the idle share of the epoch's stage-ticks and the bytes each device sent."""
        record = {**self._figures("epoch"), **super().epoch_metrics()}
        self._ticks["epoch"] = [0, 0]
        return record

    def final_metrics(self) -> dict[str, Any]:
        return {**self._figures("run"), **super().final_metrics()}

    def record(self, state: Any) -> dict[str, Any]:
        ticks = {k: list(v) for k, v in self._ticks.items()}
        return {**super().record(state), "pipeline_ticks": ticks, "pipeline_bytes_per_microbatch": self._per_microbatch}

    def load_record(self, record: dict[str, Any]) -> None:
        super().load_record(record)
        ticks = record.get("pipeline_ticks")
        if ticks:
            self._ticks = {k: [int(v) for v in ticks[k]] for k in ("epoch", "run")}
        self._per_microbatch = int(record.get("pipeline_bytes_per_microbatch", 0))


__all__ = ["PIPELINE_FORMS", "PipelineOptions", "PipelineRunner", "pipeline_form"]
