"""OIALR in the training loop: a hook that converts, checks and cuts between jit-compiled steps.

:class:`OIALRTrainer` owns what changes when the model is factorised -- the chain function, the estimator built for
it, the optimizer wrapped by :func:`~jaxalgo.lowrank.freeze_factors`, the jit-compiled step and the evaluation --
and the training loop of :mod:`jaxalgo.train` calls it at three points:

- ``trainer.restore_target(record, fresh_state)`` before restoring a checkpoint: the checkpoint record holds the
  OIALR status (converted, checks done, each layer's rank and storage size), from which the factorised state of
  the right (cut) shapes is rebuilt as the restore target;
- ``trainer.train_step`` / ``trainer.evaluate`` in place of the plain ones (after conversion, a weight-perturbation
  estimator draws its tangents on the trainable leaves only, :func:`~jaxalgo.lowrank.on_trainable_part`);
- ``state = trainer.after_step(step, state)`` after every step: converts at ``step == delay``, runs a stability
  check every ``stability_frequency`` steps after that. Everything it does is decided by ``step`` and the status,
  so a resumed run repeats exactly what an uninterrupted run does.

One step function is jit-compiled before conversion and one after; rank cuts change array shapes and so
re-trace it, which whole-model compaction keeps rare (:func:`~jaxalgo.lowrank.storage_sizes`;
``trainer.compilations`` counts the traces).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax

from jaxalgo.grads import Estimator
from jaxalgo.lowrank._layers import find_layers
from jaxalgo.lowrank._oialr import LowRankStatus, OIALRConfig, convert, stability_check, trainable_counts
from jaxalgo.lowrank._optim import freeze_factors, on_trainable_part

LOWRANK_METHODS: tuple[str, ...] = ("none", "oialr")
_FIELD_NAMES = {
    "delay": "lowrank_delay",
    "stability_frequency": "lowrank_frequency",
    "cutoff": "lowrank_cutoff",
    "bucket_ratio": "lowrank_bucket_ratio",
}


def oialr_config_from_train_config(config: Any) -> OIALRConfig:
    """The :class:`OIALRConfig` named by a :class:`jaxalgo.config.TrainConfig`'s ``lowrank_*`` fields.

    Raises:
      ValueError: naming the ``TrainConfig`` field, the value and what is allowed.
    """
    if config.lowrank not in LOWRANK_METHODS:
        raise ValueError(f"lowrank: unknown method {config.lowrank!r}; allowed: {', '.join(LOWRANK_METHODS)}")
    try:
        return OIALRConfig(
            delay=config.lowrank_delay,
            stability_frequency=config.lowrank_frequency,
            cutoff=config.lowrank_cutoff,
            bucket_ratio=config.lowrank_bucket_ratio,
            rotate_moments=bool(config.lowrank_rotate_moments),
        )
    except ValueError as error:
        name, _, rest = str(error).partition(":")
        raise ValueError(f"{_FIELD_NAMES.get(name, name)}:{rest}") from None


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


class OIALRTrainer:
    """The OIALR hook of one training run (see the module docstring).

    Args:
      experiment: the :class:`jaxalgo.train.Experiment` (dense model, estimator, optimizer, data).
      config: OIALR settings.
      log: optional callable receiving one JSON-able record per conversion and stability check
        (``step``, ``event``, ``ranks``, ``trainable_fraction``...).
    """

    def __init__(self, experiment: Any, config: OIALRConfig, *, log: Callable[[dict[str, Any]], None] | None = None):
        self.experiment = experiment
        self.config = config
        self.base_optimizer = experiment.optimizer
        self.optimizer = freeze_factors(experiment.optimizer)
        self.chain = experiment.chain
        self.layers = find_layers(experiment.chain, experiment.init_params, min_aspect=config.min_aspect)
        self.status = LowRankStatus()
        self.compilations = 0
        self.log = log
        self.model_params = _count(experiment.init_params)
        self._build(experiment.estimator)

    # -- what the loop calls ------------------------------------------------------------------------------------

    def train_step(self, state: Any, batch: Any, run_key: jax.Array) -> tuple[Any, jax.Array]:
        return self._train_step(state, batch, run_key)

    def evaluate(self, params: Any) -> dict[str, float]:
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
        self.chain, self.layers, self.status = chain, layers, status
        self._build()
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

    def _build(self, estimator: Estimator | None = None) -> None:
        from jaxalgo.estimators import EstimatorContext, build_estimator
        from jaxalgo.train import make_evaluate, make_loss_fn, make_train_step

        exp = self.experiment
        if estimator is None:
            loss_fn = make_loss_fn(self.chain, exp.output_loss)
            context = EstimatorContext(
                config=exp.config, chain=self.chain, output_loss=exp.output_loss, loss_fn=loss_fn, dataset=exp.dataset
            )
            estimator = build_estimator(context)
            if estimator.split is not None:  # weight perturbation: no tangents on the frozen U and V
                rebuild = lambda loss: build_estimator(dataclasses.replace(context, loss_fn=loss))
                estimator = on_trainable_part(rebuild, loss_fn)
        self.estimator = estimator

        def counted(params, state, batch, *, key):
            self.compilations += 1  # runs when the step is traced, i.e. once per compilation
            return estimator.value_and_grad(params, state, batch, key=key)

        self._train_step = make_train_step(Estimator(estimator.init, counted), self.optimizer)
        self._evaluate = make_evaluate(self.chain, exp.output_loss, exp.dataset)

    def _carry_estimator_state(self, old: Any, params: Any) -> Any:
        """The old estimator state if it fits the new parameters (e.g. F3's error buffer), else a fresh one."""
        new = jax.eval_shape(self.estimator.init, params)
        same = jax.tree.structure(new) == jax.tree.structure(old) and all(
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
        self.chain, self.layers, self.status = chain, layers, status
        self._build()
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
