"""Builds a model by name, for configuration files and the command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxalgo.models._chain import Chain
from jaxalgo.models._mlp import mlp
from jaxalgo.models._resnet import resnet
from jaxalgo.models._vit import vit

_BUILDERS: dict[str, tuple[Callable[..., Chain], tuple[str, ...]]] = {
    "mlp": (mlp, ("hidden", "activation")),
    "resnet": (resnet, ("channels", "blocks_per_stage")),
    "vit": (vit, ("patch_size", "dim", "depth", "heads", "mlp_dim")),
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)
"""The model names :func:`build_model` accepts."""


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options that model ``name`` accepts in :func:`build_model`."""
    _check_name(name)
    return _BUILDERS[name][1]


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"name: got unknown model {name!r}; allowed: {', '.join(MODELS)}")


def build_model(name: str, *, input_shape: tuple[int, ...], num_outputs: int, key: jax.Array, **options: Any) -> Chain:
    """Builds the model called ``name``.

    Args:
      name: one of :data:`MODELS` (``"mlp"``, ``"resnet"``, ``"vit"``).
      input_shape: the shape of one example, without the batch axis.
      num_outputs: the output width.
      key: the PRNG key of the initialisation.
      **options: the model's own keyword options (see :func:`model_options`), e.g. ``hidden`` for the mlp.

    Returns:
      The model, a :class:`Chain`.

    Raises:
      ValueError: ``name`` is not in :data:`MODELS`, or an argument is out of range.
      TypeError: an option is not one the model takes.
    """
    _check_name(name)
    builder, allowed = _BUILDERS[name]
    for option in options:
        if option not in allowed:
            raise TypeError(
                f"{option}: got unknown option {option!r} for model {name!r}; allowed options: {', '.join(allowed)}"
            )
    return builder(input_shape, num_outputs, key=key, **options)
