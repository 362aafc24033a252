"""Low-rank methods as options of a run: ``none`` and ``oialr`` (the catalogue :data:`LOWRANK`).

A low-rank method's options have ``check(strategy, estimator)`` (refuse a strategy or an estimator it cannot run
with, by their declared capabilities) and ``make_runner(experiment, strategy)``. OIALR changes the model between
steps, so it runs on one device: :class:`OIALRRunner` puts :class:`~jaxalgo.lowrank.OIALRTrainer` behind the
runner protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalgo.grads import EstimatorOptions
from jaxalgo.lowrank._hook import OIALRTrainer
from jaxalgo.lowrank._oialr import OIALRConfig
from jaxalgo.options import Catalogue, Entry
from jaxalgo.runner import Experiment, Runner, RunnerBase, StrategyOptions, make_evaluate


@dataclasses.dataclass(frozen=True)
class NoLowRank:
    """Full-rank training (no options)."""

    def check(self, strategy: StrategyOptions, estimator: EstimatorOptions | None = None) -> None:
        del strategy, estimator

    def make_runner(self, experiment: Experiment, strategy: StrategyOptions) -> Runner:
        return strategy.make_runner(experiment)


class OIALRRunner(RunnerBase):
    """OIALR in the training loop: converts, checks and cuts between jit-compiled single-device steps."""

    def __init__(self, experiment: Experiment, config: OIALRConfig):
        super().__init__(experiment)
        self._events: list[dict[str, Any]] = []
        output_loss, dataset = experiment.output_loss, experiment.dataset
        self.trainer = OIALRTrainer(
            experiment.problem,
            experiment.init_params,
            experiment.optimizer,
            config,
            build_estimator=experiment.estimator_options.build,
            evaluate_for=lambda chain: make_evaluate(chain, output_loss, dataset),
            log=self._events.append,
        )
        self.run_key = experiment.run_key

    def restore_target(self, record: dict[str, Any], fresh: Any) -> Any:
        return self.trainer.restore_target(record, fresh)

    def step(self, state: Any, batch: Any, index: int) -> tuple[Any, Any]:
        del index
        return self.trainer.train_step(state, batch, self.run_key)

    def after_step(self, index: int, state: Any) -> Any:
        return self.trainer.after_step(index, state)

    def evaluate(self, state: Any) -> dict[str, float]:
        return self.trainer.evaluate(state.params)

    def record(self, state: Any) -> dict[str, Any]:
        del state
        return self.trainer.record()

    def events(self) -> list[dict[str, Any]]:
        events, self._events[:] = list(self._events), []
        return events

    def epoch_metrics(self) -> dict[str, Any]:
        return self.trainer.metrics()

    def final_metrics(self) -> dict[str, Any]:
        return self.trainer.metrics()


@dataclasses.dataclass(frozen=True)
class OIALROptions(OIALRConfig):
    """OIALR (Coquelin et al., arXiv 2401.08505) as a run's low-rank method; the fields, their defaults and their
    documentation are :class:`~jaxalgo.lowrank.OIALRConfig`'s."""

    def check(self, strategy: StrategyOptions, estimator: EstimatorOptions | None = None) -> None:
        """Refuses a multi-device strategy, and an estimator that reads the dense layers' kernels (its
        ``reads_dense_kernels`` ClassVar: after the conversion the layers hold ``U S V^T`` instead)."""
        if not type(strategy).single_device:
            raise ValueError(
                "lowrank: OIALR changes the model between steps and runs on one device only; "
                f"got the multi-device strategy {type(strategy).__name__}"
            )
        if getattr(type(estimator), "reads_dense_kernels", False):
            raise ValueError(
                f"lowrank: {type(estimator).__name__} reads each dense layer's kernel, which OIALR replaces by "
                "U S V^T factors; use an estimator that works on any block (backprop, fg, frog, f3, dfa, drtp, llo)"
            )

    def make_runner(self, experiment: Experiment, strategy: StrategyOptions) -> Runner:
        self.check(strategy, experiment.estimator_options)
        return OIALRRunner(experiment, self)


LOWRANK: Catalogue = {
    "none": Entry(NoLowRank, help="full rank"),
    "oialr": Entry(OIALROptions, prefix="lowrank_", help="OIALR: train full rank, then U S V^T with frozen bases"),
}
"""The low-rank catalogue: name -> :class:`jaxalgo.options.Entry`."""
