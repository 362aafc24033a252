"""jaxalgo: training neural networks beyond plain backpropagation, in JAX."""

from jaxalgo import experiments, grads, models, parallel

__version__ = "0.1.0"

__all__ = ["__version__", "experiments", "grads", "models", "parallel"]
