"""Pipeline-parallel training on a ``("stage",)`` mesh: F3 / DRTP / last-layer-only stages that update as data
streams through, and the GPipe backprop baseline."""

from jaxalgo.parallel.pipeline._feedback import (
    SIGNAL_BEFORE_FORWARD,
    FeedbackPipeline,
    FeedbackPipelineState,
    InFlight,
    PipelineOutput,
    feedback_pipeline,
    finished_losses,
    mean_loss,
    refuse_update_locked,
    stale_reads,
)
from jaxalgo.parallel.pipeline._gpipe import GPipe, GPipeOutput, GPipeState, gpipe
from jaxalgo.parallel.pipeline._layout import (
    STAGE_AXIS,
    Packing,
    StageLayout,
    StageSplit,
    balanced_split,
    split_stages,
)
from jaxalgo.parallel.pipeline._schedule import (
    feedback_idle_fraction,
    gpipe_idle_fraction,
    idle_ticks,
    schedule_chart,
)
from jaxalgo.parallel.pipeline._stages import check_microbatches, num_stages_of, stage_mesh
from jaxalgo.parallel.pipeline._strategy import PIPELINE_FORMS, PipelineOptions, PipelineRunner, pipeline_form

__all__ = [
    "PIPELINE_FORMS",
    "SIGNAL_BEFORE_FORWARD",
    "STAGE_AXIS",
    "FeedbackPipeline",
    "FeedbackPipelineState",
    "GPipe",
    "GPipeOutput",
    "GPipeState",
    "InFlight",
    "Packing",
    "PipelineOptions",
    "PipelineOutput",
    "PipelineRunner",
    "StageLayout",
    "StageSplit",
    "balanced_split",
    "check_microbatches",
    "feedback_idle_fraction",
    "feedback_pipeline",
    "finished_losses",
    "gpipe",
    "gpipe_idle_fraction",
    "idle_ticks",
    "mean_loss",
    "num_stages_of",
    "pipeline_form",
    "refuse_update_locked",
    "schedule_chart",
    "split_stages",
    "stage_mesh",
    "stale_reads",
]
