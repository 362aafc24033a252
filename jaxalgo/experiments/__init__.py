"""The forward-gradient paper's experiments as library functions: approximation quality and closed-form test functions.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
"""

from jaxalgo.experiments._approximation import Approximation, approximation_quality, approximation_sweep
from jaxalgo.experiments._test_functions import (
    STYBLINSKI_TANG_MINIMUM_PER_DIM,
    TEST_FUNCTIONS,
    Objective,
    as_loss,
    gradient_descent,
    rosenbrock,
    sphere,
    styblinski_tang,
)

__all__ = [
    "STYBLINSKI_TANG_MINIMUM_PER_DIM",
    "TEST_FUNCTIONS",
    "Approximation",
    "Objective",
    "approximation_quality",
    "approximation_sweep",
    "as_loss",
    "gradient_descent",
    "rosenbrock",
    "sphere",
    "styblinski_tang",
]
