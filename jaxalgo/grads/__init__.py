"""Gradient estimators behind one interface: ``init(params)`` and ``value_and_grad(params, state, batch, *, key)``."""

from jaxalgo.grads._estimator import EmptyState, Estimator, backprop

__all__ = ["EmptyState", "Estimator", "backprop"]
