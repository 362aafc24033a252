"""Gradient estimators behind one interface: ``init(params)`` and ``value_and_grad(params, state, batch, *, key)``."""

from jaxalgo.grads._estimator import DirectionalSplit, EmptyState, Estimator, backprop
from jaxalgo.grads._forward import forward_gradient, forward_gradient_directional
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
    "Rank1ForwardGradient",
    "backprop",
    "forward_gradient",
    "forward_gradient_directional",
    "rank1_directional",
    "rank1_fallbacks",
    "rank1_forward_gradient",
]
