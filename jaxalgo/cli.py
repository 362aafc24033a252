"""The ``jaxalgo`` command line: ``jaxalgo train [flags]``.

Every flag is generated from the run configuration (:mod:`jaxalgo.config`) and the catalogues' options
dataclasses (:mod:`jaxalgo.options`): its type from the annotation, its choices from a ``Literal``, its default
from the dataclass and its help from the docstring, so ``jaxalgo train --help`` lists every option of every family
once, with the library's default. A flag that the chosen entries do not take is refused. Errors in the
configuration, data or work directory are reported in one line before training starts (exit status 2); a loss
that becomes NaN or infinite stops the run (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from collections.abc import Sequence
from typing import Literal

from jaxalgo.config import FAMILIES, RunConfig, core_flags
from jaxalgo.options import Flag, add_flags
from jaxalgo.parallel import detect_cluster, initialize_distributed
from jaxalgo.train import NonFiniteLossError, train_and_evaluate

_PROCESS_FLAGS = ("workdir", "resume", "devices", "coordinator", "num_processes", "process_id")


def _merged(flags: list[tuple[Flag, str]]) -> list[Flag]:
    """One flag per name across a family's entries: the same default (else a programming error), ``Literal``
    choices joined, the help naming the entries that take it."""
    by_name: dict[str, list[tuple[Flag, str]]] = {}
    for flag, entry in flags:
        by_name.setdefault(flag.name, []).append((flag, entry))
    merged = []
    for name, owners in by_name.items():
        first = owners[0][0]
        defaults = {repr(f.default) for f, _ in owners}
        if len(defaults) > 1:
            raise TypeError(f"--{name}: the entries {[e for _, e in owners]} give it different defaults {defaults}")
        choices = [typing.get_args(f.type) for f, _ in owners if typing.get_origin(f.type) is Literal]
        tp = first.type
        if len(choices) == len(owners) and len(owners) > 1:
            tp = Literal[tuple(dict.fromkeys(c for group in choices for c in group))]
        users = ", ".join(dict.fromkeys(e for _, e in owners))
        merged.append(Flag(name, first.path, tp, first.default, f"{first.help} [{users}]"))
    return merged


def family_flags(family) -> list[Flag]:
    """The flags of every entry of a family (each once)."""
    return _merged([(flag, name) for name, entry in family.entries.items() for flag in entry.flags])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalgo", description="Training beyond plain backpropagation, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a model and evaluate it",
        description="Train a model with a gradient estimator and an optax optimizer; evaluate every epoch. "
        "Metrics go to WORKDIR/metrics.jsonl, checkpoints to WORKDIR/checkpoints. Each family's flags apply to "
        "the entries named in brackets.",
    )
    add_flags(train.add_argument_group("run"), core_flags())
    for family in FAMILIES:
        group = train.add_argument_group(f"{family.name} ({', '.join(family.entries)})")
        names = ", ".join(f"{n} ({e.help})" if e.help else n for n, e in family.entries.items())
        extra = "; or module:function, a factory of your own" if family.name == "model" else ""
        group.add_argument(
            f"--{family.name}",
            dest=family.name,
            default=argparse.SUPPRESS,
            help=f"{names}{extra} (default: {family.default})",
        )
        add_flags(group, family_flags(family))
    process = train.add_argument_group("run directory and processes")
    add = process.add_argument
    add("--workdir", default=None, help="run directory (default: a new runs/<time>-<model>-<dataset>-<estimator>)")
    add("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    add("--devices", type=int, default=None, help="simulated CPU devices per process (set before jax starts)")
    add("--coordinator", default=None, help="multi-process: HOST:PORT of process 0 (or SLURM / Open MPI env)")
    add("--num-processes", type=int, default=None, help="multi-process: number of processes")
    add("--process-id", type=int, default=None, help="multi-process: this process's id")
    return parser


def _start_devices(args: argparse.Namespace, config: RunConfig) -> None:
    """Simulated devices and jax.distributed, before anything touches a device (a multi-device strategy under a
    cluster's scheduler starts jax.distributed from its environment)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    multi_device = not type(config.parallel.options).single_device
    if (
        any(v is not None for v in explicit)
        or args.devices is not None
        or (multi_device and detect_cluster() is not None)
    ):
        initialize_distributed(*explicit, local_device_count=args.devices)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of parsed arguments (flags not given take the library's defaults)."""
    values = {k: v for k, v in vars(args).items() if k not in (*_PROCESS_FLAGS, "command")}
    return RunConfig.from_flags(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        _start_devices(args, config)
    except ValueError as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join(
        "runs",
        f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model.name}-{config.dataset}-{config.estimator.name}".replace(
            ":", "."
        ),
    )
    try:
        train_and_evaluate(config, workdir, resume=args.resume)
    except NonFiniteLossError as error:
        print(f"jaxalgo: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    if not config.quiet:
        print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    return 0


__all__ = ["build_parser", "config_from_args", "family_flags", "main"]


if __name__ == "__main__":
    sys.exit(main())
