"""How a training run builds F3, DFA, DRTP, FA and last-layer-only (``jaxalgo.estimators`` registry entries)."""

from __future__ import annotations

from typing import Any

import jax

from jaxalgo import losses
from jaxalgo.grads._estimator import Estimator
from jaxalgo.grads._f3 import dfa, drtp, f3, last_layer_only
from jaxalgo.grads._fa import fa

FEEDBACK_ESTIMATORS: tuple[str, ...] = ("f3", "dfa", "drtp", "fa", "llo")
_FEEDBACK_KEY_STREAM = 3  # train.py draws init, data order and step keys from streams 0, 1, 2 of the seed


def feedback_key(seed: int) -> jax.Array:
    """The key of a run's feedback matrices: stream 3 of ``jax.random.key(seed)``."""
    return jax.random.fold_in(jax.random.key(seed), _FEEDBACK_KEY_STREAM)


def build_feedback_estimator(context: Any) -> Estimator:
    """The estimator named by ``context.config.estimator`` (one of :data:`FEEDBACK_ESTIMATORS`).

    Uses ``config.f3_variant`` (f3 only), ``config.feedback_init``, ``config.feedback_mode`` and
    ``config.feedback_reduction`` (not fa, which always backpropagates through its feedback matrices); the
    output nonlinearity of the error ``t - y`` follows the run's loss (sigmoid_bce: sigmoid, cross_entropy:
    softmax, mse: identity).
    """
    config, dataset = context.config, context.dataset
    name = config.estimator
    if name not in FEEDBACK_ESTIMATORS:
        raise ValueError(f"estimator: {name!r} is not a feedback estimator; allowed: {', '.join(FEEDBACK_ESTIMATORS)}")
    key = feedback_key(config.seed)
    loss_name = losses.default_loss(dataset.task) if config.loss == "auto" else config.loss
    activation = {"sigmoid_bce": "sigmoid", "cross_entropy": "softmax", "mse": "identity"}[loss_name]
    if name == "fa":
        return fa(context.chain, context.output_loss, feedback_init=config.feedback_init, key=key)
    common = dict(
        input_shape=dataset.input_shape,
        output_activation=activation,
        feedback_init=config.feedback_init,
        mode=config.feedback_mode,
        hidden_reduction=config.feedback_reduction,
        key=key,
    )
    if name == "f3":
        return f3(
            context.chain, context.output_loss, train_targets=dataset.y_train, variant=config.f3_variant, **common
        )
    builder = {"dfa": dfa, "drtp": drtp, "llo": last_layer_only}[name]
    return builder(context.chain, context.output_loss, **common)
