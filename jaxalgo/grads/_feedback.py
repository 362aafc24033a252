r"""Fixed random feedback matrices for F3, DFA, DRTP and feedback alignment.

A feedback matrix ``B`` of shape ``(rows, cols)`` carries an error signal of width ``rows`` (the model output
``C`` for F3 / DFA / DRTP, a layer's output for FA) to an activation of width ``cols`` (a block's flattened
output, a layer's input): the activation receives ``e @ B``. The matrices are drawn once from a key and live in
the estimator state, never in the parameters, so no optimizer (and no weight decay) ever touches them.

Initialisations (:data:`FEEDBACK_INITS`):

- ``kaiming_uniform`` (default): :math:`B_{ij} \sim U(-1/\sqrt{n}, 1/\sqrt{n})` with ``n = cols``, the
  bound of PyTorch's ``nn.Linear`` weight init (Kaiming uniform with ``a = sqrt(5)`` and fan-in ``n``).
- ``trinomial``: entries drawn uniformly from ``{-1, 0, 1}``.
- ``binomial``: entries drawn uniformly from ``{0, 1}``.
- ``identity``: ``+-I``, the columns tile ``[I, -I]`` (``rows x 2 rows``), cut off after ``cols`` columns;
  deterministic (the key is unused).

References:
  Flügel et al., *Feed-Forward Optimization With Delayed Feedback for Neural Networks*, arXiv 2304.13372.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

FeedbackInit = Literal["kaiming_uniform", "trinomial", "binomial", "identity"]
"""The initialisations of the fixed feedback matrices (see the module docstring)."""
FEEDBACK_INITS: tuple[FeedbackInit, ...] = typing.get_args(FeedbackInit)


def check_feedback_init(init: FeedbackInit) -> FeedbackInit:
    """Returns ``init`` if it names a feedback initialisation, else raises a ValueError naming the choices."""
    if init not in FEEDBACK_INITS:
        raise ValueError(f"feedback_init: unknown initialisation {init!r}; allowed: {', '.join(FEEDBACK_INITS)}")
    return init


def feedback_matrix(key: jax.Array, shape: tuple[int, int], init: FeedbackInit, dtype=jnp.float32) -> jax.Array:
    """One feedback matrix of ``shape = (rows, cols)`` drawn as ``init`` says (see the module docstring)."""
    check_feedback_init(init)
    return _draw(key, tuple(int(s) for s in shape), init, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, shape: tuple[int, int], init: FeedbackInit, dtype) -> jax.Array:
    rows, cols = shape
    if init == "kaiming_uniform":
        bound = 1.0 / jnp.sqrt(jnp.asarray(cols, dtype))
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
    if init == "trinomial":
        return jax.random.randint(key, shape, -1, 2).astype(dtype)
    if init == "binomial":
        return jax.random.randint(key, shape, 0, 2).astype(dtype)
    plus_minus = jnp.concatenate([jnp.eye(rows, dtype=dtype), -jnp.eye(rows, dtype=dtype)], axis=1)
    repeats = -(-cols // (2 * rows))
    return jnp.tile(plus_minus, (1, repeats))[:, :cols]


def feedback_matrices(
    key: jax.Array, shapes: Sequence[tuple[int, int]], init: FeedbackInit = "kaiming_uniform", dtype=jnp.float32
) -> tuple[jax.Array, ...]:
    """One feedback matrix per shape; matrix ``i`` is drawn from ``jax.random.fold_in(key, i)``.

    Args:
      key: a PRNG key (same key, same matrices).
      shapes: ``(rows, cols)`` of each matrix.
      init: one of :data:`FEEDBACK_INITS`.
      dtype: the floating-point dtype of the matrices.

    Returns:
      A tuple of arrays, one per shape.
    """
    check_feedback_init(init)
    shapes = tuple((int(rows), int(cols)) for rows, cols in shapes)
    return _draw_all(key, shapes, init, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_all(key: jax.Array, shapes: tuple[tuple[int, int], ...], init: FeedbackInit, dtype) -> tuple[jax.Array, ...]:
    return tuple(_draw(jax.random.fold_in(key, i), shape, init, dtype) for i, shape in enumerate(shapes))
