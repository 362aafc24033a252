"""The estimators a training run can name, and how each is built from the run's model, loss and data.

``ESTIMATORS`` maps a CLI name to a builder ``builder(context) -> Estimator``. The training loop knows only the
:class:`jaxalgo.grads.Estimator` interface; everything algorithm-specific happens in the builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jaxalgo import grads
from jaxalgo.config import TrainConfig
from jaxalgo.grads._activity import build_activity_estimator
from jaxalgo.grads._f3_build import FEEDBACK_ESTIMATORS, build_feedback_estimator
from jaxalgo.grads._rank1 import build_rank1_estimator
from jaxalgo.losses import OutputLoss
from jaxalgo.models import ChainFn


@dataclasses.dataclass(frozen=True)
class EstimatorContext:
    """What a builder may use.

    Attributes:
      config: the run configuration.
      chain: the model's pure function (block by block).
      output_loss: ``output_loss(y_pred, y_true) -> scalar`` (mean over the batch).
      loss_fn: ``loss_fn(params, batch) = output_loss(chain.apply(params, batch["x"]), batch["y"])``.
      dataset: the :class:`jaxalgo.data.Dataset` (sizes, task, number of outputs).
    """

    config: TrainConfig
    chain: ChainFn
    output_loss: OutputLoss
    loss_fn: Callable[[Any, Any], Any]
    dataset: Any


def _backprop(context: EstimatorContext) -> grads.Estimator:
    return grads.backprop(context.loss_fn)


FORWARD_ESTIMATORS: dict[str, str] = {"fg": "mean", "frog": "orthogonal_projection"}
"""CLI names of the multi-tangent forward-gradient estimators, and their aggregation."""


def _forward_gradient(context: EstimatorContext) -> grads.Estimator:
    """``fg`` / ``frog`` with ``config.tangents`` tangents of distribution ``config.tangent_dist``."""
    config = context.config
    return grads.forward_gradient(
        context.loss_fn,
        num_tangents=config.tangents,
        aggregation=FORWARD_ESTIMATORS[config.estimator],
        tangents=config.tangent_dist,
    )


ESTIMATOR_BUILDERS: dict[str, Callable[[EstimatorContext], grads.Estimator]] = {
    "backprop": _backprop,
    "fg": _forward_gradient,
    "frog": _forward_gradient,
    "fg-rank1": build_rank1_estimator,
    "frog-rank1": build_rank1_estimator,
    "fg-activity": build_activity_estimator,
    "frog-activity": build_activity_estimator,
    **dict.fromkeys(FEEDBACK_ESTIMATORS, build_feedback_estimator),
}
ESTIMATORS: tuple[str, ...] = tuple(ESTIMATOR_BUILDERS)


def check_estimator_name(name: str) -> None:
    if name not in ESTIMATOR_BUILDERS:
        raise ValueError(f"estimator: unknown estimator {name!r}; allowed: {', '.join(ESTIMATORS)}")


def build_estimator(context: EstimatorContext) -> grads.Estimator:
    """The estimator named by ``context.config.estimator``."""
    check_estimator_name(context.config.estimator)
    return ESTIMATOR_BUILDERS[context.config.estimator](context)
