"""The training driver: epochs, checkpoints, metrics and progress around any runner.

``train_and_evaluate(config, workdir)`` is the whole job the CLI runs:

- :func:`setup` validates the configuration, loads the data, builds the model, the estimator and the optimizer
  from the chosen catalogue entries, raising any error before training starts;
- :func:`make_runner` asks the chosen low-rank method and strategy for the runner (:mod:`jaxalgo.runner`);
- the loop calls only the runner protocol, so it is the same for every estimator, strategy and low-rank method.

The reusable pieces (train state, the jit-compiled step, evaluation) live in :mod:`jaxalgo.runner` and are
re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxalgo import data, losses, models
from jaxalgo.checkpoint import Checkpointer, check_record_matches, newest_record
from jaxalgo.config import RunConfig
from jaxalgo.grads import Problem
from jaxalgo.options import errors_as_flags
from jaxalgo.runner import (
    Experiment,
    Runner,
    TrainState,
    make_evaluate,
    make_loss_fn,
    make_train_step,
    run_keys,
)
from jaxalgo.tensorboard_log import TENSORBOARD_DIR, TensorBoardWriter, is_epoch_line, require
from jaxalgo.workdir import (
    WorkdirBusyError,
    WorkdirLock,
    append_metrics,
    describe_holder,
    read_metrics,
    write_metrics,
)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def check_capabilities(config: RunConfig) -> None:
    """Refuses combinations the chosen entries declare they cannot run (by capability, never by name): the
    strategy's ``check`` decides which estimators and batch sizes it runs on these devices, the low-rank method's
    ``check`` which strategies and estimators it works with."""
    strategy, estimator = config.parallel.options, config.estimator.options
    try:
        with errors_as_flags(config.entry("parallel")):
            strategy.check(estimator, batch_size=config.batch_size, devices=jax.devices())
    except ValueError as error:
        if not str(error).startswith("parallel: "):
            raise
        reason = str(error).removeprefix("parallel: ")
        raise ValueError(
            f"parallel: estimator {config.estimator.name!r} {reason}; got parallel={config.parallel.name!r}"
        ) from None
    try:
        config.lowrank.options.check(strategy, estimator)
    except ValueError as error:
        reason = str(error).removeprefix("lowrank: ")
        raise ValueError(
            f"lowrank: {config.lowrank.name!r} with parallel={config.parallel.name!r} and estimator="
            f"{config.estimator.name!r}: {reason}"
        ) from None


def _available_bytes() -> tuple[int, str]:
    """Memory one device may use, and what it is: the accelerator's limit, or the host's RAM shared by the
    host's (CPU) devices."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = len(jax.local_devices())
    return ram // count, "host RAM" if count == 1 else f"host RAM per device ({count} devices share it)"


def _gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB"


def check_memory(config: RunConfig, build: Any) -> None:
    """Refuses, before anything is allocated, a model or an estimator whose parameters, optimizer state and
    tangents cannot fit on one device (a lower bound: activations are not counted). The model is built abstractly
    (``nnx.eval_shape``); a factory that cannot be traced so is not checked."""
    try:
        abstract = nnx.eval_shape(build)
        params = nnx.state(abstract, nnx.Param)
        opt_state = jax.eval_shape(config.optimizer.options.build().init, params)
    except Exception:  # a user's factory with host-side work: built for real, unchecked
        return
    param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
    model_bytes = 2 * param_bytes + opt_bytes  # parameters, gradients, optimizer state
    working = getattr(config.estimator.options, "working_bytes", None)
    tangent_bytes = working(param_bytes) if callable(working) else 0
    available, what = _available_bytes()
    if model_bytes + tangent_bytes <= available:
        return
    if tangent_bytes > model_bytes:
        raise ValueError(
            f"tangents: the tangents held at once need about {_gb(tangent_bytes)} ({param_count:,} parameters each) "
            f"and the model with its optimizer state {_gb(model_bytes)}, but {what} is {_gb(available)}; use "
            "--batching scan (one tangent at a time) or --batching chunk --chunk-size N, or fewer --tangents"
        )
    raise ValueError(
        f"model: {param_count:,} parameters need about {_gb(model_bytes)} with their gradients and optimizer state, "
        f"but {what} is {_gb(available)}; choose a smaller model"
    )


def _output_loss(config: RunConfig, dataset: data.Dataset) -> tuple[losses.LossName, losses.OutputLoss]:
    loss_name = losses.default_loss(dataset.task) if config.loss == "auto" else config.loss
    if dataset.task == "regression" and loss_name != "mse":
        raise ValueError(f"loss: {loss_name!r} is a classification loss; dataset {dataset.name!r} is regression")
    if dataset.task == "classification" and loss_name == "mse":
        raise ValueError(f"loss: 'mse' is a regression loss; dataset {dataset.name!r} is classification")
    return loss_name, losses.get_loss(loss_name)


def setup(config: RunConfig) -> Experiment:
    """Validates ``config`` and builds the run; every configuration error is raised here, before training."""
    if not isinstance(config, RunConfig):
        raise TypeError(f"config: expected a jaxalgo.config.RunConfig, got {type(config).__name__}")
    check_capabilities(config)
    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        raise FileNotFoundError(f"data_dir: {config.data_dir!r} is not a directory")
    dataset = data.load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        seed=config.seed,
        test_fraction=config.test_fraction,
        standardize=config.standardize,
    )
    data.validate_batch_size(config.batch_size, dataset.num_train)
    keys = run_keys(config.seed)
    with errors_as_flags(config.entry("model")):
        build = lambda: config.model.options.build(dataset.input_shape, dataset.num_outputs, key=keys.init)
        check_memory(config, build)
        module = build()
    chain: models.ChainFn | models.MixedPrecisionChain
    chain, params = models.split_chain(module)
    if config.compute_dtype != "float32":  # bf16 activations and matmuls; params, optimizer state stay float32
        chain = models.with_compute_dtype(chain, config.compute_dtype)
    loss_name, output_loss = _output_loss(config, dataset)
    problem = Problem.from_chain(
        chain,
        output_loss,
        loss_name=loss_name,
        input_shape=tuple(dataset.input_shape),
        num_outputs=dataset.num_outputs,
        train_targets=dataset.y_train,
        key=keys.estimator,
    )
    with errors_as_flags(config.entry("estimator")):
        estimator = config.estimator.options.build(problem)
    optimizer = config.optimizer.options
    return Experiment(
        problem=problem,
        dataset=dataset,
        init_params=params,
        estimator=estimator,
        estimator_options=config.estimator.options,
        optimizer=optimizer.build(),
        lr=optimizer.lr,
        batch_size=config.batch_size,
        epochs=config.epochs,
        run_key=keys.step,
    )


def make_runner(config: RunConfig, experiment: Experiment) -> Runner:
    """The runner of the chosen low-rank method on the chosen strategy."""
    return config.lowrank.options.make_runner(experiment, config.parallel.options)


def _prepare_workdir(workdir: str | os.PathLike) -> str:
    path = os.path.abspath(os.fspath(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"workdir: {os.fspath(workdir)!r} exists and is a file; give a directory")
    os.makedirs(path, exist_ok=True)
    return path


class Preempted(RuntimeError):
    """The run got SIGTERM or SIGUSR1 (a scheduler's preemption notice); a checkpoint of the step it reached was
    saved on every process, and ``--resume`` continues exactly. The command line exits with
    :data:`PREEMPTED_EXIT_STATUS`."""


PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL: try again (with --resume)


class _PreemptionNotice:
    """SIGTERM and SIGUSR1 as a request to checkpoint and stop at the next step boundary, agreed across processes.

    With one process, a Python handler sets a flag. With several, jax's preemption service (started by
    ``jax.distributed``) owns SIGTERM and agrees on one step for every process
    (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`); SIGUSR1, as SLURM's ``--signal``
    sends it, is forwarded to it as SIGTERM. ``requested`` must be called at every boundary on every process, with
    a counter that advances by one per call.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._calls = 0
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> _PreemptionNotice:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for signum in self.SIGNALS if not self._multi else (signal.SIGUSR1,):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.received = signum
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption service, which tells every process

    def requested(self) -> bool:
        self._calls += 1
        if self._multi:
            return bool(multihost_utils.reached_preemption_sync_point(self._calls))
        return self.received is not None


def _crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]``."""
    return every > 0 and after // every > before // every


@dataclasses.dataclass
class _RunRecord:
    """What a checkpoint records about the run beyond the arrays, so that a resumed run writes exactly the
    metrics of the uninterrupted one.

    Attributes:
      history: every metrics line written so far (the metrics file is rewritten from it on resume).
      loss_sum: float64 sum of this epoch's step losses folded so far (in step order).
      pending: step losses (device arrays) not yet folded into ``loss_sum``.
    """

    history: list[dict[str, Any]]
    loss_sum: float = 0.0
    pending: list[jax.Array] = dataclasses.field(default_factory=list)

    def fold(self) -> float:
        for loss in self.pending:
            self.loss_sum += float(loss)
        self.pending.clear()
        return self.loss_sum


def train_and_evaluate(config: RunConfig, workdir: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Trains as configured, evaluating every epoch; returns the final evaluation record.

    Metrics are appended as JSON lines to ``workdir/metrics.jsonl`` (the last line is the final evaluation);
    checkpoints go to ``workdir/checkpoints`` every ``config.checkpoint_every`` steps (or every epoch) and at
    the end, each with the metrics written so far and checksums of its arrays. One run at a time holds the
    workdir's lock. With ``resume=True`` the run continues from the newest checkpoint that verifies (falling
    back past damaged ones), rewrites the metrics file from it, and ends with exactly the state and the metrics
    lines an uninterrupted run would have written. Fields that cannot change what was computed so far (epochs,
    learning rate, logging, checkpoint cadence) may differ from the checkpoint's; each change is recorded. With
    ``config.tensorboard``, ``workdir/tensorboard`` holds TensorBoard event files equal to the metrics file's epoch
    lines (rewritten from it at the start, so a resume neither duplicates nor loses a point).

    Raises:
      ValueError, OSError: bad configuration, data or workdir (ValueError or a subclass), before training starts.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
      Preempted: SIGTERM or SIGUSR1 arrived; a checkpoint was saved.
    """
    if config.tensorboard:
        require("tensorboardX", "tensorboard")  # before any work
    workdir = _prepare_workdir(workdir)
    experiment = setup(config)
    runner = make_runner(config, experiment)
    with _workdir_lock(workdir, runner.is_primary) as lock:
        if lock is not None and lock.took_over:
            print(f"workdir: took over the lock left by {describe_holder(lock.took_over)}", file=sys.stderr)
        report = (lambda line: print(line, file=sys.stderr)) if runner.is_primary else None
        checkpointer = Checkpointer(
            os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints, report=report
        )
        metrics_path = os.path.join(workdir, METRICS_FILE)
        board = None
        try:
            start = _initial_state(config, experiment, checkpointer, runner, resume=resume, metrics_path=metrics_path)
            board = _open_tensorboard(config, workdir, runner, metrics_path, start)
            if isinstance(start, dict):
                return start  # a finished run: nothing to do
            state, elapsed, run_record = start
            return _run(config, experiment, state, elapsed, checkpointer, metrics_path, runner, run_record, board)
        finally:
            checkpointer.close()
            if board is not None:
                board.close()


def _open_tensorboard(
    config: RunConfig, workdir: str, runner: Runner, metrics_path: str, start: Any
) -> TensorBoardWriter | None:
    """With ``--tensorboard``, on the primary process: the event files rewritten from the metrics file as the
    start left it (a resume has just rewritten it from its checkpoint)."""
    if not (config.tensorboard and runner.is_primary):
        return None
    elapsed = start.get("seconds", 0.0) if isinstance(start, dict) else start[1]
    board = TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR), started=time.time() - elapsed)
    board.rewrite(read_metrics(metrics_path))
    return board


@contextlib.contextmanager
def _workdir_lock(workdir: str, primary: bool):
    """The workdir's lock, held by process 0 for the whole run; every process stops if it cannot be taken."""
    lock, error = None, None
    if primary:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusyError as busy:
            error = busy
    if jax.process_count() > 1:
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is None and not int(taken):
            error = WorkdirBusyError(f"workdir: {workdir!r} is in use by another run (see process 0's message)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def resume_config(workdir: str | os.PathLike, flags: Mapping[str, Any] | None = None) -> RunConfig | None:
    """The configuration of the run in ``workdir`` (from its newest checkpoint that verifies) with ``flags``
    changed, or ``None`` when ``workdir`` has no checkpoint. Reads files only (no jax), so a command line can call
    it before it starts devices. Whether the changes may be resumed is checked when the run restores its state.
    """
    record = newest_record(os.path.join(os.fspath(workdir), CHECKPOINT_DIR))
    if record is None or "config" not in record:
        return None
    saved = RunConfig.from_dict(record["config"])
    return saved.with_flags(**dict(flags or {}))


def _saved_fingerprint(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its fingerprint in today's flag view (records of older versions hold every field)."""
    saved = record.get("config_fingerprint")
    if saved is None:
        return record
    try:
        normalized = RunConfig.from_dict(saved).fingerprint()
    except (ValueError, TypeError):
        return record  # a field this version does not know: compared as recorded, and reported
    return {**record, "config_fingerprint": normalized}


def _changes(record: dict[str, Any], config: RunConfig) -> dict[str, list[Any]]:
    """``{flag: [checkpoint's value, this run's value]}`` of the (resumable) flags that differ."""
    try:
        saved = RunConfig.from_dict(record.get("config", {})).flags()
    except (ValueError, TypeError):
        return {}
    now = config.flags()
    return {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _history_of(record: dict[str, Any], metrics_path: str, step: int) -> list[dict[str, Any]]:
    """The metrics lines a checkpoint covers: its own copy, or (checkpoints of older versions) the metrics file's
    lines up to its step."""
    if "metrics" in record:
        return list(record["metrics"])
    if not os.path.exists(metrics_path):
        return []
    return [line for line in read_metrics(metrics_path) if line.get("step", 0) <= step]


def _restore_metrics(metrics_path: str, history: list[dict[str, Any]]) -> None:
    """Makes the metrics file hold exactly ``history`` (rewritten only when it differs or cannot be read)."""
    try:
        if os.path.exists(metrics_path) and read_metrics(metrics_path) == history:
            return
    except ValueError:
        pass  # a damaged metrics file: the checkpoint's copy replaces it
    write_metrics(metrics_path, history)


def _initial_state(
    config: RunConfig,
    experiment: Experiment,
    checkpointer: Checkpointer,
    runner: Runner,
    *,
    resume: bool,
    metrics_path: str,
) -> tuple[Any, float, _RunRecord] | dict[str, Any]:
    """The state to start from, or the final record of a finished run (a resume with nothing left to do)."""
    fresh = runner.init(experiment.init_state())
    latest = checkpointer.latest_step()
    if latest is None:
        if resume:
            print(f"resume: no checkpoint in {checkpointer.directory}; starting from step 0", file=sys.stderr)
        if runner.is_primary:
            write_metrics(metrics_path, [])
        return fresh, 0.0, _RunRecord(history=[])
    if not resume:
        raise FileExistsError(
            f"workdir: {os.path.dirname(checkpointer.directory)!r} already holds checkpoints (latest step "
            f"{latest}); pass --resume to continue that run, or choose a new --workdir"
        )

    def check(record: dict[str, Any]) -> None:
        check_record_matches(_saved_fingerprint(record), config.fingerprint(), checkpointer.directory)

    restored = checkpointer.restore_newest(lambda r: runner.restore_target(r, fresh), check=check)
    assert restored is not None  # a checkpoint exists (latest above); one that does not verify raises
    step, state, record = restored
    history = _history_of(record, metrics_path, step)
    done = max((line["epoch"] for line in history if is_epoch_line(line)), default=0)
    if step > experiment.total_steps:
        raise ValueError(
            f"epochs: {config.epochs} is fewer than the {done} epochs (step {step}) the checkpoint in "
            f"{checkpointer.directory} has done; give --epochs {done} or more"
        )
    final = [line for line in history if line.get("final")]
    if final and step == experiment.total_steps:
        if runner.is_primary:
            _restore_metrics(metrics_path, history)
            print(
                f"resume: the run in {os.path.dirname(checkpointer.directory)} is finished ({done} epochs, step "
                f"{step}); nothing to do (give --epochs {done + 1} or more to train further)",
                file=sys.stderr,
            )
        return {**final[-1], "state": state}
    history = [line for line in history if not line.get("final")]
    changed = _changes(record, config)
    if changed:
        history.append({"step": step, "event": "resume", "changed": changed})
    runner.load_record(record)
    if runner.is_primary:
        _restore_metrics(metrics_path, history)
    run_record = _RunRecord(history=history, loss_sum=float(record.get("epoch_loss_sum", 0.0)))
    return state, float(record.get("elapsed_seconds", 0.0)), run_record


def _run(
    config: RunConfig,
    experiment: Experiment,
    state: Any,
    elapsed: float,
    checkpointer: Checkpointer,
    metrics_path: str,
    runner: Runner,
    run_record: _RunRecord,
    board: TensorBoardWriter | None = None,
) -> dict[str, Any]:
    spe, total = experiment.steps_per_epoch, experiment.total_steps
    data_seed = run_keys(config.seed).data_seed
    step = int(state.step)
    started = time.perf_counter() - elapsed
    workdir = os.path.dirname(checkpointer.directory)

    def write(*lines: dict[str, Any]) -> None:
        run_record.history.extend(lines)
        if runner.is_primary:
            append_metrics(metrics_path, lines)
        if board is not None:
            board.add(lines)

    def log_events() -> None:
        events = runner.events()
        if events:
            write(*events)

    def save(state: Any, step: int, *lines: dict[str, Any]) -> None:
        if not bool(_all_finite(state.params)):
            what = f"parameters became NaN or infinite by step {step}"
            raise NonFiniteLossError(_diverged(what, config, checkpointer))
        record = {
            "config": config.to_dict(),
            "config_fingerprint": config.fingerprint(),
            "elapsed_seconds": time.perf_counter() - started,
            "epoch_loss_sum": run_record.fold(),
            "metrics": [*run_record.history, *lines],
            **runner.record(state),
        }
        checkpointer.save(step, state, record)
        if lines:
            write(*lines)

    def check_finite(loss: jax.Array | float, step: int) -> float:
        value = float(loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(_diverged(f"loss became {value} at step {step}", config, checkpointer))
        return value

    interactive = sys.stderr.isatty() and not config.quiet
    progress = tqdm(total=total, initial=step, disable=not interactive, unit="step", dynamic_ncols=True)
    rows = {} if runner.batch_rows is None else {"rows": runner.batch_rows}
    state = runner.after_step(step, state)  # e.g. OIALR with delay 0 converts before the first step
    log_events()
    with _PreemptionNotice() as notice:
        try:
            while step < total:
                epoch, offset = divmod(step, spe)
                batches = data.iterate_batches(
                    experiment.dataset, config.batch_size, seed=data_seed, epoch=epoch, start_step=offset, **rows
                )
                while offset < spe:
                    count = runner.window(step, spe - offset)
                    if count == 1:
                        state, loss = runner.step(state, next(batches), step)
                        losses = [loss]
                    else:
                        state, losses = runner.run_window(state, [next(batches) for _ in range(count)], step)
                    before, step, offset = step, step + count, offset + count
                    state = runner.after_step(step, state)
                    log_events()
                    run_record.pending.extend(losses)
                    if _crossed(before, step, config.log_every):
                        progress.set_postfix(epoch=epoch + 1, loss=f"{check_finite(losses[-1], step):.4f}")
                    progress.update(count)
                    if offset == spe:
                        break
                    if _crossed(before, step, config.checkpoint_every):
                        check_finite(losses[-1], step)
                        save(state, step)
                    if notice.requested():
                        check_finite(losses[-1], step)
                        if checkpointer.latest_step() != step:  # not just saved by the cadence above
                            save(state, step)
                        raise Preempted(_preempted(notice, step, workdir))
                train_loss = check_finite(run_record.fold() / spe, step)
                run_record.loss_sum = 0.0
                state = runner.end_epoch(state, epoch, train_loss)
                line = {"step": step, "epoch": epoch + 1, "train_loss": train_loss, **runner.evaluate(state)}
                line.update(runner.epoch_metrics())
                line["seconds"] = time.perf_counter() - started
                lines = [line]
                if step == total:
                    closing = {"final": True, "step": step, "epoch": config.epochs, **runner.evaluate(state)}
                    closing.update(runner.final_metrics())
                    closing.update(steps=step, seconds=time.perf_counter() - started)
                    lines.append(closing)
                save(state, step, *lines)
                if step < total and notice.requested():
                    raise Preempted(_preempted(notice, step, workdir))
        finally:
            progress.close()
    final = run_record.history[-1] if run_record.history and run_record.history[-1].get("final") else None
    if final is None:  # a resume at the end of the last epoch of a run killed before its final line
        final = {"final": True, "step": step, "epoch": config.epochs, **runner.evaluate(state)}
        final.update(runner.final_metrics())
        final.update(steps=step, seconds=time.perf_counter() - started)
        write(final)
    if not config.quiet and runner.is_primary:
        epochs = [line for line in run_record.history if is_epoch_line(line)]
        print(format_summary(config, final, last_epoch=epochs[-1] if epochs else None))
    return {**final, "state": state}


def _diverged(what: str, config: RunConfig, checkpointer: Checkpointer) -> str:
    """The message of a non-finite loss: where the last good checkpoint is and the command that resumes from it
    with a smaller learning rate."""
    steps, workdir = checkpointer.all_steps(), os.path.dirname(checkpointer.directory)
    lr = config.flags().get("lr")
    smaller = f" --lr {lr / 10:g}" if isinstance(lr, float) else ""
    if not steps:
        return f"{what}; training stopped before its first checkpoint. Start again with a smaller learning rate."
    return (
        f"{what}; training stopped. The last good checkpoint is step {steps[-1]} in {workdir}. To continue from it "
        f"with a smaller learning rate: jaxalgo train --workdir {workdir} --resume{smaller}"
    )


def _preempted(notice: _PreemptionNotice, step: int, workdir: str) -> str:
    name = signal.Signals(notice.received).name if notice.received else "a preemption notice"
    return (
        f"preempted by {name}: saved a checkpoint at step {step} in {workdir}; continue with "
        f"jaxalgo train --workdir {workdir} --resume"
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def format_summary(config: RunConfig, final: dict[str, Any], *, last_epoch: Mapping[str, Any] | None = None) -> str:
    """A short table of the final evaluation.

    Beyond the metric, the loss, the steps and the time, it shows the figures the run's metrics carry: the bytes
    each device sent (data-parallel strategies: ``comm_bytes_per_step`` and its cross-node part, per step and per
    epoch, i.e. times ``steps / epochs``, means over the run), the trainable parameters (OIALR:
    ``trainable_fraction_model``, ``trainable_fraction`` of the converted layers) and AB-training's
    ``ab_compression_ratio`` (dense over low-rank parameter count). A figure is looked up in ``final`` first, then
    in ``last_epoch`` (the last epoch's metrics line), and its row is left out when neither has it.
    """
    figures = {**(last_epoch or {}), **final}
    rows = [("model", config.model.name), ("dataset", config.dataset), ("estimator", config.estimator.name)]
    if "test_accuracy" in final:
        rows.append(("test accuracy", f"{100 * final['test_accuracy']:.2f}%"))
    if "test_mae" in final:
        rows.append(("test MAE", f"{final['test_mae']:.4f}"))
    rows += [("test loss", f"{final['test_loss']:.4f}"), ("steps", str(final["steps"]))]
    rows += _communication_rows(figures, final["steps"] / max(1, final.get("epoch", config.epochs)))
    rows += _parameter_rows(figures)
    rows.append(("time", f"{final['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def _bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.1f} kB"


def _communication_rows(figures: Mapping[str, Any], steps_per_epoch: float) -> list[tuple[str, str]]:
    """The bytes one device sent, per step and per epoch (rows of :func:`format_summary`)."""
    if "comm_bytes_per_step" not in figures:
        return []
    sent, cross = figures["comm_bytes_per_step"], figures.get("comm_cross_node_bytes_per_step", 0.0)
    return [
        ("sent per device", f"{sent / 1e3:.1f} kB per step ({cross / 1e3:.1f} kB across nodes)"),
        ("sent per epoch", f"{_bytes(sent * steps_per_epoch)} ({_bytes(cross * steps_per_epoch)} across nodes)"),
    ]


def _parameter_rows(figures: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The trainable-parameter figures (rows of :func:`format_summary`)."""
    rows = []
    if "trainable_fraction_model" in figures:
        layers = figures.get("trainable_fraction")
        of_layers = "" if layers is None else f" ({100 * layers:.1f}% of the low-rank layers' dense size)"
        rows.append(("trainable params", f"{100 * figures['trainable_fraction_model']:.1f}% of the model{of_layers}"))
    if "ab_compression_ratio" in figures:
        rows.append(("AB compression", f"{figures['ab_compression_ratio']:.2f}x fewer parameters than dense"))
    return rows


def load_final_params(workdir: str | os.PathLike, config: RunConfig) -> TrainState:
    """The train state of the latest checkpoint in ``workdir`` (restored into this config's structure)."""
    experiment = setup(config)
    checkpointer = Checkpointer(os.path.join(os.fspath(workdir), CHECKPOINT_DIR))
    try:
        latest = checkpointer.latest_step()
        if latest is None:
            raise FileNotFoundError(f"workdir: no checkpoint in {os.fspath(workdir)!r}")
        runner = make_runner(config, experiment)
        like = runner.restore_target(checkpointer.read_record(latest), runner.init(experiment.init_state()))
        return checkpointer.restore(latest, like)
    finally:
        checkpointer.close()


__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "Experiment",
    "NonFiniteLossError",
    "Preempted",
    "TrainState",
    "check_capabilities",
    "check_memory",
    "format_summary",
    "load_final_params",
    "make_evaluate",
    "make_loss_fn",
    "make_runner",
    "make_train_step",
    "resume_config",
    "setup",
    "train_and_evaluate",
]
