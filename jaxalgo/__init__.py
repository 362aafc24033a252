"""jaxalgo: training neural networks beyond plain backpropagation, in JAX."""

from jaxalgo import data, experiments, grads, losses, lowrank, models, optimizers, options, parallel, runner

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "data",
    "experiments",
    "grads",
    "losses",
    "lowrank",
    "models",
    "optimizers",
    "options",
    "parallel",
    "runner",
]
