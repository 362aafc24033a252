"""Fully connected networks (multi-layer perceptrons) as chains of dense blocks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jaxalgo.models._chain import Chain
from jaxalgo.models._common import (
    ACTIVATIONS,
    ActivationName,
    check_activation,
    check_input_shape,
    check_int_sequence,
    check_key,
    check_positive_int,
)


class DenseBlock(nnx.Module):
    r"""One dense layer and its activation: :math:`h = \sigma(\mathrm{flatten}(x) W + b)`.

    Args:
      in_features: input width (after flattening).
      out_features: output width.
      activation: a name in :data:`ACTIVATIONS` (``"identity"`` for an output block).
      flatten: whether to flatten every axis but the batch axis first (the first block of an MLP).
      rngs: the random streams for the initialisation.
    """

    def __init__(
        self, in_features: int, out_features: int, *, activation: ActivationName, flatten: bool = False, rngs: nnx.Rngs
    ):
        self.linear = nnx.Linear(in_features, out_features, rngs=rngs)
        self.activation = check_activation(activation)
        self.flatten = flatten

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        return ACTIVATIONS[self.activation](self.linear(x))


def mlp(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    hidden: Sequence[int] = (256, 256),
    activation: ActivationName = "relu",
    key: jax.Array,
) -> Chain:
    r"""A multi-layer perceptron as a :class:`Chain` of ``len(hidden) + 1`` dense blocks.

    .. math::
      h_0 = \mathrm{flatten}(x), \quad h_l = \sigma(h_{l-1} W_l + b_l) \ (l \le L), \quad
      y = h_L W_{L+1} + b_{L+1}

    The first block flattens its input, so images ``(N, H, W, C)`` and vectors ``(N, F)`` both work. The
    last block has no activation: it outputs logits or regression outputs. Kernels are ``(in, out)``.

    Args:
      input_shape: the shape of one example, without the batch axis, e.g. ``(64,)`` or ``(28, 28, 1)``.
      num_outputs: the output width (classes or regression targets), ``>= 1``.
      hidden: the hidden widths, a non-empty sequence of positive integers.
      activation: the hidden activation, a name in :data:`ACTIVATIONS`.
      key: the PRNG key of the initialisation (same key, same parameters).

    Returns:
      The model, a :class:`Chain`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = mlp((64,), 10, hidden=(32,), key=jax.random.key(0))
      >>> model(jnp.zeros((5, 64))).shape
      (5, 10)
    """
    shape = check_input_shape(input_shape, image=False)
    num_outputs = check_positive_int(num_outputs, "num_outputs")
    widths = check_int_sequence(hidden, "hidden")
    activation = check_activation(activation)
    rngs = nnx.Rngs(check_key(key))

    in_features = 1
    for size in shape:
        in_features *= size
    blocks: list[nnx.Module] = []
    for index, width in enumerate(widths):
        blocks.append(DenseBlock(in_features, width, activation=activation, flatten=index == 0, rngs=rngs))
        in_features = width
    blocks.append(DenseBlock(in_features, num_outputs, activation="identity", flatten=False, rngs=rngs))
    return Chain(blocks)
