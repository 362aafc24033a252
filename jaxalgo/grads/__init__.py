"""Gradient estimators behind one interface: ``init(params)`` and ``value_and_grad(params, state, batch, *, key)``.

Each estimator is a function returning an :class:`Estimator` and an options dataclass beside it whose
``build(problem)`` makes the estimator from a :class:`Problem`; :data:`ESTIMATORS` names them for the command
line (presets of the options classes).
"""

from jaxalgo.grads._activity import (
    ActivityOptions,
    LocalReadoutState,
    activity_forward_gradient,
    sample_activity_tangents,
)
from jaxalgo.grads._catalogue import ESTIMATORS
from jaxalgo.grads._combine import Aggregation
from jaxalgo.grads._estimator import (
    BackpropOptions,
    DirectionalSplit,
    EmptyState,
    Estimator,
    EstimatorOptions,
    Problem,
    backprop,
    scalar_loss,
)
from jaxalgo.grads._f3 import (
    F3_VARIANTS,
    FEEDBACK_PRESETS,
    DelayedFeedbackState,
    FeedbackOptions,
    FeedbackState,
    dfa,
    drtp,
    f3,
    last_layer_only,
)
from jaxalgo.grads._fa import FAOptions, fa
from jaxalgo.grads._feedback import FEEDBACK_INITS, feedback_matrices
from jaxalgo.grads._forward import ForwardOptions, forward_gradient, forward_gradient_directional
from jaxalgo.grads._rank1 import (
    Rank1ForwardGradient,
    rank1_directional,
    rank1_fallbacks,
    rank1_forward_gradient,
)
from jaxalgo.grads._zo import ZeroOrderOptions, zeroth_order

__all__ = [
    "ESTIMATORS",
    "F3_VARIANTS",
    "FEEDBACK_INITS",
    "FEEDBACK_PRESETS",
    "ActivityOptions",
    "Aggregation",
    "BackpropOptions",
    "DelayedFeedbackState",
    "DirectionalSplit",
    "EmptyState",
    "Estimator",
    "EstimatorOptions",
    "FAOptions",
    "FeedbackOptions",
    "FeedbackState",
    "ForwardOptions",
    "LocalReadoutState",
    "Problem",
    "Rank1ForwardGradient",
    "ZeroOrderOptions",
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
    "scalar_loss",
    "zeroth_order",
]
