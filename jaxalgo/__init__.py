"""jaxalgo: training neural networks beyond plain backpropagation, in JAX."""

from importlib import metadata as _metadata

from jaxalgo import data, experiments, grads, losses, lowrank, models, optimizers, options, parallel, runner

try:
    __version__: str = _metadata.version("jaxalgo")
    """The installed distribution's version (defined once, in pyproject.toml)."""
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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
