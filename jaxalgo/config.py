"""The run configuration shared by the CLI and :func:`jaxalgo.train.train_and_evaluate`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "momentum")
TANGENT_DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher", "rank1")

# Fields that may differ between a checkpointed run and the run that resumes it: they do not change what
# a step computes.
RESUMABLE_FIELDS: frozenset[str] = frozenset(
    {"epochs", "quiet", "checkpoint_every", "keep_checkpoints", "data_dir", "log_every"}
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Every field has a default that trains digits well.

    Attributes:
      model: model name, one of ``jaxalgo.models.MODELS``.
      dataset: dataset name, one of ``jaxalgo.data.DATASETS``.
      data_dir: directory with a user's local files (MNIST IDX, CIFAR-10 batches); unused for bundled sets.
      estimator: gradient estimator name, one of ``jaxalgo.estimators.ESTIMATORS``.
      optimizer: optax optimizer, one of :data:`OPTIMIZERS`.
      lr: learning rate (> 0).
      weight_decay: decoupled weight decay (adamw) or L2 added to the update (other optimizers); >= 0.
      epochs: number of passes over the training split (>= 1).
      batch_size: examples per step (1 <= batch_size <= training examples); the last partial batch is dropped.
      seed: seeds the model init, the data order and every step's key.
      hidden: MLP hidden widths.
      activation: MLP activation.
      vit_dim: ViT token width (4 attention heads, MLP width ``2 * vit_dim``); a positive multiple of 4.
      vit_depth: ViT Transformer blocks (>= 1).
      loss: output loss, one of ``jaxalgo.losses.LOSSES``, or "auto" (cross-entropy / MSE by task).
      test_fraction: held-out fraction for the bundled data sets.
      checkpoint_every: save a checkpoint every this many steps (0: at the end of each epoch only).
      keep_checkpoints: how many checkpoints to keep.
      log_every: steps between progress-bar updates (and finite-loss checks).
      quiet: no progress bar and no table.
      lowrank: low-rank training method, "none" or "oialr" (see :mod:`jaxalgo.lowrank`).
      lowrank_delay: OIALR full-rank warm-up steps before conversion (>= 0).
      lowrank_frequency: steps between OIALR stability checks (>= 1).
      lowrank_cutoff: OIALR relative singular-value cutoff, in (0, 1).
      lowrank_bucket_ratio: cut layers stay zero-padded until the stored factors exceed this ratio times the live
        ones, then all are compacted (>= 1; 1 = exact shapes, a re-compilation per cut).
      lowrank_rotate_moments: rotate the optimizer moments of S with the bases at each stability check.
      parallel: data parallelism: "none" (one device), "ddp" (gradient all-reduce every step), "daso" or "ab".
      mesh: devices as NODESxLOCAL, e.g. "2x4" (default with ddp/daso: one node per process; with ab: GROUPSxGROUP_SIZE,
        default two groups).
      parallel_reduce: what ddp (and DASO's node-local average) all-reduces: "auto" (only the k directional
        derivatives for weight-perturbation forward gradients, else the gradients), "directional" or "gradients".
      daso_global_skip: DASO steps between global averages after the warm-up (>= 1).
      daso_batches_to_wait: DASO's S, steps until a global average is merged (0 <= S < daso_global_skip).
      daso_warmup_epochs: DASO epochs with a blocking global average every step at the start.
      daso_cooldown_epochs: the same at the end.
      daso_merge_weight: w of DASO's merge (w S theta_local + sum theta_stale) / (w S + P).
      daso_max_global_skip: global_skip after a plateau at global_skip 1.
      daso_comm_dtype: wire dtype of DASO's global average (bfloat16, float16, float32).
      daso_sharded: Horovod-style sharded global average (cross-node bytes / devices per node).
      daso_adaptive: adapt global_skip and S on plateaus of the epoch loss.
      ab_warmup_steps: AB-training: full-rank data-parallel steps before the first group phase (>= 0).
      ab_steps_between_syncs: AB-training: steps per cycle (sync, data-parallel steps, re-SVD, group phase).
      ab_ddp_steps_after_sync: AB-training: full-rank data-parallel steps after each sync (<= steps between syncs).
      ab_sync_mode: AB-training sync: "full", "with-stale", "only-learned" or "only-b".
      ab_cutoff: AB-training rank cut: keep singular values >= cutoff * s_0, in (0, 1).
      ab_lr_rebound_steps: AB-training: steps of the learning-rate ramp after each transition (0: none).
      ab_bucket_ratio: AB-training: ratio of the zero-padded rank buckets (1 = exact shapes).
      tangents: number of tangents k of the forward-gradient estimators (>= 1).
      f3_variant: the error F3 feeds back, one of ``jaxalgo.grads.F3_VARIANTS`` (estimator f3).
      feedback_init: initialisation of the fixed feedback matrices of f3, dfa, drtp, fa and llo, one of
        ``jaxalgo.grads.FEEDBACK_INITS``.
      feedback_mode: "per_block" (each block's update right after its forward) or "surrogate" (one pure
        objective); the same updates (f3, dfa, drtp, llo).
      feedback_reduction: "sum" (the F3 reference's) or "mean" over the batch for hidden blocks' updates.
      tangent_dist: tangent distribution of ``fg`` / ``frog``, one of :data:`TANGENT_DISTRIBUTIONS` (``fg-rank1`` /
        ``frog-rank1`` are ``fg`` / ``frog`` with ``rank1``).
    """

    model: str = "mlp"
    dataset: str = "digits"
    data_dir: str | None = None
    estimator: str = "backprop"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    vit_dim: int = 64
    vit_depth: int = 2
    loss: str = "auto"
    test_fraction: float = 0.2
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    quiet: bool = False
    lowrank: str = "none"
    lowrank_delay: int = 100
    lowrank_frequency: int = 20
    lowrank_cutoff: float = 0.15
    lowrank_bucket_ratio: float = 1.25
    lowrank_rotate_moments: bool = False
    parallel: str = "none"
    mesh: str = ""
    parallel_reduce: str = "auto"
    daso_global_skip: int = 4
    daso_batches_to_wait: int = 1
    daso_warmup_epochs: int = 4
    daso_cooldown_epochs: int = 4
    daso_merge_weight: float = 2.0
    daso_max_global_skip: int = 8
    daso_comm_dtype: str = "bfloat16"
    daso_sharded: bool = False
    daso_adaptive: bool = True
    ab_warmup_steps: int = 50
    ab_steps_between_syncs: int = 20
    ab_ddp_steps_after_sync: int = 1
    ab_sync_mode: str = "full"
    ab_cutoff: float = 0.15
    ab_lr_rebound_steps: int = 5
    ab_bucket_ratio: float = 1.25
    tangents: int = 16
    f3_variant: str = "delayed_error"
    feedback_init: str = "kaiming_uniform"
    feedback_mode: str = "per_block"
    feedback_reduction: str = "sum"
    tangent_dist: str = "gaussian"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; allowed: {sorted(names)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)

    def fingerprint(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed by this config."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def validate_config(config: TrainConfig) -> None:
    """Checks the fields that need no data or model to be checked; raises ValueError naming the field."""
    from jaxalgo import losses

    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown optimizer {config.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    if not (isinstance(config.lr, int | float) and config.lr > 0):
        raise ValueError(f"lr: must be a number > 0, got {config.lr!r}")
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay: must be >= 0, got {config.weight_decay!r}")
    if not (isinstance(config.epochs, int) and config.epochs >= 1):
        raise ValueError(f"epochs: must be an integer >= 1, got {config.epochs!r}")
    if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
        raise ValueError(f"batch_size: must be an integer >= 1, got {config.batch_size!r}")
    if (
        isinstance(config.vit_dim, bool)
        or not isinstance(config.vit_dim, int)
        or config.vit_dim < 4
        or config.vit_dim % 4
    ):
        raise ValueError(f"vit_dim: must be a positive multiple of 4 (4 attention heads), got {config.vit_dim!r}")
    if isinstance(config.vit_depth, bool) or not isinstance(config.vit_depth, int) or config.vit_depth < 1:
        raise ValueError(f"vit_depth: must be an integer >= 1, got {config.vit_depth!r}")
    if config.loss != "auto" and config.loss not in losses.LOSSES:
        raise ValueError(f"loss: unknown loss {config.loss!r}; allowed: auto, {', '.join(losses.LOSSES)}")
    if config.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: must be >= 0 (0 = every epoch), got {config.checkpoint_every!r}")
    if config.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints: must be >= 1, got {config.keep_checkpoints!r}")
    if config.log_every < 1:
        raise ValueError(f"log_every: must be >= 1, got {config.log_every!r}")
    if config.lowrank != "none" and config.parallel != "none":
        raise ValueError(f"lowrank: {config.lowrank!r} runs on one device only; got parallel={config.parallel!r}")
    if isinstance(config.tangents, bool) or not isinstance(config.tangents, int) or config.tangents < 1:
        raise ValueError(f"tangents: must be an integer >= 1, got {config.tangents!r}")
    if config.tangent_dist not in TANGENT_DISTRIBUTIONS:
        raise ValueError(
            f"tangent_dist: unknown tangent distribution {config.tangent_dist!r}; "
            f"allowed: {', '.join(TANGENT_DISTRIBUTIONS)}"
        )
    if config.estimator.endswith("-rank1") and config.tangent_dist not in ("gaussian", "rank1"):
        raise ValueError(
            f"tangent_dist: {config.estimator!r} always uses rank-1 tangents, got tangent_dist="
            f"{config.tangent_dist!r}; use --estimator {config.estimator.removesuffix('-rank1')} "
            f"--tangent-dist {config.tangent_dist}"
        )
    if not 0.0 < config.test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {config.test_fraction!r}")
    _validate_feedback_fields(config)
    from jaxalgo.lowrank import oialr_config_from_train_config

    oialr_config_from_train_config(config)  # raises naming the lowrank_* field


def _validate_feedback_fields(config: TrainConfig) -> None:
    from jaxalgo.grads._f3 import F3_VARIANTS, HIDDEN_REDUCTIONS, MODES
    from jaxalgo.grads._f3_build import FEEDBACK_ESTIMATORS
    from jaxalgo.grads._feedback import FEEDBACK_INITS

    for field, allowed in (
        ("f3_variant", F3_VARIANTS),
        ("feedback_init", FEEDBACK_INITS),
        ("feedback_mode", MODES),
        ("feedback_reduction", HIDDEN_REDUCTIONS),
    ):
        value = getattr(config, field)
        if value not in allowed:
            raise ValueError(f"{field}: got {value!r}; allowed: {', '.join(allowed)}")
    if config.estimator in FEEDBACK_ESTIMATORS and config.parallel != "none":
        raise ValueError(
            f"parallel: estimator {config.estimator!r} runs on one device only (its feedback state is per run); "
            f"got parallel={config.parallel!r}"
        )


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)
