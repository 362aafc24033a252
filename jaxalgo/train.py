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

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxalgo import data, losses, models
from jaxalgo.checkpoint import Checkpointer, check_record_matches
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

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def check_capabilities(config: RunConfig) -> None:
    """Refuses combinations the chosen entries declare they cannot run (by capability, never by name)."""
    strategy, estimator = config.parallel.options, config.estimator.options
    if not type(strategy).single_device and not type(estimator).data_parallel:
        raise ValueError(
            f"parallel: estimator {config.estimator.name!r} runs on one device only (its estimator state is per "
            f"run); got parallel={config.parallel.name!r}"
        )
    try:
        config.lowrank.options.check(strategy)
    except ValueError as error:
        reason = str(error).removeprefix("lowrank: ")
        raise ValueError(f"lowrank: {config.lowrank.name!r} with parallel={config.parallel.name!r}: {reason}") from None


def _output_loss(config: RunConfig, dataset: data.Dataset) -> tuple[str, losses.OutputLoss]:
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
    with errors_as_flags(config.entry("parallel")):
        config.parallel.options.check(config.estimator.options, batch_size=config.batch_size, devices=jax.devices())
    dataset = data.load_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed, test_fraction=config.test_fraction
    )
    data.validate_batch_size(config.batch_size, dataset.num_train)
    keys = run_keys(config.seed)
    with errors_as_flags(config.entry("model")):
        module = config.model.options.build(dataset.input_shape, dataset.num_outputs, key=keys.init)
    chain, params = models.split_chain(module)
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


def _trim_metrics(metrics_path: str, last_step: int) -> None:
    """Drops metric lines written after ``last_step`` (by a run that was interrupted after its last checkpoint)."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    tmp = metrics_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, metrics_path)


def _append_metrics(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: RunConfig, workdir: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Trains as configured, evaluating every epoch; returns the final evaluation record.

    Metrics are appended as JSON lines to ``workdir/metrics.jsonl`` (the last line is the final evaluation);
    checkpoints go to ``workdir/checkpoints`` every ``config.checkpoint_every`` steps (or every epoch) and at
    the end. With ``resume=True`` the run continues from the latest checkpoint and ends with exactly the state an
    uninterrupted run would have reached.

    Raises:
      ValueError (and subclasses), OSError: bad configuration, data or workdir, before training starts.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    workdir = _prepare_workdir(workdir)
    experiment = setup(config)
    runner = make_runner(config, experiment)
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    try:
        state, elapsed = _initial_state(
            config, experiment, checkpointer, runner, resume=resume, metrics_path=metrics_path
        )
        return _run(config, experiment, state, elapsed, checkpointer, metrics_path, runner)
    finally:
        checkpointer.close()


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


def _initial_state(
    config: RunConfig,
    experiment: Experiment,
    checkpointer: Checkpointer,
    runner: Runner,
    *,
    resume: bool,
    metrics_path: str,
) -> tuple[Any, float]:
    fresh = runner.init(experiment.init_state())
    latest = checkpointer.latest_step()
    if latest is None:
        if resume:
            print(f"resume: no checkpoint in {checkpointer.directory}; starting from step 0", file=sys.stderr)
        return fresh, 0.0
    if not resume:
        raise FileExistsError(
            f"workdir: {os.path.dirname(checkpointer.directory)!r} already holds checkpoints (latest step "
            f"{latest}); pass --resume to continue that run, or choose a new --workdir"
        )
    record = checkpointer.read_record(latest)
    check_record_matches(_saved_fingerprint(record), config.fingerprint(), checkpointer.directory)
    state = checkpointer.restore(latest, runner.restore_target(record, fresh))
    if runner.is_primary:
        _trim_metrics(metrics_path, latest)
    return state, float(record.get("elapsed_seconds", 0.0))


def _run(
    config: RunConfig,
    experiment: Experiment,
    state: Any,
    elapsed: float,
    checkpointer: Checkpointer,
    metrics_path: str,
    runner: Runner,
) -> dict[str, Any]:
    spe, total = experiment.steps_per_epoch, experiment.total_steps
    data_seed = run_keys(config.seed).data_seed
    step = int(state.step)
    started = time.perf_counter() - elapsed

    def log_events() -> None:
        for event in runner.events():
            if runner.is_primary:
                _append_metrics(metrics_path, event)

    def save(state: Any, step: int) -> None:
        if not bool(_all_finite(state.params)):
            raise NonFiniteLossError(
                f"parameters became NaN or infinite by step {step}; training stopped. The last good checkpoint "
                f"is step {checkpointer.latest_step()} in {checkpointer.directory}. Lower --lr or check the data."
            )
        record = {
            "config": config.to_dict(),
            "config_fingerprint": config.fingerprint(),
            "elapsed_seconds": time.perf_counter() - started,
            **runner.record(state),
        }
        checkpointer.save(step, state, record)

    def check_finite(loss: jax.Array, step: int) -> float:
        value = float(loss)
        if not math.isfinite(value):
            last = checkpointer.latest_step()
            raise NonFiniteLossError(
                f"loss became {value} at step {step}; training stopped. The last good checkpoint is step "
                f"{last} in {checkpointer.directory}. Lower --lr or check the data."
            )
        return value

    interactive = sys.stderr.isatty() and not config.quiet
    progress = tqdm(total=total, initial=step, disable=not interactive, unit="step", dynamic_ncols=True)
    losses_in_epoch: list[jax.Array] = []
    state = runner.after_step(step, state)  # e.g. OIALR with delay 0 converts before the first step
    log_events()
    try:
        while step < total:
            epoch, offset = divmod(step, spe)
            batches = data.iterate_batches(
                experiment.dataset, config.batch_size, seed=data_seed, epoch=epoch, start_step=offset
            )
            for batch in batches:
                state, loss = runner.step(state, batch, step)
                step += 1
                state = runner.after_step(step, state)
                log_events()
                losses_in_epoch.append(loss)
                if step % config.log_every == 0:
                    progress.set_postfix(epoch=epoch + 1, loss=f"{check_finite(loss, step):.4f}")
                progress.update(1)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step % spe:
                    check_finite(loss, step)
                    save(state, step)
            train_loss = check_finite(jnp.mean(jnp.stack(losses_in_epoch)), step)
            losses_in_epoch.clear()
            state = runner.end_epoch(state, epoch, train_loss)
            record = {"step": step, "epoch": epoch + 1, "train_loss": train_loss, **runner.evaluate(state)}
            record.update(runner.epoch_metrics())
            record["seconds"] = time.perf_counter() - started
            if runner.is_primary:
                _append_metrics(metrics_path, record)
            save(state, step)
    finally:
        progress.close()
    final = {"final": True, "step": step, "epoch": config.epochs, **runner.evaluate(state)}
    final.update(runner.final_metrics())
    final.update(steps=step, seconds=time.perf_counter() - started)
    if runner.is_primary:
        _append_metrics(metrics_path, final)
    if not config.quiet and runner.is_primary:
        print(format_summary(config, final))
    return {**final, "state": state}


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def format_summary(config: RunConfig, final: dict[str, Any]) -> str:
    """A short table of the final evaluation."""
    rows = [("model", config.model.name), ("dataset", config.dataset), ("estimator", config.estimator.name)]
    if "test_accuracy" in final:
        rows.append(("test accuracy", f"{100 * final['test_accuracy']:.2f}%"))
    if "test_mae" in final:
        rows.append(("test MAE", f"{final['test_mae']:.4f}"))
    rows += [("test loss", f"{final['test_loss']:.4f}"), ("steps", str(final["steps"]))]
    if "comm_bytes_per_step" in final:
        sent, cross = final["comm_bytes_per_step"], final["comm_cross_node_bytes_per_step"]
        rows.append(("sent per device", f"{sent / 1e3:.1f} kB per step ({cross / 1e3:.1f} kB across nodes)"))
    rows.append(("time", f"{final['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


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
    "Experiment",
    "NonFiniteLossError",
    "TrainState",
    "check_capabilities",
    "format_summary",
    "load_final_params",
    "make_evaluate",
    "make_loss_fn",
    "make_runner",
    "make_train_step",
    "setup",
    "train_and_evaluate",
]
