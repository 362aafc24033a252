"""The training loop: any estimator with any optax optimizer, resumable exactly from its checkpoints.

``train_and_evaluate(config, workdir)`` is the whole job the CLI runs. Its pieces are public so that scripts and
notebooks can assemble their own loops:

- :func:`setup` validates the configuration, loads the data, builds the model, the estimator and the optimizer,
  raising any error before training starts;
- :func:`make_train_step` is one jit-compiled step with the train state donated; the step's key is
  ``jax.random.fold_in(run_key, step)``, so a resumed run draws exactly what an uninterrupted one would;
- :func:`make_evaluate` computes the test metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jaxalgo import data, losses, models
from jaxalgo.checkpoint import Checkpointer, check_record_matches
from jaxalgo.config import TrainConfig, validate_config
from jaxalgo.estimators import EstimatorContext, build_estimator, check_estimator_name
from jaxalgo.grads import Estimator

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree, donated to the step and saved in checkpoints."""

    step: jax.Array
    params: Any
    estimator_state: Any
    opt_state: Any


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A configured run: data, model, estimator and optimizer, all validated."""

    config: TrainConfig
    dataset: data.Dataset
    chain: models.ChainFn
    init_params: Any
    output_loss: losses.OutputLoss
    loss_fn: Callable[[Any, Any], jax.Array]
    estimator: Estimator
    optimizer: optax.GradientTransformation
    run_key: jax.Array

    @property
    def steps_per_epoch(self) -> int:
        return data.steps_per_epoch(self.dataset.num_train, self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def init_state(self) -> TrainState:
        params = self.init_params
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            estimator_state=self.estimator.init(params),
            opt_state=self.optimizer.init(params),
        )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer named by ``config.optimizer`` at rate ``config.lr``."""
    if config.optimizer == "adamw":
        return optax.adamw(config.lr, weight_decay=config.weight_decay)
    base = {
        "adam": lambda: optax.adam(config.lr),
        "sgd": lambda: optax.sgd(config.lr),
        "momentum": lambda: optax.sgd(config.lr, momentum=0.9),
    }[config.optimizer]()
    if config.weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    return base


def make_loss_fn(chain: models.ChainFn, output_loss: losses.OutputLoss) -> Callable[[Any, Any], jax.Array]:
    """``loss_fn(params, batch) = output_loss(chain(params, batch["x"]), batch["y"])``."""

    def loss_fn(params, batch):
        return output_loss(chain.apply(params, batch["x"]), batch["y"])

    return loss_fn


def _seeds(seed: int) -> tuple[jax.Array, int, jax.Array]:
    """Independent streams from one seed: model init key, data-order seed, per-step run key."""
    root = jax.random.key(seed)
    data_seed = int(jax.random.randint(jax.random.fold_in(root, 1), (), 0, 2**31 - 1))
    return jax.random.fold_in(root, 0), data_seed, jax.random.fold_in(root, 2)


def setup(config: TrainConfig) -> Experiment:
    """Validates ``config`` and builds the run; every configuration error is raised here, before training."""
    validate_config(config)
    check_estimator_name(config.estimator)
    from jaxalgo.parallel._train import check_parallel_config

    check_parallel_config(config)
    if config.model not in models.MODELS:
        raise ValueError(f"model: unknown model {config.model!r}; allowed: {', '.join(models.MODELS)}")
    dataset = data.load_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed, test_fraction=config.test_fraction
    )
    data.validate_batch_size(config.batch_size, dataset.num_train)
    init_key, _, run_key = _seeds(config.seed)
    options = {
        "mlp": {"hidden": config.hidden, "activation": config.activation},
        "vit": {"dim": config.vit_dim, "depth": config.vit_depth, "heads": 4, "mlp_dim": 2 * config.vit_dim},
    }.get(config.model, {})
    chain_module = models.build_model(
        config.model,
        input_shape=dataset.input_shape,
        num_outputs=dataset.num_outputs,
        key=init_key,
        **options,
    )
    chain, params = models.split_chain(chain_module)
    loss_name = losses.default_loss(dataset.task) if config.loss == "auto" else config.loss
    if dataset.task == "regression" and loss_name != "mse":
        raise ValueError(f"loss: {loss_name!r} is a classification loss; dataset {dataset.name!r} is regression")
    if dataset.task == "classification" and loss_name == "mse":
        raise ValueError(f"loss: 'mse' is a regression loss; dataset {dataset.name!r} is classification")
    output_loss = losses.get_loss(loss_name)
    loss_fn = make_loss_fn(chain, output_loss)
    estimator = build_estimator(
        EstimatorContext(config=config, chain=chain, output_loss=output_loss, loss_fn=loss_fn, dataset=dataset)
    )
    return Experiment(
        config=config,
        dataset=dataset,
        chain=chain,
        init_params=params,
        output_loss=output_loss,
        loss_fn=loss_fn,
        estimator=estimator,
        optimizer=make_optimizer(config),
        run_key=run_key,
    )


def make_train_step(
    estimator: Estimator, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, jax.Array]]:
    """One jit-compiled training step ``(state, batch, run_key) -> (state, loss)``; ``state`` is donated.

    The estimator's key for step ``s`` is ``jax.random.fold_in(run_key, s)``.
    """

    def step(state: TrainState, batch: Any, run_key: jax.Array) -> tuple[TrainState, jax.Array]:
        key = jax.random.fold_in(run_key, state.step)
        loss, grads, estimator_state = estimator.value_and_grad(state.params, state.estimator_state, batch, key=key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        scalar_loss = loss[0] if isinstance(loss, tuple) else loss
        return TrainState(state.step + 1, params, estimator_state, opt_state), scalar_loss

    return jax.jit(step, donate_argnums=0)


def make_evaluate(
    chain: models.ChainFn, output_loss: losses.OutputLoss, dataset: data.Dataset, *, chunk: int = 2048
) -> Callable[[Any], dict[str, float]]:
    """``evaluate(params) -> {"test_loss", "test_accuracy" | "test_mae"}`` on the test split.

    The regression MAE is reported in the original units of the target (``dataset.target_std``).
    """

    @jax.jit
    def sums(params, x, y):
        out = chain.apply(params, x)
        loss = output_loss(out, y) * x.shape[0]
        if dataset.task == "classification":
            metric = losses.accuracy(out, y) * x.shape[0]
        else:
            scale = 1.0 if dataset.target_std is None else jnp.asarray(dataset.target_std)
            metric = losses.mean_absolute_error(out, y, scale) * x.shape[0]
        return loss, metric

    def evaluate(params) -> dict[str, float]:
        total_loss, total_metric = 0.0, 0.0
        n = dataset.num_test
        for start in range(0, n, chunk):
            loss, metric = sums(params, dataset.x_test[start : start + chunk], dataset.y_test[start : start + chunk])
            total_loss += float(loss)
            total_metric += float(metric)
        name = "test_accuracy" if dataset.task == "classification" else "test_mae"
        return {"test_loss": total_loss / n, name: total_metric / n}

    return evaluate


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


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
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
    runner = _make_runner(experiment)
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    lowrank_hook = _lowrank_hook(experiment, metrics_path)
    try:
        state, elapsed = _initial_state(
            experiment, checkpointer, runner, resume=resume, metrics_path=metrics_path, lowrank_hook=lowrank_hook
        )
        return _run(experiment, state, elapsed, checkpointer, metrics_path, runner, lowrank_hook)
    finally:
        checkpointer.close()


def _lowrank_hook(experiment: Experiment, metrics_path: str) -> Any:
    """The OIALR hook (``jaxalgo.lowrank.OIALRTrainer``) when ``config.lowrank`` asks for one, else None."""
    if experiment.config.lowrank == "none":
        return None
    from jaxalgo import lowrank

    return lowrank.OIALRTrainer(
        experiment,
        lowrank.oialr_config_from_train_config(experiment.config),
        log=lambda record: _append_metrics(metrics_path, record),
    )


def _make_runner(experiment: Experiment):
    """Single-device, DDP or DASO steps (``config.parallel``); see ``jaxalgo.parallel._train``."""
    from jaxalgo.parallel._train import make_runner

    return make_runner(experiment)


def _initial_state(
    experiment: Experiment,
    checkpointer: Checkpointer,
    runner: Any,
    *,
    resume: bool,
    metrics_path: str,
    lowrank_hook: Any = None,
) -> tuple[TrainState, float]:
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
    check_record_matches(record, experiment.config.fingerprint(), checkpointer.directory)
    if lowrank_hook is not None:  # the checkpoint may hold factorised, rank-cut arrays
        fresh = lowrank_hook.restore_target(record, fresh)
    elif hasattr(runner, "restore_target"):  # AB-training: factors stored at the checkpoint's ranks
        fresh = runner.restore_target(record, fresh)
    state = checkpointer.restore(latest, fresh)
    if runner.is_primary:
        _trim_metrics(metrics_path, latest)
    return state, float(record.get("elapsed_seconds", 0.0))


def _run(
    experiment: Experiment,
    state: TrainState,
    elapsed: float,
    checkpointer: Checkpointer,
    metrics_path: str,
    runner: Any,
    lowrank_hook: Any = None,
) -> dict[str, Any]:
    config = experiment.config
    if lowrank_hook is None:
        train_step = runner.step
        plain_evaluate = make_evaluate(experiment.chain, experiment.output_loss, experiment.dataset)
        evaluate = lambda state: plain_evaluate(runner.eval_params(state))
    else:  # OIALR swaps model, step and evaluation when it factorises the model (single device only)
        train_step = lambda state, batch, step: lowrank_hook.train_step(state, batch, experiment.run_key)
        evaluate = lambda state: lowrank_hook.evaluate(state.params)
    spe, total = experiment.steps_per_epoch, experiment.total_steps
    _, data_seed, _ = _seeds(config.seed)
    step = int(state.step)
    started = time.perf_counter() - elapsed

    def save(state: TrainState, step: int) -> None:
        if not bool(_all_finite(state.params)):
            raise NonFiniteLossError(
                f"parameters became NaN or infinite by step {step}; training stopped. The last good checkpoint "
                f"is step {checkpointer.latest_step()} in {checkpointer.directory}. Lower --lr or check the data."
            )
        record = {
            "config": config.to_dict(),
            "config_fingerprint": config.fingerprint(),
            "elapsed_seconds": time.perf_counter() - started,
        }
        if lowrank_hook is not None:
            record.update(lowrank_hook.record())
        if hasattr(runner, "record"):
            record.update(runner.record(state))
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
    if lowrank_hook is not None:
        state = lowrank_hook.after_step(step, state)  # delay 0: convert before the first step
    try:
        while step < total:
            epoch, offset = divmod(step, spe)
            batches = data.iterate_batches(
                experiment.dataset, config.batch_size, seed=data_seed, epoch=epoch, start_step=offset
            )
            for batch in batches:
                state, loss = train_step(state, batch, step)
                step += 1
                if lowrank_hook is not None:
                    state = lowrank_hook.after_step(step, state)
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
            record = {"step": step, "epoch": epoch + 1, "train_loss": train_loss, **evaluate(state)}
            record.update(runner.epoch_metrics())
            if lowrank_hook is not None:
                record.update(lowrank_hook.metrics())
            record["seconds"] = time.perf_counter() - started
            if runner.is_primary:
                _append_metrics(metrics_path, record)
            save(state, step)
    finally:
        progress.close()
    final = {"final": True, "step": step, "epoch": config.epochs, **evaluate(state)}
    if lowrank_hook is not None:
        final.update(lowrank_hook.metrics())
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


def format_summary(config: TrainConfig, final: dict[str, Any]) -> str:
    """A short table of the final evaluation."""
    rows = [("model", config.model), ("dataset", config.dataset), ("estimator", config.estimator)]
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


def load_final_params(workdir: str | os.PathLike, config: TrainConfig) -> TrainState:
    """The train state of the latest checkpoint in ``workdir`` (restored into this config's structure)."""
    experiment = setup(config)
    checkpointer = Checkpointer(os.path.join(os.fspath(workdir), CHECKPOINT_DIR))
    try:
        latest = checkpointer.latest_step()
        if latest is None:
            raise FileNotFoundError(f"workdir: no checkpoint in {os.fspath(workdir)!r}")
        runner = _make_runner(experiment)
        like = runner.init(experiment.init_state())
        lowrank_hook = _lowrank_hook(experiment, os.devnull)
        if lowrank_hook is not None:  # factorised, rank-cut shapes recorded in the checkpoint
            like = lowrank_hook.restore_target(checkpointer.read_record(latest), like)
        elif hasattr(runner, "restore_target"):
            like = runner.restore_target(checkpointer.read_record(latest), like)
        return checkpointer.restore(latest, like)
    finally:
        checkpointer.close()


__all__ = [
    "Experiment",
    "NonFiniteLossError",
    "TrainState",
    "format_summary",
    "load_final_params",
    "make_evaluate",
    "make_loss_fn",
    "make_optimizer",
    "make_train_step",
    "setup",
    "train_and_evaluate",
]
