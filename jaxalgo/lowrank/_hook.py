"""OIALR between jit-compiled steps, on any chain model and loss: :class:`OIALRTrainer`.

The trainer owns what changes when the model is factorised -- the chain function, the estimator rebuilt for it,
the optimizer wrapped by :func:`~jaxalgo.lowrank.freeze_factors`, the jit-compiled step and the evaluation -- and
needs no run configuration: a :class:`jaxalgo.grads.Problem` (whose ``loss_of_chain`` says how the loss follows the
factorised chain), the parameters, an optimizer, the OIALR settings and how to build the estimator.

- ``trainer.train_step(state, batch, run_key)``: one step (after conversion, a weight-perturbation estimator draws
  its tangents on the trainable leaves only, :func:`~jaxalgo.lowrank.on_trainable_part`);
- ``state = trainer.after_step(step, state)`` after every step: converts at ``step == delay``, runs a stability
  check every ``stability_frequency`` steps after that. Everything it does is decided by ``step`` and the status,
  so a resumed run repeats exactly what an uninterrupted run does;
- ``trainer.restore_target(record, fresh_state)`` before restoring a checkpoint whose ``trainer.record()`` holds the
  status (converted, checks done, each layer's rank and storage size), from which the factorised state of the right
  (cut) shapes is rebuilt.

One step function is jit-compiled before conversion and one after; rank cuts change array shapes and so re-trace
it, which whole-model compaction keeps rare (:func:`~jaxalgo.lowrank.storage_sizes`; ``trainer.compilations``
counts the traces). :class:`jaxalgo.lowrank.OIALRRunner` puts the trainer behind the training loop's runner
protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxalgo.grads import Estimator, Problem
from jaxalgo.lowrank._layers import find_layers
from jaxalgo.lowrank._oialr import LowRankStatus, OIALRConfig, convert, stability_check, trainable_counts
from jaxalgo.lowrank._optim import freeze_factors, on_trainable_part
from jaxalgo.runner import TrainState, make_train_step


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def estimator_for(problem: Problem, build: Callable[[Problem], Estimator]) -> Estimator:
    """``build(problem)``; for a weight-perturbation estimator (one with a ``split``) rebuilt on the trainable
    leaves only, so that no tangent falls on the frozen ``U`` and ``V``."""
    estimator = build(problem)
    if estimator.split is None:
        return estimator
    return on_trainable_part(lambda loss: build(problem.with_loss(loss)), problem.loss_fn)


class OIALRTrainer:
    """OIALR on one device, between jit-compiled steps (see the module docstring).

    Args:
      problem: the dense model (``problem.chain``) and its loss; ``problem.loss_of_chain`` must be set (it is by
        :meth:`jaxalgo.grads.Problem.from_chain`), since the loss must follow the factorised chain.
      params: the dense parameters (the chain's per-block dicts).
      optimizer: any optax optimizer (wrapped here by :func:`~jaxalgo.lowrank.freeze_factors`).
      config: OIALR settings.
      build_estimator: ``build_estimator(problem) -> Estimator``, e.g. ``ForwardOptions(...).build``; called
        again on the factorised problem at conversion and whenever a restore changes the chain.
      evaluate_for: optional ``evaluate_for(chain) -> evaluate(params) -> dict`` (the test metrics of a chain).
      log: optional callable receiving one JSON-able record per conversion and stability check.

    Raises:
      ValueError: ``problem.loss_of_chain`` is missing, or the chain has no eligible layer.
    """

    def __init__(
        self,
        problem: Problem,
        params: Any,
        optimizer: optax.GradientTransformation,
        config: OIALRConfig,
        *,
        build_estimator: Callable[[Problem], Estimator],
        evaluate_for: Callable[[Any], Callable[[Any], dict[str, float]]] | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
    ):
        problem.require("chain", by="OIALR")
        if problem.loss_of_chain is None:
            raise ValueError(
                "problem: OIALR needs loss_of_chain (how the loss follows the factorised chain); build the problem "
                "with Problem.from_chain(chain, output_loss) or give loss_of_chain=lambda chain: your_loss(chain)"
            )
        self.problem = problem
        self.config = config
        self.base_optimizer = optimizer
        self.optimizer = freeze_factors(optimizer)
        self.build_estimator = build_estimator
        self.evaluate_for = evaluate_for
        self.layers = find_layers(problem.chain, params, min_aspect=config.min_aspect)
        self.status = LowRankStatus()
        self.compilations = 0
        self.log = log
        self.model_params = _count(params)
        self._build(build_estimator(problem))

    @property
    def chain(self) -> Any:
        return self.problem.chain

    @property
    def estimator(self) -> Estimator:
        return self._estimator

    def init_state(self, params: Any) -> TrainState:
        """A fresh train state for the dense ``params`` (this trainer's estimator and wrapped optimizer)."""
        return TrainState.fresh(params, self.estimator, self.optimizer)

    def train_step(self, state: Any, batch: Any, run_key: jax.Array) -> tuple[Any, jax.Array]:
        return self._train_step(state, batch, run_key)

    def evaluate(self, params: Any) -> dict[str, float]:
        if self._evaluate is None:
            raise ValueError("evaluate_for: this trainer was built without one")
        return self._evaluate(params)

    def after_step(self, step: int, state: Any) -> Any:
        """Converts or checks if ``step`` (steps done) calls for it; returns the (maybe reshaped) state."""
        if not self.status.converted and step >= self.config.delay:
            state = self._convert(step, state)
        while self.status.converted and self.status.checks < self.config.checks_due(step):
            state = self._check(step, state)
        return state

    def restore_target(self, record: dict[str, Any], fresh: Any) -> Any:
        """The restore target for a checkpoint with ``record``: ``fresh`` converted to the recorded ranks."""
        saved = record.get("lowrank")
        if not saved or not saved.get("converted"):
            return fresh
        status = LowRankStatus.from_dict(saved)
        ranks = {name: (status.ranks[name], status.sizes[name]) for name in status.ranks}
        chain, params, opt_state, layers, _ = convert(
            self.chain, fresh.params, fresh.opt_state, self.base_optimizer, self.config, ranks=ranks
        )
        self.layers, self.status = layers, status
        self._rebuild_for(chain)
        return fresh._replace(params=params, opt_state=opt_state, estimator_state=self.estimator.init(params))

    def record(self) -> dict[str, Any]:
        """What a checkpoint record must hold to rebuild this state's shapes."""
        return {"lowrank": self.status.to_dict()}

    def metrics(self) -> dict[str, Any]:
        """Ranks, trainable fractions and compilations so far (added to each epoch's metrics line)."""
        counts = trainable_counts(self.layers, self.status)
        trainable_model = self.model_params - counts["dense"] + counts["trainable"]
        return {
            "lowrank_converted": self.status.converted,
            "lowrank_ranks": dict(self.status.ranks),
            "trainable_fraction": counts["trainable"] / max(1, counts["dense"]),
            "trainable_fraction_model": trainable_model / max(1, self.model_params),
            "compilations": self.compilations,
        }

    # -- internals ----------------------------------------------------------------------------------------------

    def _rebuild_for(self, chain: Any) -> None:
        """The problem, estimator, step and evaluation of the factorised ``chain``."""
        self.problem = self.problem.with_chain(chain)
        self._build(estimator_for(self.problem, self.build_estimator))

    def _build(self, estimator: Estimator) -> None:
        self._estimator = estimator

        def counted(params, state, batch, *, key):
            self.compilations += 1  # runs when the step is traced, i.e. once per compilation
            return estimator.value_and_grad(params, state, batch, key=key)

        self._train_step = make_train_step(Estimator(estimator.init, counted), self.optimizer)
        self._evaluate = None if self.evaluate_for is None else self.evaluate_for(self.chain)

    def _carry_estimator_state(self, old: Any, params: Any) -> Any:
        """The old estimator state if it fits the new parameters (e.g. F3's error buffer), else a fresh one."""
        new = jax.eval_shape(self.estimator.init, params)
        same = jax.tree.structure(new) == jax.tree.structure(old) and all(  # type: ignore[operator]  # PyTreeDef: see _optim
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
        )
        return old if same else self.estimator.init(params)

    def _event(self, step: int, event: str, **extra: Any) -> None:
        if self.log is not None:
            self.log({"step": step, "event": event, **self.metrics(), **extra})

    def _convert(self, step: int, state: Any) -> Any:
        chain, params, opt_state, layers, status = convert(
            self.chain, state.params, state.opt_state, self.base_optimizer, self.config
        )
        self.layers, self.status = layers, status
        self._rebuild_for(chain)
        estimator_state = self._carry_estimator_state(state.estimator_state, params)
        self._event(step, "oialr_convert")
        return state._replace(params=params, estimator_state=estimator_state, opt_state=opt_state)

    def _check(self, step: int, state: Any) -> Any:
        params, opt_state, status, report = stability_check(
            state.params, state.opt_state, self.base_optimizer, self.layers, self.status, self.config
        )
        self.status = status
        self._event(step, "oialr_check", check=status.checks, window=sorted(report))
        return state._replace(params=params, opt_state=opt_state)
