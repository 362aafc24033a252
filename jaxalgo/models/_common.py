"""Shared pieces of the model builders: activations and argument checks.

Every check runs at the public boundary, before any parameter is created, and raises a ``ValueError`` or
``TypeError`` naming the argument, the value received and what is allowed.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]
ActivationName = Literal["relu", "tanh", "gelu", "gelu_tanh", "sigmoid", "silu", "elu", "leaky_relu", "identity"]
"""The names of :data:`ACTIVATIONS` (a block's ``activation``)."""
ACTIVATION_NAMES: tuple[ActivationName, ...] = typing.get_args(ActivationName)


def _identity(x: jax.Array) -> jax.Array:
    return x


ACTIVATIONS: Mapping[ActivationName, Activation] = MappingProxyType(
    {
        "relu": jax.nn.relu,
        "tanh": jnp.tanh,
        # Exact (erf) GELU, as in the ViT paper; ``gelu_tanh`` is the tanh approximation.
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "sigmoid": jax.nn.sigmoid,
        "silu": jax.nn.silu,
        "elu": jax.nn.elu,
        "leaky_relu": jax.nn.leaky_relu,
        "identity": _identity,
    }
)
"""Activation functions by name (read-only). Blocks store the name, so graph definitions compare equal."""
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def check_activation(activation: ActivationName, *, argument: str = "activation") -> ActivationName:
    """Returns ``activation`` if it names an entry of :data:`ACTIVATIONS`, else raises."""
    if not isinstance(activation, str) or activation not in ACTIVATION_NAMES:
        raise ValueError(f"{argument}: got {activation!r}; allowed: {', '.join(sorted(ACTIVATION_NAMES))}")
    return activation


def _is_int(value: Any) -> bool:
    return isinstance(value, int | jnp.integer) and not isinstance(value, bool)


def check_positive_int(value: Any, argument: str, *, minimum: int = 1) -> int:
    """Returns ``int(value)`` if it is an integer ``>= minimum``, else raises naming ``argument``."""
    if not _is_int(value):
        raise TypeError(f"{argument}: got {value!r} ({type(value).__name__}); expected an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{argument}: got {value!r}; expected an integer >= {minimum}")
    return int(value)


def check_int_sequence(value: Any, argument: str) -> tuple[int, ...]:
    """Returns ``value`` as a non-empty tuple of positive integers, else raises naming ``argument``."""
    allowed = "expected a non-empty sequence of positive integers"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{argument}: got {value!r} ({type(value).__name__}); {allowed}")
    if len(value) == 0:
        raise ValueError(f"{argument}: got {value!r} (empty); {allowed}")
    if not all(_is_int(v) for v in value):
        raise TypeError(f"{argument}: got {value!r}, which holds a non-integer; {allowed}")
    if any(v < 1 for v in value):
        raise ValueError(f"{argument}: got {value!r}, which holds a value < 1; {allowed}")
    return tuple(int(v) for v in value)


def check_input_shape(input_shape: Any, *, image: bool) -> tuple[int, ...]:
    """Checks the per-example input shape (no batch axis).

    Args:
      input_shape: ``(F,)`` for vectors, ``(H, W, C)`` for NHWC images, or any shape of positive sizes.
      image: whether the model needs an image ``(H, W, C)``.

    Returns:
      ``input_shape`` as a tuple of ints.
    """
    shape = check_int_sequence(input_shape, "input_shape")
    if image and len(shape) != 3:
        raise ValueError(
            f"input_shape: got {shape!r} ({len(shape)}-D per example); expected an image shape "
            f"(height, width, channels) without the batch axis (use the mlp for vector inputs)"
        )
    return shape


def check_key(key: Any) -> jax.Array:
    """Checks that ``key`` is a JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``)."""
    if not isinstance(key, jax.Array):
        raise TypeError(f"key: got {key!r} ({type(key).__name__}); expected a JAX PRNG key such as jax.random.key(0)")
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise ValueError(
            f"key: got an array of dtype {key.dtype} and shape {key.shape}; expected a single PRNG key "
            f"(a typed scalar key or uint32[2])"
        )
    return key


def group_count(channels: int, max_groups: int = 8) -> int:
    """GroupNorm groups for ``channels``: ``gcd(channels, max_groups)``, so groups always divide evenly."""
    return math.gcd(channels, max_groups)
