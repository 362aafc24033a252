"""Output losses and evaluation metrics.

An output loss maps the model output ``y`` (logits or regression outputs, shape (B, C)) and the targets to a
scalar mean over the batch. Classification targets are integer labels (B,); regression targets are (B, T).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from jaxalgo.data._dataset import Task

OutputLoss = Callable[[jax.Array, jax.Array], jax.Array]

LossName = Literal["cross_entropy", "sigmoid_bce", "mse"]
"""The names of the output losses (the run configuration's ``loss``, besides ``"auto"``)."""
LOSSES: tuple[LossName, ...] = typing.get_args(LossName)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of ``-log softmax(logits)[label]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of independent sigmoid outputs against one-hot targets (the F3 paper's choice).

    Mean over the batch of the sum over the C outputs.
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of the squared error summed over targets, halved: ``0.5 * |y - t|^2``."""
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1).mean()


def get_loss(name: LossName) -> OutputLoss:
    """The output loss called ``name`` (one of :data:`LOSSES`)."""
    table = {"cross_entropy": softmax_cross_entropy, "sigmoid_bce": sigmoid_bce, "mse": mse}
    if name not in table:
        raise ValueError(f"loss: unknown loss {name!r}; allowed: {', '.join(LOSSES)}")
    return table[name]


def default_loss(task: Task) -> LossName:
    """Cross-entropy for classification, MSE for regression."""
    return "cross_entropy" if task == "classification" else "mse"


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose arg-max equals the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def mean_absolute_error(outputs: jax.Array, targets: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """Mean absolute error, with outputs and targets first multiplied by ``scale`` (e.g. the target std, to
    report it in the original units of a standardised target)."""
    return jnp.mean(jnp.abs((outputs - targets) * scale))
