"""Gradient estimators behind one interface: ``init(params)`` and ``value_and_grad(params, state, batch, *, key)``."""

from jaxalgo.grads._activity import LocalReadoutState, activity_forward_gradient, sample_activity_tangents
from jaxalgo.grads._estimator import DirectionalSplit, EmptyState, Estimator, backprop
from jaxalgo.grads._f3 import (
    F3_VARIANTS,
    DelayedFeedbackState,
    FeedbackState,
    dfa,
    drtp,
    f3,
    last_layer_only,
)
from jaxalgo.grads._fa import fa
from jaxalgo.grads._feedback import FEEDBACK_INITS, feedback_matrices
from jaxalgo.grads._forward import forward_gradient, forward_gradient_directional
from jaxalgo.grads._rank1 import (
    Rank1ForwardGradient,
    rank1_directional,
    rank1_fallbacks,
    rank1_forward_gradient,
)

__all__ = [
    "F3_VARIANTS",
    "FEEDBACK_INITS",
    "DelayedFeedbackState",
    "DirectionalSplit",
    "EmptyState",
    "Estimator",
    "FeedbackState",
    "LocalReadoutState",
    "Rank1ForwardGradient",
    "activity_forward_gradient",
    "backprop",
    "dfa",
    "drtp",
    "f3",
    "fa",
    "feedback_matrices",
    "forward_gradient",
    "forward_gradient_directional",
    "last_layer_only",
    "rank1_directional",
    "rank1_fallbacks",
    "rank1_forward_gradient",
    "sample_activity_tangents",
]
