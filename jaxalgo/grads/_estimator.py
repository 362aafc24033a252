"""The estimator interface shared by every gradient estimator, and backprop as one estimator among others.

An estimator is a NamedTuple of two pure functions, after optax's ``GradientTransformation``:

- ``state = est.init(params)``
- ``loss, grads, state = est.value_and_grad(params, state, batch, *, key)``

``grads`` has the structure, shapes and dtypes of ``params``, so any ``optax.GradientTransformation``
consumes it unchanged. ``loss`` is what the loss function returned: a scalar, or ``(scalar, aux)`` for
estimators built with ``has_aux=True``. Stateless estimators use :class:`EmptyState`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from jaxalgo.losses import LossName

Params = Any
Batch = Any
EstimatorState = Any


class InitFn(Protocol):
    def __call__(self, params: Params) -> EstimatorState: ...


class ValueAndGradFn(Protocol):
    def __call__(
        self, params: Params, state: EstimatorState, batch: Batch, *, key: jax.Array
    ) -> tuple[Any, Params, EstimatorState]: ...


class DirectionalSplit(NamedTuple):
    """The two halves of a weight-perturbation forward-gradient step, for data-parallel use.

    ``loss, d = directional_derivatives(params, batch, key=key)`` needs the batch;
    ``grads = estimate_from_directional(params, d, key=key)`` needs only ``d`` (shape (k,)) and the same key.
    Since ``d_i = <grad f, v_i>`` is linear in a loss that averages over the batch, data-parallel workers
    all-reduce (average) only the ``k`` numbers ``d`` (and the loss) between the two calls; every worker then
    forms the same estimate from the same tangents.
    """

    directional_derivatives: Callable[..., tuple[Any, jax.Array]]
    estimate_from_directional: Callable[..., Any]


class Estimator(NamedTuple):
    """A gradient estimator: ``init(params) -> state`` and
    ``value_and_grad(params, state, batch, *, key) -> (loss, grads, state)``.

    ``split`` is set by stateless weight-perturbation forward-gradient estimators: their step is
    ``split.directional_derivatives`` followed by ``split.estimate_from_directional`` (see
    :class:`DirectionalSplit`), which lets data parallelism move ``k`` numbers instead of ``n``. ``None`` for
    every other estimator.
    """

    init: InitFn
    value_and_grad: ValueAndGradFn
    split: DirectionalSplit | None = None


@dataclasses.dataclass(frozen=True)
class Problem:
    """What an estimator may know of the task it is built for (the run configuration is not part of it).

    Only ``loss_fn`` is required; the block-wise estimators (F3, DFA, DRTP, FA, last-layer-only and activity
    perturbation) also need ``chain`` and ``output_loss`` and say so when they are missing.

    Attributes:
      loss_fn: ``loss_fn(params, batch)`` returning a floating-point scalar (or ``(scalar, aux)``, ``has_aux``).
      chain: the model as blocks, a :class:`jaxalgo.models.ChainFn` (its ``apply(params, x)`` runs them all).
      output_loss: ``output_loss(y_pred, y_true) -> scalar``, the mean over the batch.
      loss_name: the name of ``output_loss`` in :data:`jaxalgo.losses.LOSSES` (F3 infers its output nonlinearity).
      input_shape: the shape of one example, without the batch axis.
      num_outputs: the model's output width.
      train_targets: the training targets in sample-index order (F3's delayed-error buffer starts from them).
      key: the estimator's own randomness (fixed feedback matrices, readouts), not the per-step key.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      loss_of_chain: ``loss_of_chain(chain) -> loss_fn``, how the loss follows a changed model (OIALR
        factorises the chain); :meth:`from_chain` sets it. Without it :meth:`with_chain` refuses, rather than
        silently replace a user's loss by one it would have to guess.
    """

    loss_fn: Callable[[Params, Batch], Any]
    chain: Any = None
    output_loss: Callable[[Any, Any], Any] | None = None
    loss_name: LossName | None = None
    input_shape: tuple[int, ...] | None = None
    num_outputs: int | None = None
    train_targets: Any = None
    key: jax.Array | None = None
    has_aux: bool = False
    loss_of_chain: Callable[[Any], Callable[[Params, Batch], Any]] | None = None

    @classmethod
    def from_chain(cls, chain: Any, output_loss: Callable[[Any, Any], Any], **fields: Any) -> Problem:
        """The problem of ``output_loss(chain.apply(params, batch["x"]), batch["y"])`` (other fields as given)."""

        def loss_of_chain(chain):
            def loss_fn(params, batch):
                return output_loss(chain.apply(params, batch["x"]), batch["y"])

            return loss_fn

        return cls(loss_of_chain(chain), chain, output_loss, loss_of_chain=loss_of_chain, **fields)

    def __post_init__(self):
        if not callable(self.loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(self.loss_fn).__name__}")

    def require(self, *fields: str, by: str) -> None:
        """Raises ValueError naming the missing fields that estimator ``by`` needs."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"problem: {by} needs {', '.join(missing)}; build the Problem with them "
                "(chain: jaxalgo.models.split_chain(model)[0], or jaxalgo.models.chain_of(block functions))"
            )

    def with_loss(self, loss_fn: Callable[[Params, Batch], Any]) -> Problem:
        """The same problem with another loss (e.g. on the trainable part of the parameters)."""
        return dataclasses.replace(self, loss_fn=loss_fn)

    def with_chain(self, chain: Any) -> Problem:
        """The same problem on another chain (OIALR after factorising): ``loss_fn = loss_of_chain(chain)``."""
        if self.loss_of_chain is None:
            raise ValueError(
                "problem: loss_of_chain is None, so the loss cannot follow a changed model; give "
                "Problem(..., loss_of_chain=lambda chain: loss_fn_for(chain)) or use Problem.from_chain"
            )
        return dataclasses.replace(self, chain=chain, loss_fn=self.loss_of_chain(chain))


class EstimatorOptions(Protocol):
    """What every estimator's options class provides (see :mod:`jaxalgo.options`).

    ``data_parallel`` says whether :func:`jaxalgo.parallel.data_parallel` may run the estimator: False for the
    estimators whose state is per run (F3's error buffer, the feedback matrices).
    """

    data_parallel: ClassVar[bool]

    def build(self, problem: Problem) -> Estimator: ...


def scalar_loss(value: Any) -> Any:
    """The scalar of a loss that may be ``(loss, aux)``: the one place that convention is unpacked."""
    return value[0] if isinstance(value, tuple) else value


class EmptyState(NamedTuple):
    """State of an estimator that carries none."""


def check_scalar_loss(value: Any, *, has_aux: bool) -> jax.Array:
    """Returns the scalar loss from a loss function's output, or raises a clear error.

    Works on abstract values too, so estimators call it while tracing, before any work is done.
    """
    if has_aux:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise TypeError(f"loss_fn: with has_aux=True it must return a pair (loss, aux); got {type(value).__name__}")
        value = value[0]
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            "loss_fn: must return a floating-point scalar"
            + (" as the first element of (loss, aux)" if has_aux else "")
            + f"; got shape {shape} and dtype {dtype}"
        )
    return value


def check_float_params(params: Params) -> None:
    """Raises if any parameter leaf is not a floating-point array (gradients are undefined there)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"params: leaf {jax.tree_util.keystr(path)} has dtype {dtype}; "
                "estimators need floating-point parameters (float32, float64, bfloat16, float16)"
            )


def stateless_init(params: Params) -> EmptyState:
    """``init`` of an estimator that carries no state: checks the parameters' dtypes, returns :class:`EmptyState`."""
    check_float_params(params)
    return EmptyState()


def backprop(loss_fn: Callable[..., Any], *, has_aux: bool = False) -> Estimator:
    """The exact gradient by reverse-mode autodiff, behind the common estimator interface.

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a floating-point scalar, or ``(scalar, aux)`` with
        ``has_aux=True``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      An :class:`Estimator` whose ``value_and_grad`` is ``jax.value_and_grad(loss_fn)``; the key is unused.

    Example::

      est = jaxalgo.grads.backprop(loss_fn)
      state = est.init(params)
      loss, grads, state = est.value_and_grad(params, state, batch, key=key)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")

    def value_and_grad(params, state, batch, *, key=None):
        del key
        check_float_params(params)

        def checked(p, b):
            out = loss_fn(p, b)
            check_scalar_loss(out, has_aux=has_aux)
            return out

        value, grads = jax.value_and_grad(checked, has_aux=has_aux)(params, batch)
        return value, grads, state

    return Estimator(stateless_init, value_and_grad)


@dataclasses.dataclass(frozen=True)
class BackpropOptions:
    """Backprop: the exact gradient by reverse-mode autodiff (no options)."""

    data_parallel: ClassVar[bool] = True
    pipeline: ClassVar[str] = "backprop"  # runs as the GPipe pipeline (jaxalgo.parallel.pipeline)

    def build(self, problem: Problem) -> Estimator:
        return backprop(problem.loss_fn, has_aux=problem.has_aux)
