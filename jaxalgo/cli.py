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

from jaxalgo.config import OPTIMIZERS, TrainConfig

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
    add(
        "--workdir",
        default=None,
        help="run directory (default: a new runs/<time>-<model>-<dataset>-<estimator>)",
    )
    add("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    add("--quiet", action="store_true", help="no progress bar and no summary table")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` named by parsed arguments (every field has a flag of the same name)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
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
