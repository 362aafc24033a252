"""Hyperparameter sweeps: one float option, many values, trained as one vmapped program where it can be.

:func:`sweep` trains one run per value of one float option of the chosen estimator or optimizer (the learning
rate ``lr``, ``adam_eps``, ``zo_epsilon``, ...; the flag names of :meth:`jaxalgo.config.RunConfig.flags`) and picks
the value with the best final metric on a **validation part of the training split**; the test split is never read.

**One program.** The train step of :mod:`jaxalgo.runner` is a pure function of the train state, the batch and the
run key, and the estimator and the optimizer are pure functions built from their options. With the swept option
``h`` entering the build as a traced scalar, the step of value ``h_i`` is ``s_i <- step_h_i(s_i, batch, key)`` and
the whole sweep is ``S <- vmap(step)(h, S, batch, key)`` over a leading axis of ``n`` stacked train states ``S``:
one compilation, one dispatch per step, the ``n`` models' matmuls batched. Every value sees the same batches and
the same per-step keys ``fold_in(run_key, step)``, so the values differ by the option alone (a controlled
comparison, the same draw of noise for every learning rate). For the learning rate of Adam or SGD this is
``optax``'s ``learning_rate`` argument receiving a traced scalar, i.e. the update ``-h_i u_i`` of each state.

**Fallback: one run after another** (the same step and driver hooks as ``jaxalgo train``), when the program
cannot be vmapped over the values:

- the strategy or low-rank method has its own runner (DDP, DASO, AB groups shard the step over devices with
  ``shard_map``; OIALR changes the parameters' shapes outside jit), which a vmap over values cannot batch;
- the option belongs to the model, the parallel strategy or the low-rank method: it is read in Python when the
  model or the runner is built (layer shapes, initialisation, schedules), outside the step;
- building the estimator or the optimizer with a traced value fails: the option steers Python control flow (e.g.
  ``weight_decay > 0`` decides whether a decay term is chained) or must be a concrete number (``zo_epsilon``).

Integer, boolean and choice options change shapes or the program's structure and are refused (sweep them with a
loop over ``jaxalgo train``). The reason for the fallback is returned (:attr:`SweepResult.reason`) and printed.

**Files.** ``WORKDIR/OPTION=VALUE/metrics.jsonl`` holds each value's curve in the line format of a run's metrics
file (epoch lines, then a final line), with ``val_loss`` and ``val_accuracy`` (classification) or ``val_mae``
(regression, original units) in place of the test metrics; ``WORKDIR/sweep.json`` the plan and the results;
``WORKDIR/sweep.png`` the final validation metric against the value (log x). Checkpoints are verified
(``jaxalgo.checkpoint.Checkpointer``, as a run's): of the stacked state in ``WORKDIR/checkpoints`` (vmapped) or of each
run in ``WORKDIR/OPTION=VALUE/checkpoints`` (one after another); ``resume=True`` continues to exactly the result
of an uninterrupted sweep.

References:
  Bergstra and Bengio, *Random Search for Hyper-Parameter Optimization*, JMLR 13 (2012): a log scale for scale
  parameters such as the learning rate. Fournier et al., *Can Forward Gradient Match Backpropagation?*, ICML 2023
  (arXiv 2306.06968): estimators' learning rates differ by orders of magnitude and are tuned per estimator.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import sys
import time
import typing
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxalgo import data
from jaxalgo.checkpoint import Checkpointer, CheckpointMismatchError, check_record_matches
from jaxalgo.config import FAMILY_NAMES, FamilyName, RunConfig
from jaxalgo.data._split import split_indices
from jaxalgo.options import errors_as_flags
from jaxalgo.runner import Experiment, Runner, SingleDeviceRunner, TrainState, make_evaluate, make_train_step, run_keys
from jaxalgo.tensorboard_log import is_epoch_line
from jaxalgo.train import CHECKPOINT_DIR, METRICS_FILE, make_runner, setup
from jaxalgo.workdir import WorkdirLock, write_metrics

SWEEP_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
DEFAULT_VAL_FRACTION = 0.1
SweepMode = Literal["auto", "vmap", "sequential"]
"""How :func:`sweep` runs the values: as :func:`plan` decides, as one vmapped program, or one after another."""
MODES: tuple[SweepMode, ...] = typing.get_args(SweepMode)
_VMAP_FAMILIES = ("estimator", "optimizer")
_IDENTITY = ("option", "values", "val_fraction", "mode")


# -- the values -----------------------------------------------------------------------------------------------------


def parse_values(spec: str, *, argument: str = "values") -> tuple[float, ...]:
    """The values of ``"lo:hi:n"`` (``n`` log-spaced values from ``lo`` to ``hi``, both included) or of a comma
    list ``"a,b,c"``.

    Log-spaced values ``lo * (hi / lo) ** (i / (n - 1))`` are rounded to 4 significant digits, so that each is
    printed exactly (in directory names and in the ``jaxalgo train`` command of the chosen value).

    >>> parse_values("1e-4:1e-2:3")
    (0.0001, 0.001, 0.01)
    >>> parse_values("0.5, 1, 2")
    (0.5, 1.0, 2.0)

    Raises:
      ValueError: naming ``argument``: not a range or a list of numbers, fewer than 2 values, a log range with
        ``lo <= 0`` or ``hi <= lo``, or repeated values.
    """
    text = spec.strip() if isinstance(spec, str) else ""
    if text.count(":") == 2:
        lo, hi, n = _range_parts(text, argument)
        values = tuple(float(f"{lo * (hi / lo) ** (i / (n - 1)):.4g}") for i in range(n))
    elif ":" not in text and text:
        try:
            values = tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{argument}: expected LO:HI:N or a comma list of numbers, got {spec!r}") from None
    else:
        raise ValueError(f"{argument}: expected LO:HI:N (log-spaced) or a comma list of numbers, got {spec!r}")
    return check_values(values, argument=argument)


def _range_parts(text: str, argument: str) -> tuple[float, float, int]:
    lo_text, hi_text, n_text = text.split(":")
    try:
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        raise ValueError(f"{argument}: LO and HI of LO:HI:N must be numbers, got {text!r}") from None
    try:
        n = int(n_text)
    except ValueError:
        raise ValueError(f"{argument}: N of LO:HI:N must be an integer >= 2, got {n_text!r}") from None
    if n < 2:
        raise ValueError(f"{argument}: N of LO:HI:N must be an integer >= 2, got {n}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0 and hi > 0):
        raise ValueError(f"{argument}: log spacing needs LO > 0 and HI > 0 (finite), got {text!r}")
    if hi <= lo:
        raise ValueError(f"{argument}: LO:HI:N needs HI > LO, got {text!r}")
    return lo, hi, n


def check_values(values: Sequence[float], *, argument: str = "values") -> tuple[float, ...]:
    """``values`` as a tuple of floats: at least 2, finite and distinct; a ValueError naming ``argument``."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{argument}: expected a sequence of numbers, got {values!r}") from None
    if len(out) < 2:
        raise ValueError(f"{argument}: a sweep needs at least 2 values, got {len(out)} ({list(out)})")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{argument}: every value must be finite, got {list(out)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{argument}: values must be distinct, got {list(out)} (a narrower N or a wider range)")
    return out


# -- the option -----------------------------------------------------------------------------------------------------


def float_options(config: RunConfig) -> dict[str, FamilyName]:
    """``{flag: family}`` of the float options of the entries ``config`` chooses (the flags a sweep may vary)."""
    found: dict[str, FamilyName] = {}
    for family in FAMILY_NAMES:
        for flag in config.entry(family).flags:
            if flag.type is float:
                found[flag.name] = family
    return found


def check_option(config: RunConfig, option: str) -> FamilyName:
    """The family of float option ``option`` of ``config``; a ValueError naming ``option`` and what is allowed."""
    allowed = float_options(config)
    if option in allowed:
        return allowed[option]
    view = config.flags()
    names = ", ".join(sorted(allowed)) or "none"
    if option in view:
        raise ValueError(
            f"option: {option!r} is not a float option (it is {view[option]!r}); a sweep varies a float option of "
            f"the chosen entries: {names}"
        )
    raise ValueError(f"option: unknown option {option!r} for this configuration; float options: {names}")


def _flag_of(config: RunConfig, family: FamilyName, option: str):
    return next(f for f in config.entry(family).flags if f.name == option)


def _with_field(options: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of the (frozen) options with the field at ``path`` set to ``value``, unvalidated (``value`` is a
    tracer; every concrete value was validated by building the configuration with it)."""
    new = copy.copy(options)
    inner = value if len(path) == 1 else _with_field(getattr(options, path[0]), path[1:], value)
    object.__setattr__(new, path[0], inner)
    return new


# -- the validation split -------------------------------------------------------------------------------------------


def check_fraction(val_fraction: float) -> float:
    """``val_fraction`` as a float in ``(0, 1)``, or a ValueError naming it."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    if not (math.isfinite(val_fraction) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def validation_split(dataset: data.Dataset, val_fraction: float, *, seed: int) -> data.Dataset:
    """The training split of ``dataset`` divided into a smaller training split and a validation split.

    The returned :class:`jaxalgo.data.Dataset` holds the remaining training examples as its train split and the
    held-out ones as its *test* split (so the evaluation code of :mod:`jaxalgo.runner` evaluates on them); the
    original test split is dropped. The split is stratified by class for classification (``round(f * n_c)`` of
    each class's ``n_c`` examples held out) and a pure function of ``seed``. The inputs keep the standardisation
    the loader fitted on the whole training split (input statistics of the validation part, no labels, enter it).

    Raises:
      ValueError: ``val_fraction`` outside ``(0, 1)`` or leaving either part empty.
    """
    check_fraction(val_fraction)
    labels = dataset.y_train if dataset.task == "classification" else None
    try:
        train_idx, val_idx = split_indices(dataset.num_train, test_fraction=val_fraction, seed=seed, labels=labels)
    except ValueError:
        raise ValueError(
            f"val_fraction: {val_fraction!r} of {dataset.num_train} training examples leaves the training or the "
            "validation part empty; choose a fraction nearer 0.5"
        ) from None
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[train_idx],
        y_train=dataset.y_train[train_idx],
        x_test=dataset.x_train[val_idx],
        y_test=dataset.y_train[val_idx],
    )


def validation_experiment(config: RunConfig, val_fraction: float) -> Experiment:
    """:func:`jaxalgo.train.setup` of ``config`` on :func:`validation_split` of its data: the estimator is rebuilt
    for the smaller training split (F3's error buffer is indexed by training example)."""
    experiment = setup(config)
    split = validation_split(experiment.dataset, val_fraction, seed=config.seed)
    data.validate_batch_size(config.batch_size, split.num_train)
    problem = dataclasses.replace(experiment.problem, train_targets=split.y_train)
    with errors_as_flags(config.entry("estimator")):
        estimator = config.estimator.options.build(problem)
    return dataclasses.replace(experiment, problem=problem, dataset=split, estimator=estimator)


# -- the plan -------------------------------------------------------------------------------------------------------


def _lane_builder(config: RunConfig, experiment: Experiment, family: FamilyName, option: str):
    """``build(h) -> (estimator, optimizer)`` with option ``option`` of ``family`` set to ``h`` (a tracer)."""
    path = _flag_of(config, family, option).path

    def build(value):
        if family == "optimizer":
            return experiment.estimator, _with_field(config.optimizer.options, path, value).build()
        with errors_as_flags(config.entry("estimator")):
            return _with_field(config.estimator.options, path, value).build(experiment.problem), experiment.optimizer

    return build


def _first_batch(experiment: Experiment, config: RunConfig) -> dict[str, Any]:
    return next(data.iterate_batches(experiment.dataset, config.batch_size, seed=0, epoch=0))


def plan(config: RunConfig, option: str, experiment: Experiment) -> tuple[str, str]:
    """``("vmap", why)`` when the sweep over ``option`` runs as one vmapped program, else ``("sequential", why)``.

    Decided by capability: the runner of the strategy and low-rank method must be the plain single-device step,
    the option must belong to the estimator or the optimizer, and their build must trace with the option as an
    abstract scalar (tried with :func:`jax.eval_shape`, nothing computed).

    Args:
      config: the run configuration.
      option: the float option swept.
      experiment: ``config``'s run on the training part of the split (:func:`validation_experiment`).
    """
    family = check_option(config, option)
    runner = make_runner(config, experiment)
    if type(runner) is not SingleDeviceRunner:
        return "sequential", (
            f"parallel={config.parallel.name!r}, lowrank={config.lowrank.name!r} train with their own runner "
            f"({type(runner).__name__}: a step sharded over devices or shapes changed outside jit), which a vmap "
            "over values cannot batch"
        )
    if family not in _VMAP_FAMILIES:
        return "sequential", (
            f"{option} is an option of the {family}, read in Python when the {family} is built (shapes, "
            "initialisation, schedules), outside the train step"
        )
    build = _lane_builder(config, experiment, family, option)
    batch = _first_batch(experiment, config)
    values = jax.ShapeDtypeStruct((2,), jnp.float32)
    try:
        states = jax.eval_shape(_make_init(experiment, build), values)
        jax.eval_shape(_make_step(build), values, states, batch, experiment.run_key)
    except (jax.errors.JAXTypeError, TypeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        return "sequential", f"the {family} cannot be built with {option} as a traced value ({first})"
    return "vmap", f"{option} enters the {family} as a traced scalar; one program vmapped over the values"


def _make_init(experiment: Experiment, build):
    def init(value):
        estimator, optimizer = build(value)
        return TrainState.fresh(experiment.init_params, estimator, optimizer)

    return jax.vmap(init)


def _make_step(build):
    def step(value, state, batch, run_key):
        estimator, optimizer = build(value)
        return make_train_step(estimator, optimizer)(state, batch, run_key)

    return jax.vmap(step, in_axes=(0, 0, None, None))


# -- lanes: the runs a training loop advances together --------------------------------------------------------------


class _VmapLanes:
    """Every value's train state stacked on a leading axis, advanced by one vmapped, jit-compiled step."""

    def __init__(self, config: RunConfig, experiment: Experiment, family: FamilyName, option: str, values):
        build = _lane_builder(config, experiment, family, option)
        self.count = len(values)
        self.values = jnp.asarray(values, jnp.float32)
        self.run_key = experiment.run_key
        self._init = jax.jit(_make_init(experiment, build))
        self._step = jax.jit(_make_step(build), donate_argnums=1)
        self._evaluate = make_evaluate(experiment.chain, experiment.output_loss, experiment.dataset)

    def init(self) -> Any:
        return self._init(self.values)

    def restore_target(self, record: dict[str, Any], fresh: Any) -> Any:
        del record
        return fresh

    def advance(self, state: Any, batches: list[Any], index: int) -> tuple[Any, list[jax.Array]]:
        del index
        losses = []
        for batch in batches:
            state, loss = self._step(self.values, state, batch, self.run_key)
            losses.append(loss)
        return state, losses

    def window(self, index: int, remaining: int) -> int:
        del index, remaining
        return 1

    def after_step(self, index: int, state: Any) -> Any:
        del index
        return state

    def end_epoch(self, state: Any, epoch: int, train_losses: np.ndarray) -> Any:
        del epoch, train_losses
        return state

    def evaluate(self, state: Any) -> list[dict[str, Any]]:
        return [self._evaluate(jax.tree.map(lambda x, i=i: x[i], state.params)) for i in range(self.count)]

    def record(self, state: Any) -> dict[str, Any]:
        del state
        return {}

    def load_record(self, record: dict[str, Any]) -> None:
        del record

    def extra(self) -> list[dict[str, Any]]:
        return [{} for _ in range(self.count)]

    def events(self) -> list[dict[str, Any]]:
        return []


class _RunnerLanes:
    """One value's run on the runner of its strategy and low-rank method (the protocol of :mod:`jaxalgo.runner`)."""

    count = 1

    def __init__(self, runner: Runner, experiment: Experiment):
        self.runner = runner
        self.experiment = experiment

    def init(self) -> Any:
        return self.runner.init(self.experiment.init_state())

    def restore_target(self, record: dict[str, Any], fresh: Any) -> Any:
        return self.runner.restore_target(record, fresh)

    def window(self, index: int, remaining: int) -> int:
        return self.runner.window(index, remaining)

    def advance(self, state: Any, batches: list[Any], index: int) -> tuple[Any, list[jax.Array]]:
        if len(batches) == 1:
            state, loss = self.runner.step(state, batches[0], index)
            return state, [jnp.reshape(loss, (1,))]
        state, losses = self.runner.run_window(state, batches, index)
        return state, [jnp.reshape(loss, (1,)) for loss in losses]

    def after_step(self, index: int, state: Any) -> Any:
        return self.runner.after_step(index, state)

    def end_epoch(self, state: Any, epoch: int, train_losses: np.ndarray) -> Any:
        return self.runner.end_epoch(state, epoch, float(train_losses[0]))

    def evaluate(self, state: Any) -> list[dict[str, Any]]:
        return [self.runner.evaluate(state)]

    def record(self, state: Any) -> dict[str, Any]:
        return self.runner.record(state)

    def load_record(self, record: dict[str, Any]) -> None:
        self.runner.load_record(record)

    def extra(self) -> list[dict[str, Any]]:
        return [self.runner.epoch_metrics()]

    def events(self) -> list[dict[str, Any]]:
        return self.runner.events()


# -- the training loop ----------------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _val_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``test_*`` of an evaluation on the validation split renamed ``val_*`` (non-finite values as ``None``)."""
    return {k.replace("test_", "val_", 1): _finite_or_none(float(v)) for k, v in metrics.items()}


def _crossed(before: int, after: int, every: int) -> bool:
    return every > 0 and after // every > before // every


@dataclasses.dataclass
class _Progress:
    """The host-side facts of a sweep's runs that a checkpoint records beside the arrays."""

    histories: list[list[dict[str, Any]]]
    loss_sums: np.ndarray
    pending: list[jax.Array] = dataclasses.field(default_factory=list)

    def fold(self) -> np.ndarray:
        for loss in self.pending:
            self.loss_sums += np.asarray(loss, np.float64)
        self.pending.clear()
        return self.loss_sums


def _train_lanes(
    lanes: Any,
    experiment: Experiment,
    config: RunConfig,
    checkpointer: Checkpointer,
    metrics_paths: list[str],
    identity: dict[str, Any],
    fingerprint: dict[str, Any],
    values: Sequence[float],
    option: str,
    *,
    resume: bool,
) -> tuple[list[list[dict[str, Any]]], Any]:
    """Trains ``lanes`` to ``config.epochs``; returns each lane's metrics lines (also written to its file) and the
    final state."""
    spe, total = experiment.steps_per_epoch, experiment.total_steps
    data_seed = run_keys(config.seed).data_seed
    state, progress, elapsed, finished = _start(
        lanes, experiment, config, checkpointer, metrics_paths, identity, fingerprint, resume=resume
    )
    if finished:
        return progress.histories, state
    step = int(np.ravel(np.asarray(state.step))[0])
    started = time.perf_counter() - elapsed

    def save(state: Any, step: int) -> None:
        record = {
            "config": config.to_dict(),
            "config_fingerprint": fingerprint,
            "sweep": identity,
            "elapsed_seconds": time.perf_counter() - started,
            "loss_sums": [float(x) for x in progress.fold()],
            "metrics": progress.histories,
            **lanes.record(state),
        }
        checkpointer.save(step, state, record)
        for path, history in zip(metrics_paths, progress.histories, strict=True):
            write_metrics(path, history)

    state = lanes.after_step(step, state)
    while step < total:
        epoch, offset = divmod(step, spe)
        batches = data.iterate_batches(
            experiment.dataset, config.batch_size, seed=data_seed, epoch=epoch, start_step=offset
        )
        while offset < spe:
            count = lanes.window(step, spe - offset)
            state, losses = lanes.advance(state, [next(batches) for _ in range(count)], step)
            before, step, offset = step, step + count, offset + count
            state = lanes.after_step(step, state)
            for event in lanes.events():
                progress.histories[0].append(event)
            progress.pending.extend(losses)
            if offset < spe and _crossed(before, step, config.checkpoint_every):
                save(state, step)
        train_losses = progress.fold() / spe
        progress.loss_sums = np.zeros(lanes.count)
        state = lanes.end_epoch(state, epoch, train_losses)
        evaluations, extras = lanes.evaluate(state), lanes.extra()
        seconds = time.perf_counter() - started
        for lane in range(lanes.count):
            evaluation = _val_metrics(evaluations[lane])
            train_loss = _finite_or_none(float(train_losses[lane]))
            line = {"step": step, "epoch": epoch + 1, "train_loss": train_loss, **evaluation, **extras[lane]}
            if train_loss is None or evaluation.get("val_loss") is None:
                line["diverged"] = True
            line["seconds"] = seconds
            lines = [line]
            if step == total:
                final = {"final": True, "step": step, "epoch": config.epochs, option: values[lane], **evaluation}
                final.update({"diverged": True} if line.get("diverged") else {})
                final.update(steps=step, seconds=seconds)
                lines.append(final)
            progress.histories[lane].extend(lines)
        save(state, step)
    return progress.histories, state


def _start(
    lanes: Any,
    experiment: Experiment,
    config: RunConfig,
    checkpointer: Checkpointer,
    metrics_paths: list[str],
    identity: dict[str, Any],
    fingerprint: dict[str, Any],
    *,
    resume: bool,
) -> tuple[Any, _Progress, float, bool]:
    """The state to start from, its progress, the elapsed seconds and whether the sweep is already finished."""
    fresh = lanes.init()
    empty = _Progress([[] for _ in range(lanes.count)], np.zeros(lanes.count))
    latest = checkpointer.latest_step()
    if latest is None:
        for path in metrics_paths:
            write_metrics(path, [])
        return fresh, empty, 0.0, False
    if not resume:
        raise FileExistsError(
            f"workdir: {checkpointer.directory!r} already holds checkpoints (latest step {latest}); pass --resume "
            "to continue that sweep, or choose a new --workdir"
        )

    def check(record: dict[str, Any]) -> None:
        check_record_matches(record, fingerprint, checkpointer.directory)
        for key in _IDENTITY:
            if key in identity and record.get("sweep", {}).get(key) != identity[key]:
                raise CheckpointMismatchError(
                    f"resume: the sweep in {checkpointer.directory} has {key}={record.get('sweep', {}).get(key)!r}, "
                    f"this one {identity[key]!r}; give the same {key} or a new --workdir"
                )

    restored = checkpointer.restore_newest(lambda r: lanes.restore_target(r, fresh), check=check)
    if restored is None:  # the checkpoints went away since latest_step
        return fresh, empty, 0.0, False
    step, state, record = restored
    histories = [list(h) for h in record["metrics"]]
    done = max((line["epoch"] for line in histories[0] if is_epoch_line(line)), default=0)
    if step > experiment.total_steps:
        raise ValueError(
            f"epochs: {config.epochs} is fewer than the {done} epochs (step {step}) the sweep's checkpoint has done; "
            f"give --epochs {done} or more"
        )
    lanes.load_record(record)
    if step == experiment.total_steps and all(h and h[-1].get("final") for h in histories):
        for path, history in zip(metrics_paths, histories, strict=True):
            write_metrics(path, history)
        return state, _Progress(histories, np.zeros(lanes.count)), 0.0, True
    histories = [[line for line in h if not line.get("final")] for h in histories]
    for path, history in zip(metrics_paths, histories, strict=True):
        write_metrics(path, history)
    progress = _Progress(histories, np.asarray(record["loss_sums"], np.float64))
    return state, progress, float(record.get("elapsed_seconds", 0.0)), False


# -- the sweep ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """The outcome of :func:`sweep`.

    Attributes:
      option: the swept flag.
      values: its values, in the order given.
      mode: ``"vmap"`` (one program) or ``"sequential"`` (one run after another).
      reason: why that mode.
      metric: the selection metric, ``"val_accuracy"`` (higher is better) or ``"val_mae"`` (lower is better).
      rows: one dict per value: ``value``, ``metric`` (final validation metric, ``None`` if diverged),
        ``val_loss``, ``train_loss`` (final epoch's mean), ``metrics_path``.
      best: the chosen value, or ``None`` when every value diverged.
      command: the ``jaxalgo train`` command of the chosen value (``None`` when none was chosen).
      workdir: the sweep's directory.
      states: each value's final train state, in value order (``None`` for a sweep that was already finished,
        loaded from its metrics).
    """

    option: str
    values: tuple[float, ...]
    mode: str
    reason: str
    metric: str
    rows: tuple[dict[str, Any], ...]
    best: float | None
    command: str | None
    workdir: str
    states: tuple[Any, ...] | None = None


def value_dir(option: str, value: float) -> str:
    """The directory name of one value's run: ``OPTION=VALUE`` (``lr=0.001``)."""
    return f"{option}={float(value)!r}"


def sweep(
    config: RunConfig,
    option: str,
    values: Sequence[float] | str,
    workdir: str | os.PathLike,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    mode: SweepMode = "auto",
    resume: bool = False,
    plot: bool = True,
) -> SweepResult:
    """Trains one run of ``config`` per value of float option ``option`` and picks the best on validation data.

    Args:
      config: the run configuration; its own value of ``option`` is ignored.
      option: a float flag of the chosen estimator or optimizer (``"lr"``), or of the model, strategy or
        low-rank method (always one run after another); see :func:`float_options`.
      values: at least 2 distinct values, or a spec for :func:`parse_values` (``"1e-4:1e-1:8"``).
      workdir: the sweep's directory (created): one subdirectory per value, ``sweep.json``, ``sweep.png``.
      val_fraction: the fraction of the training split held out for selection (:func:`validation_split`).
      mode: ``"auto"`` (vmapped where possible, see :func:`plan`), ``"vmap"`` (refused when not possible) or
        ``"sequential"``.
      resume: continue from the sweep's checkpoints (the result is that of an uninterrupted sweep).
      plot: write ``sweep.png`` (skipped, with a note, when matplotlib is not installed).

    Returns:
      A :class:`SweepResult`. The value chosen maximises the final validation accuracy (classification) or
      minimises the final validation MAE (regression) among values whose run stayed finite; ties go to the value
      listed first.

    Raises:
      ValueError: a bad option, value, fraction, mode or configuration (naming it), before training.
      FileExistsError: ``workdir`` holds a sweep and ``resume`` is False.
    """
    values = parse_values(values, argument="values") if isinstance(values, str) else check_values(values)
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    val_fraction = check_fraction(val_fraction)
    family = check_option(config, option)
    configs = [_config_with(config, option, v) for v in values]
    workdir = os.path.abspath(os.fspath(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(f"workdir: {os.fspath(workdir)!r} exists and is a file; give a directory")
    experiment = validation_experiment(configs[0], val_fraction)
    chosen, reason = plan(configs[0], option, experiment)
    if mode == "vmap" and chosen != "vmap":
        raise ValueError(f"mode: 'vmap' is not possible here: {reason}; use mode 'auto' or 'sequential'")
    if mode == "sequential":
        chosen, reason = "sequential", "one run after another, as requested"
    identity = {"option": option, "values": list(values), "val_fraction": val_fraction, "mode": chosen}
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):
        _check_sweep_file(workdir, identity, resume=resume)
        _write_sweep_file(workdir, {**identity, "reason": reason, "config": config.to_dict(), "status": "running"})
        paths = []
        for value in values:
            os.makedirs(os.path.join(workdir, value_dir(option, value)), exist_ok=True)
            paths.append(os.path.join(workdir, value_dir(option, value), METRICS_FILE))
        if not config.quiet:
            print(f"sweep: {option} over {len(values)} values, {chosen}: {reason}", file=sys.stderr)
        if chosen == "vmap":
            lanes = _VmapLanes(configs[0], experiment, family, option, values)
            args = (lanes, config, experiment, option, values, workdir, paths, identity)
            histories, states = _sweep_vmapped(*args, resume=resume)
        else:
            histories, states = _sweep_sequential(configs, option, values, val_fraction, workdir, paths, resume)
        result = _result(configs, option, values, chosen, reason, histories, paths, workdir, states)
        _write_sweep_file(workdir, {**identity, "reason": reason, "config": config.to_dict(), **_summary(result)})
        if plot and has_matplotlib():
            plot_sweep(result, os.path.join(workdir, PLOT_FILE))
        elif plot:
            print("plot: skipped (matplotlib is not installed; pip install jaxalgo[plot])", file=sys.stderr)
    return result


def _config_with(config: RunConfig, option: str, value: float) -> RunConfig:
    try:
        return config.with_flags(**{option: value})
    except ValueError as error:
        raise ValueError(f"values: {value!r} is not allowed for {option} ({error})") from None


def _fingerprint(config: RunConfig, option: str) -> dict[str, Any]:
    return {k: v for k, v in config.fingerprint().items() if k != option}


def _sweep_vmapped(lanes, config, experiment, option, values, workdir, paths, identity, *, resume):
    checkpointer = Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints, report=_report
    )
    try:
        fingerprint = _fingerprint(config, option)
        args = (lanes, experiment, config, checkpointer, paths, identity, fingerprint, values, option)
        histories, stacked = _train_lanes(*args, resume=resume)
    finally:
        checkpointer.close()
    states = tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(values)))
    return histories, states


def _sweep_sequential(configs, option, values, val_fraction, workdir, paths, resume):
    histories, states = [], []
    for config, value, path in zip(configs, values, paths, strict=True):
        experiment = validation_experiment(config, val_fraction)
        lanes = _RunnerLanes(make_runner(config, experiment), experiment)
        directory = os.path.join(workdir, value_dir(option, value), CHECKPOINT_DIR)
        checkpointer = Checkpointer(directory, max_to_keep=config.keep_checkpoints, report=_report)
        identity = {"option": option, "values": [value], "val_fraction": val_fraction, "mode": "sequential"}
        try:
            fingerprint = _fingerprint(config, option)
            args = (lanes, experiment, config, checkpointer, [path], identity, fingerprint, [value], option)
            lane_histories, state = _train_lanes(*args, resume=resume)
        finally:
            checkpointer.close()
        histories.extend(lane_histories)
        states.append(state)
    return histories, tuple(states)


def _report(line: str) -> None:
    print(line, file=sys.stderr)


def _check_sweep_file(workdir: str, identity: dict[str, Any], *, resume: bool) -> None:
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        if resume:
            print(f"resume: no sweep in {workdir}; starting from step 0", file=sys.stderr)
        return
    if not resume:
        raise FileExistsError(
            f"workdir: {workdir!r} already holds a sweep ({SWEEP_FILE}); pass --resume to continue it, or choose a "
            "new --workdir"
        )
    with open(path) as f:
        saved = json.load(f)
    for key in _IDENTITY:
        if saved.get(key) != identity[key]:
            raise ValueError(
                f"{key}: the sweep in {workdir} has {saved.get(key)!r}, this one {identity[key]!r}; resume with the "
                f"same {key}, or choose a new --workdir"
            )


def _write_sweep_file(workdir: str, content: dict[str, Any]) -> None:
    path = os.path.join(workdir, SWEEP_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)


def read_sweep(workdir: str | os.PathLike) -> dict[str, Any]:
    """The contents of a sweep's ``sweep.json``: the plan (option, values, mode, reason, config) and, once it is
    finished, ``rows``, ``best`` and ``command``."""
    with open(os.path.join(os.fspath(workdir), SWEEP_FILE)) as f:
        return json.load(f)


def _result(configs, option, values, mode, reason, histories, paths, workdir, states) -> SweepResult:
    finals = [next(line for line in reversed(h) if line.get("final")) for h in histories]
    epochs = [[line for line in h if is_epoch_line(line)][-1] for h in histories]
    metric = "val_accuracy" if "val_accuracy" in finals[0] else "val_mae"
    rows = tuple(
        {
            "value": value,
            "metric": None if final.get("diverged") else final.get(metric),
            "val_loss": final.get("val_loss"),
            "train_loss": last.get("train_loss"),
            "metrics_path": path,
        }
        for value, final, last, path in zip(values, finals, epochs, paths, strict=True)
    )
    best = select(rows, maximize=metric == "val_accuracy")
    command = None if best is None else train_command(configs[values.index(best)])
    return SweepResult(option, tuple(values), mode, reason, metric, rows, best, command, workdir, states)


def select(rows: Sequence[dict[str, Any]], *, maximize: bool) -> float | None:
    """The ``value`` of the row with the best finite ``metric`` and finite losses (first among equals), or
    ``None`` when there is none."""
    best, best_metric = None, None
    for row in rows:
        score = row["metric"]
        if score is None or row["val_loss"] is None or row["train_loss"] is None or not math.isfinite(score):
            continue
        if best_metric is None or (score > best_metric if maximize else score < best_metric):
            best, best_metric = row["value"], score
    return best


def _summary(result: SweepResult) -> dict[str, Any]:
    rows = [{k: v for k, v in row.items()} for row in result.rows]
    return {"status": "finished", "metric": result.metric, "rows": rows, "best": result.best, "command": result.command}


def _shell_value(value: Any) -> str:
    if isinstance(value, bool):
        raise TypeError("booleans are spelled as --flag / --no-flag")
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def train_command(config: RunConfig) -> str:
    """The ``jaxalgo train`` command line of ``config``: every flag that differs from the library's default for
    the chosen entries (``RunConfig.from_dict(...).flags()`` of the command's flags equals ``config.flags()``)."""
    view = config.flags()
    families: dict[str, Any] = {name: view[name] for name in FAMILY_NAMES}
    defaults = RunConfig.from_flags(families).flags()
    words = ["jaxalgo", "train"]
    for name, value in view.items():
        if name in families:
            if value != RunConfig().flags()[name]:
                words += [f"--{name}", str(value)]
            continue
        if value == defaults.get(name) or name == "quiet":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            words += [flag, _shell_value(value)]
    return shlex.join(words)


def format_table(result: SweepResult) -> str:
    """The closing table: one row per value, its final validation metric and losses, the choice marked."""
    percent = result.metric == "val_accuracy"
    title = "val accuracy" if percent else "val MAE"
    header = (result.option, title, "val loss", "train loss", "")
    lines = []
    for row in result.rows:
        metric = row["metric"]
        shown = "diverged" if metric is None else (f"{100 * metric:.2f}%" if percent else f"{metric:.4f}")
        losses = [("-" if row[k] is None else f"{row[k]:.4f}") for k in ("val_loss", "train_loss")]
        mark = "<- chosen" if row["value"] == result.best else ""
        lines.append((f"{row['value']:g}", shown, *losses, mark))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *lines]]
    rule = "-" * max(len(t) for t in text)
    return "\n".join([rule, text[0], rule, *text[1:], rule])


def has_matplotlib() -> bool:
    """Whether matplotlib, the optional dependency of :func:`plot_sweep`, is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> None:
    """Writes a PNG of the final validation metric against the value (log x; diverged values omitted).

    matplotlib (``pip install jaxalgo[plot]``) is imported here only; the figure is drawn on its own Agg canvas, so
    pyplot's global state (a notebook's backend) is left alone.

    Raises:
      ImportError: matplotlib is not installed.
    """
    if not has_matplotlib():
        raise ImportError("plot: needs matplotlib, which is not installed; pip install jaxalgo[plot]")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = [(row["value"], row["metric"]) for row in result.rows if row["metric"] is not None]
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale = 100.0 if result.metric == "val_accuracy" else 1.0
    if finite:
        xs, ys = zip(*finite, strict=True)
        ax.plot(xs, [scale * y for y in ys], marker="o")
    if result.best is not None:
        best = next(row for row in result.rows if row["value"] == result.best)
        ax.plot([best["value"]], [scale * best["metric"]], marker="*", markersize=14, linestyle="none")
    if all(v > 0 for v in result.values):
        ax.set_xscale("log")
    ax.set_xlabel(result.option)
    ax.set_ylabel("final validation accuracy (%)" if scale == 100.0 else "final validation MAE")
    ax.set_title(f"sweep of {result.option} ({result.mode})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


__all__ = [
    "DEFAULT_VAL_FRACTION",
    "MODES",
    "PLOT_FILE",
    "SWEEP_FILE",
    "SweepResult",
    "check_fraction",
    "check_option",
    "check_values",
    "float_options",
    "format_table",
    "has_matplotlib",
    "parse_values",
    "plan",
    "plot_sweep",
    "read_sweep",
    "select",
    "sweep",
    "train_command",
    "validation_experiment",
    "validation_split",
    "value_dir",
]
