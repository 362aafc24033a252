"""Gradient estimators behind one interface: ``init(params)`` and ``value_and_grad(params, state, batch, *, key)``."""

from jaxalgo.grads._activity import LocalReadoutState, activity_forward_gradient, sample_activity_tangents
from jaxalgo.grads._estimator import DirectionalSplit, EmptyState, Estimator, backprop
from jaxalgo.grads._rank1 import (
    Rank1ForwardGradient,
    rank1_directional,
    rank1_fallbacks,
    rank1_forward_gradient,
)

__all__ = [
    "DirectionalSplit",
    "EmptyState",
    "Estimator",
    "LocalReadoutState",
    "Rank1ForwardGradient",
    "activity_forward_gradient",
    "backprop",
    "rank1_directional",
    "rank1_fallbacks",
    "rank1_forward_gradient",
    "sample_activity_tangents",
]
