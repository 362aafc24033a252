"""The ``jaxalgo`` command line: ``jaxalgo train [flags]``, and ``jaxalgo plot RUN [RUN ...] -o FILE`` to draw runs'
metrics (:mod:`jaxalgo.plot`). ``jaxalgo sweep --option lr --values 1e-4:1e-1:8 [train flags]`` trains one run per
value and prints the ``jaxalgo train`` command of the best one on validation data (:mod:`jaxalgo.sweep`).

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
from typing import Any, Literal

from jaxalgo.config import FAMILIES, RunConfig, core_flags
from jaxalgo.options import Flag, add_flags
from jaxalgo.parallel import (
    DEFAULT_INIT_TIMEOUT,
    DEFAULT_PEER_TIMEOUT,
    PEER_LOST_EXIT_STATUS,
    STRATEGIES,
    ClusterError,
    initialize_distributed,
    resolve_processes,
)
from jaxalgo.plot import AXES, plot_runs
from jaxalgo.runner import StrategyOptions
from jaxalgo.sweep import (
    DEFAULT_VAL_FRACTION,
    MODES,
    PLOT_FILE,
    SWEEP_FILE,
    SweepMode,
    check_option,
    format_table,
    parse_values,
    read_sweep,
)
from jaxalgo.sweep import sweep as run_sweep
from jaxalgo.train import PREEMPTED_EXIT_STATUS, NonFiniteLossError, Preempted, resume_config, train_and_evaluate

_PROCESS_FLAGS = (
    "workdir",
    "resume",
    "devices",
    "coordinator",
    "num_processes",
    "process_id",
    "peer_timeout",
    "init_timeout",
)


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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"jaxalgo: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxalgo", description="Training beyond plain backpropagation, in JAX.")
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
    add(
        "--coordinator",
        default=None,
        help="multi-process: HOST:PORT of process 0 (under srun / mpirun: the first node of the job, on a port "
        "derived from the job id)",
    )
    add("--num-processes", type=int, default=None, help="multi-process: number of processes (srun: SLURM_NTASKS)")
    add("--process-id", type=int, default=None, help="multi-process: this process's id (srun: SLURM_PROCID)")
    add(
        "--peer-timeout",
        type=float,
        default=DEFAULT_PEER_TIMEOUT,
        metavar="SECONDS",
        help=f"multi-process: stop, with exit status {PEER_LOST_EXIT_STATUS}, when another process has sent no "
        "heartbeat for this long (default: %(default)g)",
    )
    add(
        "--init-timeout",
        type=float,
        default=DEFAULT_INIT_TIMEOUT,
        metavar="SECONDS",
        help=f"multi-process: stop, with exit status {PEER_LOST_EXIT_STATUS} and the ids of the missing processes, "
        "when not every process has connected within this long (default: %(default)g)",
    )
    _add_plot_command(commands)
    _add_sweep_command(commands, train)
    return parser


def _add_plot_command(commands: Any) -> None:
    plot = commands.add_parser(
        "plot",
        help="draw the curves of runs' metrics.jsonl side by side",
        description="Draw the test accuracy (or MAE) and the losses of runs against steps and/or seconds, one "
        "colour per run, the legend from each run's estimator and strategy (and the flags in which runs differ).",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="a run directory (a train --workdir) or a metrics.jsonl")
    plot.add_argument("-o", "--output", required=True, metavar="FILE", help="the image: FILE.png or FILE.svg")
    plot.add_argument("--x", choices=AXES, default="both", help="horizontal axis (default: %(default)s)")


def _plot(args: argparse.Namespace) -> int:
    """``jaxalgo plot``: the figure, or one line and exit status 2."""
    try:
        path = plot_runs(args.runs, args.output, x=args.x)
    except (ValueError, OSError) as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    print(f"plot: {path}")
    return 0


_SWEEP_FLAGS = ("sweep_option", "sweep_values", "val_fraction", "sweep_mode")


def _add_sweep_command(commands: Any, train: argparse.ArgumentParser) -> None:
    """``jaxalgo sweep``: its own flags, then every flag group of ``train`` (the same argparse actions, shared as
    argparse's ``parents`` shares them, so the two commands cannot drift apart)."""
    sweep = commands.add_parser(
        "sweep",
        help="train one run per value of a float option (e.g. the learning rate) and pick the best on validation",
        description="Train one run per value of a float option, as one vmapped program where the estimator and "
        "strategy allow it (else one run after another, and the reason is printed), select on a held-out part of "
        "the training split (never the test split), and print the jaxalgo train command of the chosen value. "
        "Curves go to WORKDIR/OPTION=VALUE/metrics.jsonl, the plan and results to WORKDIR/sweep.json, the plot to "
        "WORKDIR/sweep.png.",
    )
    group = sweep.add_argument_group("sweep")
    add = group.add_argument
    add("--option", dest="sweep_option", default=None, metavar="FLAG", help="the float option to sweep (e.g. lr)")
    add(
        "--values",
        dest="sweep_values",
        default=None,
        metavar="LO:HI:N|A,B,...",
        help="N log-spaced values from LO to HI (both included), or a comma list",
    )
    add(
        "--val-fraction",
        dest="val_fraction",
        type=float,
        default=None,
        help=f"fraction of the training split held out for selection (default: {DEFAULT_VAL_FRACTION})",
    )
    add(
        "--sweep-mode",
        dest="sweep_mode",
        choices=MODES,
        default=None,
        help="vmap: one program (refused when impossible); sequential: one run after another (default: auto)",
    )
    for source in train._action_groups:
        actions = [a for a in source._group_actions if a.dest != "help"]
        if actions:
            target = sweep.add_argument_group(source.title, source.description)
            for action in actions:
                target._add_action(action)


def _sweep_plan(args: argparse.Namespace) -> tuple[RunConfig, str, tuple[float, ...], float, SweepMode]:
    """``(config, option, values, val_fraction, mode)`` of the parsed arguments; with ``--resume`` the flags not
    given take the values of the sweep in ``--workdir`` (its sweep.json)."""
    given = {k: v for k, v in vars(args).items() if k not in (*_PROCESS_FLAGS, *_SWEEP_FLAGS, "command")}
    saved: dict[str, Any] = {}
    if args.resume:
        if not args.workdir:
            raise ValueError("resume: needs --workdir, the directory of the sweep to continue")
        if os.path.exists(os.path.join(args.workdir, SWEEP_FILE)):
            saved = read_sweep(args.workdir)
    option = args.sweep_option or saved.get("option")
    if not option:
        raise ValueError("option: give --option FLAG, the float option to sweep (e.g. --option lr)")
    if args.sweep_values is not None:
        values = parse_values(args.sweep_values)
    elif "values" in saved:
        values = tuple(saved["values"])
    else:
        raise ValueError("values: give --values LO:HI:N (log-spaced, e.g. 1e-4:1e-1:8) or a comma list A,B,...")
    config = RunConfig.from_dict(saved["config"]).with_flags(**given) if "config" in saved else None
    config = config or RunConfig.from_flags(given)
    check_option(config, option)
    fraction = args.val_fraction if args.val_fraction is not None else saved.get("val_fraction", DEFAULT_VAL_FRACTION)
    # --sweep-mode is one of MODES (argparse's choices); a mode read from sweep.json is checked by sweep()
    mode: SweepMode = args.sweep_mode or saved.get("mode", "auto")
    return config, option, values, fraction, mode


def _start_failed(error: Exception) -> int:
    """One line for a failure before any work, and its exit status: 69 when the processes did not all connect
    (ClusterError), else 2."""
    print(f"jaxalgo: error: {error}", file=sys.stderr)
    return PEER_LOST_EXIT_STATUS if isinstance(error, ClusterError) else 2


def _new_workdir(*names: str) -> str:
    """``runs/<time>-<names joined by ->`` (the ``:`` of a module:function name made a ``.``)."""
    return os.path.join("runs", "-".join((time.strftime("%Y%m%d-%H%M%S"), *names)).replace(":", "."))


def _sweep(args: argparse.Namespace) -> int:
    """``jaxalgo sweep``: the closing table and the chosen value's command, or one line and exit status 2."""
    try:
        config, option, values, fraction, mode = _sweep_plan(args)
        _start_devices(args, config)
    except (ValueError, ClusterError) as error:
        return _start_failed(error)
    workdir = args.workdir or _new_workdir("sweep", option, config.estimator.name)
    try:
        result = run_sweep(config, option, values, workdir, val_fraction=fraction, mode=mode, resume=args.resume)
    except (ValueError, TypeError, OSError) as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"mode: {result.mode} ({result.reason})")
    if os.path.exists(os.path.join(workdir, PLOT_FILE)):
        print(f"plot: {os.path.join(workdir, PLOT_FILE)}")
    if result.best is None:
        print(f"chosen: none (every value of {option} diverged); try smaller values")
        return 1
    print(f"chosen: {option}={result.best!r}; train it with:\n  {result.command}")
    return 0


def _start_devices(args: argparse.Namespace, config: RunConfig) -> None:
    """Simulated devices and jax.distributed, before anything touches a device.

    The processes come from the flags or, under srun / mpirun, from the scheduler's environment
    (:func:`jaxalgo.parallel.resolve_processes`); a run of several processes needs a strategy that is not
    ``single_device``. Run as the ``jaxalgo`` command, each process of a multi-process run forks: the child trains,
    the parent supervises it and exits with its status, or with ``PEER_LOST_EXIT_STATUS`` (69) and one line when
    another process is lost (:func:`jaxalgo.parallel.initialize_distributed` with ``supervise=True``). Raises
    ValueError (exit status 2) for bad input and ClusterError (exit status 69) when the processes do not all
    connect.
    """
    for name in ("peer_timeout", "init_timeout"):
        value = getattr(args, name)
        if not 0 < value < float("inf"):
            raise ValueError(f"{name}: must be a number of seconds > 0, got {value:g}")
    plan = resolve_processes(args.coordinator, args.num_processes, args.process_id)
    strategy: StrategyOptions = config.parallel.options
    if plan.multi_process and type(strategy).single_device:
        # an entry's options class is a StrategyOptions, whose single_device ClassVar the catalogue's type cannot show
        multi = ", ".join(n for n, e in STRATEGIES.items() if not getattr(e.options, "single_device", True))
        raise ValueError(
            f"parallel: {config.parallel.name!r} runs on one device, but this run has {plan.num_processes} processes "
            f"({plan.method}); choose a strategy for several devices ({multi}) or start a single process"
        )
    if plan.multi_process or args.devices is not None:
        main_module = sys.modules.get("__main__")
        spec = getattr(main_module, "__spec__", None)
        as_command = (
            spec.name in ("jaxalgo.__main__", "jaxalgo.cli")
            if spec is not None
            else os.path.basename(getattr(main_module, "__file__", None) or "") == "jaxalgo"
        )
        initialize_distributed(
            plan.coordinator,
            plan.num_processes,
            plan.process_id,
            local_device_count=args.devices,
            timeout_seconds=args.init_timeout,
            peer_timeout_seconds=args.peer_timeout,
            supervise=as_command,  # the jaxalgo command runs each process under a supervisor; main([...]) does not
        )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of parsed arguments. Flags not given take the library's defaults; with ``--resume``
    they take the values of the run in ``--workdir`` (its newest checkpoint), so only changes need be given."""
    values = {k: v for k, v in vars(args).items() if k not in (*_PROCESS_FLAGS, "command")}
    if getattr(args, "resume", False):
        if not args.workdir:
            raise ValueError("resume: needs --workdir, the directory of the run to continue")
        resumed = resume_config(args.workdir, values)
        if resumed is not None:
            return resumed
    return RunConfig.from_flags(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plot":
        return _plot(args)
    if args.command == "sweep":
        return _sweep(args)
    try:
        config = config_from_args(args)
        _start_devices(args, config)
    except (ValueError, ClusterError) as error:
        return _start_failed(error)
    workdir = args.workdir or _new_workdir(config.model.name, config.dataset, config.estimator.name)
    try:
        train_and_evaluate(config, workdir, resume=args.resume)
    except NonFiniteLossError as error:
        print(f"jaxalgo: {error}", file=sys.stderr)
        return 1
    except Preempted as error:
        print(f"jaxalgo: {error}", file=sys.stderr)
        return PREEMPTED_EXIT_STATUS
    except (ValueError, TypeError, OSError) as error:
        print(f"jaxalgo: error: {error}", file=sys.stderr)
        return 2
    if not config.quiet:
        print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    return 0


__all__ = ["build_parser", "config_from_args", "family_flags", "main"]


if __name__ == "__main__":
    sys.exit(main())
