"""jaxalgo: training neural networks beyond plain backpropagation, in JAX."""

from jaxalgo import grads, models, parallel

__version__ = "0.1.0"

__all__ = ["__version__", "grads", "models", "parallel"]
