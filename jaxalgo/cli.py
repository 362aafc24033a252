"""The ``jaxalgo`` command line: ``jaxalgo train [flags]``.

Every flag maps to a field of :class:`jaxalgo.config.TrainConfig`; ``jaxalgo train --help`` lists them with
their defaults. Errors in the configuration, data or work directory are reported in one line before training
starts (exit status 2); a loss that becomes NaN or infinite stops the run (exit status 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from jaxalgo.config import OPTIMIZERS, TANGENT_DISTRIBUTIONS, TrainConfig

DEFAULTS = TrainConfig()


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from jaxalgo import data, losses, models
    from jaxalgo.estimators import ESTIMATORS
    from jaxalgo.grads import F3_VARIANTS, FEEDBACK_INITS

    parser = argparse.ArgumentParser(prog="jaxalgo", description="Training beyond plain backpropagation, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model and evaluate it",
        description="Train a model with a gradient estimator and an optax optimizer; evaluate every epoch. "
        "Metrics go to WORKDIR/metrics.jsonl, checkpoints to WORKDIR/checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = train.add_argument
    add("--model", default=DEFAULTS.model, help=f"model: {', '.join(models.MODELS)}")
    add("--dataset", default=DEFAULTS.dataset, help=f"data set: {', '.join(data.DATASETS)}")
    add("--data-dir", default=DEFAULTS.data_dir, help="directory with local files (mnist, fashion_mnist, cifar10)")
    add("--estimator", default=DEFAULTS.estimator, help=f"gradient estimator: {', '.join(ESTIMATORS)}")
    add("--optimizer", default=DEFAULTS.optimizer, help=f"optax optimizer: {', '.join(OPTIMIZERS)}")
    add("--tangents", type=int, default=DEFAULTS.tangents, help="forward gradients: number of tangents k")
    add("--f3-variant", default=DEFAULTS.f3_variant, help=f"f3: the error fed back: {', '.join(F3_VARIANTS)}")
    add(
        "--feedback-init",
        default=DEFAULTS.feedback_init,
        help=f"f3, dfa, drtp, fa, llo: feedback matrices: {', '.join(FEEDBACK_INITS)}",
    )
    add(
        "--feedback-mode",
        default=DEFAULTS.feedback_mode,
        help="f3, dfa, drtp, llo: per_block (update each block right after its forward) or surrogate",
    )
    add(
        "--feedback-reduction",
        default=DEFAULTS.feedback_reduction,
        help="f3, dfa, drtp, llo: hidden updates sum (reference) or mean over the batch",
    )
    add(
        "--tangent-dist",
        default=DEFAULTS.tangent_dist,
        help=f"forward gradients: tangent distribution, {', '.join(TANGENT_DISTRIBUTIONS)} (activity: not rank1)",
    )
    add("--lr", type=float, default=DEFAULTS.lr, help="learning rate (> 0)")
    add("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="weight decay (>= 0)")
    add("--epochs", type=int, default=DEFAULTS.epochs, help="passes over the training split")
    add("--batch-size", type=int, default=DEFAULTS.batch_size, help="examples per step")
    add("--seed", type=int, default=DEFAULTS.seed, help="seeds model init, data order and step keys")
    add(
        "--hidden",
        type=_positive_int_list,
        default=DEFAULTS.hidden,
        help="MLP hidden widths, comma-separated (e.g. 256,256)",
    )
    add("--activation", default=DEFAULTS.activation, help="MLP activation (relu, tanh, gelu, sigmoid, silu)")
    add("--vit-dim", type=int, default=DEFAULTS.vit_dim, help="ViT token width (4 heads, MLP width 2x)")
    add("--vit-depth", type=int, default=DEFAULTS.vit_depth, help="ViT Transformer blocks")
    add("--loss", default=DEFAULTS.loss, help=f"output loss: auto, {', '.join(losses.LOSSES)}")
    add("--test-fraction", type=float, default=DEFAULTS.test_fraction, help="held-out fraction (bundled sets)")
    add(
        "--checkpoint-every",
        type=int,
        default=DEFAULTS.checkpoint_every,
        help="save a checkpoint every N steps (0: every epoch); one is always saved at the end",
    )
    add("--keep-checkpoints", type=int, default=DEFAULTS.keep_checkpoints, help="checkpoints kept")
    add("--log-every", type=int, default=DEFAULTS.log_every, help="steps between progress updates")
    add("--lowrank", default=DEFAULTS.lowrank, help="low-rank training: none, oialr")
    add("--lowrank-delay", type=int, default=DEFAULTS.lowrank_delay, help="OIALR full-rank steps before conversion")
    add("--lowrank-frequency", type=int, default=DEFAULTS.lowrank_frequency, help="steps between OIALR rank checks")
    add("--lowrank-cutoff", type=float, default=DEFAULTS.lowrank_cutoff, help="OIALR cutoff: keep s >= cutoff*s_0")
    add(
        "--lowrank-bucket-ratio",
        type=float,
        default=DEFAULTS.lowrank_bucket_ratio,
        help="compact padded factors above this ratio x the live ones (1: exact shapes, one compile per cut)",
    )
    add("--lowrank-rotate-moments", action="store_true", help="rotate optimizer moments of S at each check")
    add(
        "--workdir",
        default=None,
        help="run directory (default: a new runs/<time>-<model>-<dataset>-<estimator>)",
    )
    add("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    _add_parallel_flags(train)
    add("--quiet", action="store_true", help="no progress bar and no summary table")
    return parser


def _add_parallel_flags(train: argparse.ArgumentParser) -> None:
    group = train.add_argument_group("data parallelism (jaxalgo.parallel)")
    add = group.add_argument
    add("--parallel", default=DEFAULTS.parallel, help="none, ddp (all-reduce every step), daso or ab (AB-training)")
    add(
        "--mesh",
        default=DEFAULTS.mesh,
        help="devices as NODESxLOCAL, e.g. 2x4 (default: one node per process); ab: GROUPSxGROUP_SIZE",
    )
    add(
        "--parallel-reduce",
        default=DEFAULTS.parallel_reduce,
        help="auto (forward gradients: all-reduce only the k directional derivatives), directional or gradients",
    )
    add("--daso-global-skip", type=int, default=DEFAULTS.daso_global_skip, help="steps between global averages")
    add("--daso-batches-to-wait", type=int, default=DEFAULTS.daso_batches_to_wait, help="S: steps until the merge")
    add("--daso-warmup-epochs", type=int, default=DEFAULTS.daso_warmup_epochs, help="blocking epochs at the start")
    add("--daso-cooldown-epochs", type=int, default=DEFAULTS.daso_cooldown_epochs, help="blocking epochs at the end")
    add("--daso-merge-weight", type=float, default=DEFAULTS.daso_merge_weight, help="w of the merge")
    add("--daso-max-global-skip", type=int, default=DEFAULTS.daso_max_global_skip, help="skip after a reset")
    add("--daso-comm-dtype", default=DEFAULTS.daso_comm_dtype, help="bfloat16, float16 or float32")
    add("--daso-sharded", action="store_true", help="Horovod-style sharded global average")
    add(
        "--daso-adaptive",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.daso_adaptive,
        help="adapt global_skip and S on loss plateaus",
    )
    add("--ab-warmup-steps", type=int, default=DEFAULTS.ab_warmup_steps, help="AB: full-rank steps before groups")
    add(
        "--ab-steps-between-syncs",
        type=int,
        default=DEFAULTS.ab_steps_between_syncs,
        help="AB: steps per cycle (sync, DDP steps, re-SVD, group phase)",
    )
    add(
        "--ab-ddp-steps-after-sync",
        type=int,
        default=DEFAULTS.ab_ddp_steps_after_sync,
        help="AB: full-rank data-parallel steps after each sync",
    )
    add("--ab-sync-mode", default=DEFAULTS.ab_sync_mode, help="AB: full, with-stale, only-learned or only-b")
    add("--ab-cutoff", type=float, default=DEFAULTS.ab_cutoff, help="AB: keep singular values >= cutoff * s_0")
    add("--ab-lr-rebound-steps", type=int, default=DEFAULTS.ab_lr_rebound_steps, help="AB: learning-rate ramp steps")
    add("--ab-bucket-ratio", type=float, default=DEFAULTS.ab_bucket_ratio, help="AB: rank bucket ratio (1: exact)")
    add("--devices", type=int, default=None, help="simulated CPU devices per process (set before jax starts)")
    add("--coordinator", default=None, help="multi-process: HOST:PORT of process 0 (or SLURM / Open MPI env)")
    add("--num-processes", type=int, default=None, help="multi-process: number of processes")
    add("--process-id", type=int, default=None, help="multi-process: this process's id")


def _start_devices(args: argparse.Namespace) -> None:
    """Simulated devices and jax.distributed, before anything touches a device."""
    from jaxalgo.parallel import detect_cluster, initialize_distributed

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if (
        any(v is not None for v in explicit)
        or args.devices is not None
        or (args.parallel != "none" and detect_cluster() is not None)
    ):
        initialize_distributed(*explicit, local_device_count=args.devices)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` named by parsed arguments (every field has a flag of the same name)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        _start_devices(args)
    except ValueError as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join(
        "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}-{config.dataset}-{config.estimator}"
    )
    from jaxalgo.train import NonFiniteLossError, train_and_evaluate

    try:
        final = train_and_evaluate(config, workdir, resume=args.resume)
    except NonFiniteLossError as error:
        print(f"jaxalgo: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    if not config.quiet:
        print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    del final
    return 0


if __name__ == "__main__":
    sys.exit(main())
