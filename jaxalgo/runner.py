"""The engine every way of training shares: the train state, one jit-compiled step, evaluation, and the runner
protocol the training loop talks to.

:class:`Experiment` is a configured run (data, model, estimator, optimizer, keys), built by
:func:`jaxalgo.train.setup` or by hand. A :class:`Runner` turns it into steps: single device (here), DDP, DASO and
AB-training (:mod:`jaxalgo.parallel`), OIALR (:mod:`jaxalgo.lowrank`). The driver (:mod:`jaxalgo.train`) calls only
the protocol's methods and never asks which runner it holds; :class:`RunnerBase` gives every optional hook a
no-op default.

The PRNG streams of a run live here (:func:`run_keys`): model init, data order, the per-step key
(``fold_in(step_key, step)``, so a resumed run draws exactly what an uninterrupted one would) and the estimator's
own key (fixed feedback matrices, readouts).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxalgo import data, losses, models
from jaxalgo.grads import Estimator, EstimatorOptions, Problem, scalar_loss


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree, donated to the step and saved in checkpoints."""

    step: jax.Array
    params: Any
    estimator_state: Any
    opt_state: Any

    @classmethod
    def fresh(cls, params: Any, estimator: Estimator, optimizer: optax.GradientTransformation) -> TrainState:
        """Step 0: ``params`` with the estimator's and the optimizer's initial states."""
        return cls(jnp.zeros((), jnp.int32), params, estimator.init(params), optimizer.init(params))


class RunKeys(NamedTuple):
    """The independent PRNG streams of one seed.

    Attributes:
      init: the model's initialisation.
      data_seed: the order of the training batches (an integer).
      step: the per-step key is ``fold_in(step, step_index)``.
      estimator: the estimator's own randomness (:attr:`jaxalgo.grads.Problem.key`).
    """

    init: jax.Array
    data_seed: int
    step: jax.Array
    estimator: jax.Array


def run_keys(seed: int) -> RunKeys:
    """Streams 0 (init), 1 (data order), 2 (steps) and 3 (estimator) of ``jax.random.key(seed)``."""
    root = jax.random.key(seed)
    data_seed = int(jax.random.randint(jax.random.fold_in(root, 1), (), 0, 2**31 - 1))
    return RunKeys(jax.random.fold_in(root, 0), data_seed, jax.random.fold_in(root, 2), jax.random.fold_in(root, 3))


def make_loss_fn(chain: models.ChainFn, output_loss: losses.OutputLoss) -> Callable[[Any, Any], jax.Array]:
    """``loss_fn(params, batch) = output_loss(chain(params, batch["x"]), batch["y"])``."""

    def loss_fn(params, batch):
        return output_loss(chain.apply(params, batch["x"]), batch["y"])

    return loss_fn


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A configured run: the problem, data, initial parameters, estimator and optimizer, all validated.

    Attributes:
      problem: what the estimator was built from (:class:`jaxalgo.grads.Problem`); ``problem.chain`` is the model.
      dataset: the :class:`jaxalgo.data.Dataset`.
      init_params: the model's initial parameters.
      estimator: the estimator built from ``estimator_options`` and ``problem``.
      estimator_options: its options (runners rebuild from them, e.g. OIALR after factorising the model).
      optimizer: the optax optimizer.
      lr: its base learning rate (for strategies that schedule it, such as AB-training's rebound).
      batch_size: examples per step.
      epochs: passes over the training split.
      run_key: the per-step key stream (:attr:`RunKeys.step`).
    """

    problem: Problem
    dataset: data.Dataset
    init_params: Any
    estimator: Estimator
    estimator_options: EstimatorOptions
    optimizer: optax.GradientTransformation
    lr: float
    batch_size: int
    epochs: int
    run_key: jax.Array

    @property
    def chain(self) -> models.ChainFn:
        return self.problem.chain

    @property
    def output_loss(self) -> losses.OutputLoss:
        assert self.problem.output_loss is not None  # an experiment's problem is built from its output loss
        return self.problem.output_loss

    @property
    def loss_fn(self) -> Callable[[Any, Any], jax.Array]:
        return self.problem.loss_fn

    @property
    def steps_per_epoch(self) -> int:
        return data.steps_per_epoch(self.dataset.num_train, self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def init_state(self) -> TrainState:
        return TrainState.fresh(self.init_params, self.estimator, self.optimizer)


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
        return TrainState(state.step + 1, params, estimator_state, opt_state), scalar_loss(loss)

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


class Runner(Protocol):
    """How a run trains: what the driver of :mod:`jaxalgo.train` calls, and all it calls.

    ``step`` is the only method without a default (:class:`RunnerBase`). ``index`` is the number of steps done
    before the call; everything a runner decides from it is reproduced exactly by a resumed run.
    """

    is_primary: bool  # this process writes metrics and prints (process 0)
    batch_rows: slice | None  # the rows of each global batch this process builds (None: all of them)

    def init(self, fresh: TrainState) -> Any:
        """The state placed where the steps expect it; also the target checkpoints are restored into."""

    def restore_target(self, record: dict[str, Any], fresh: Any) -> Any:
        """``fresh`` reshaped to what a checkpoint with ``record`` holds (AB's factor sizes, OIALR's ranks)."""

    def step(self, state: Any, batch: Any, index: int) -> tuple[Any, jax.Array]:
        """One training step: ``(state, loss)``."""

    def window(self, index: int, remaining: int) -> int:
        """How many steps the next call runs, from step ``index`` with ``remaining >= 1`` steps left in the epoch:
        1 (the loop calls :meth:`step`) or ``n`` in ``[2, remaining]`` (it calls :meth:`run_window` with ``n``
        batches, e.g. DASO's window program from a send to its merge)."""

    def run_window(self, state: Any, batches: list[Any], index: int) -> tuple[Any, list[jax.Array]]:
        """``len(batches)`` steps from step ``index`` in one call: ``(state, one loss per step)``."""

    def after_step(self, index: int, state: Any) -> Any:
        """Called with the steps done after every call of :meth:`step` or :meth:`run_window` (OIALR converts and
        cuts here)."""

    def end_epoch(self, state: Any, epoch: int, train_loss: float) -> Any:
        """Called after each epoch (DASO adapts its schedule here)."""

    def evaluate(self, state: Any) -> dict[str, float]:
        """The test metrics of the model ``state`` holds (DASO, AB: of the consensus model)."""

    def record(self, state: Any) -> dict[str, Any]:
        """JSON-able facts a checkpoint needs beyond the arrays (given back to :meth:`restore_target` and
        :meth:`load_record`): e.g. AB's factor sizes, and the host-side counters of the epoch and the run (bytes
        sent, steps per phase) so that a resumed run reports the same figures as an uninterrupted one."""

    def load_record(self, record: dict[str, Any]) -> None:
        """Called once with the record of the checkpoint a run resumes from, after its state is restored."""

    def events(self) -> list[dict[str, Any]]:
        """Metrics records of events since the last call (OIALR's conversion and checks)."""

    def epoch_metrics(self) -> dict[str, Any]:
        """Extra fields of the epoch's metrics line."""

    def final_metrics(self) -> dict[str, Any]:
        """Extra fields of the final metrics line."""


class RunnerBase(abc.ABC):
    """No-op defaults for every hook of :class:`Runner` but ``step`` (abstract); evaluation on
    ``eval_params(state)``."""

    is_primary: bool = True
    batch_rows: slice | None = None

    def __init__(self, experiment: Experiment):
        self.experiment = experiment
        self._evaluate = make_evaluate(experiment.chain, experiment.output_loss, experiment.dataset)

    def init(self, fresh: TrainState) -> Any:
        return fresh

    def restore_target(self, record: dict[str, Any], fresh: Any) -> Any:
        del record
        return fresh

    @abc.abstractmethod
    def step(self, state: Any, batch: Any, index: int) -> tuple[Any, jax.Array]:
        """One training step: ``(state, loss)``."""

    def window(self, index: int, remaining: int) -> int:
        del index, remaining
        return 1

    def run_window(self, state: Any, batches: list[Any], index: int) -> tuple[Any, list[jax.Array]]:
        losses = []
        for offset, batch in enumerate(batches):
            state, loss = self.step(state, batch, index + offset)
            losses.append(loss)
        return state, losses

    def after_step(self, index: int, state: Any) -> Any:
        del index
        return state

    def end_epoch(self, state: Any, epoch: int, train_loss: float) -> Any:
        del epoch, train_loss
        return state

    def eval_params(self, state: Any) -> Any:
        """The parameters to evaluate, on the host."""
        return state.params

    def evaluate(self, state: Any) -> dict[str, float]:
        return self._evaluate(self.eval_params(state))

    def record(self, state: Any) -> dict[str, Any]:
        del state
        return {}

    def load_record(self, record: dict[str, Any]) -> None:
        del record

    def events(self) -> list[dict[str, Any]]:
        return []

    def epoch_metrics(self) -> dict[str, Any]:
        return {}

    def final_metrics(self) -> dict[str, Any]:
        return {}


class SingleDeviceRunner(RunnerBase):
    """The plain jit-compiled step of :func:`make_train_step` on the default device."""

    def __init__(self, experiment: Experiment):
        super().__init__(experiment)
        self.train_step = make_train_step(experiment.estimator, experiment.optimizer)
        self.run_key = experiment.run_key

    def step(self, state: Any, batch: Any, index: int) -> tuple[Any, jax.Array]:
        del index
        return self.train_step(state, batch, self.run_key)


class StrategyOptions(Protocol):
    """The options of a way of training (an entry of :data:`jaxalgo.parallel.STRATEGIES`).

    ``single_device`` declares whether the strategy runs on one device (a low-rank method that needs one asks
    this, never the strategy's name).
    """

    single_device: ClassVar[bool]

    def check(self, estimator: EstimatorOptions, *, batch_size: int, devices: Sequence[jax.Device]) -> None:
        """Raises ValueError (naming the field) when the strategy cannot run this estimator or batch here."""

    def make_runner(self, experiment: Experiment) -> Runner: ...


@dataclasses.dataclass(frozen=True)
class SingleDevice:
    """One device: the plain jit-compiled step (no options)."""

    single_device: ClassVar[bool] = True

    def check(self, estimator: EstimatorOptions, *, batch_size: int, devices: Sequence[jax.Device]) -> None:
        del estimator, batch_size, devices

    def make_runner(self, experiment: Experiment) -> Runner:
        return SingleDeviceRunner(experiment)


__all__ = [
    "Experiment",
    "RunKeys",
    "Runner",
    "RunnerBase",
    "SingleDevice",
    "SingleDeviceRunner",
    "StrategyOptions",
    "TrainState",
    "make_evaluate",
    "make_loss_fn",
    "make_train_step",
    "run_keys",
]
