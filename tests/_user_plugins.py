"""A user's own model factory and data loader, for ``jaxalgo train --model tests._user_plugins:two_layer_chain
--dataset tests._user_plugins:blobs`` (the plug-in path of the command line)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxalgo import data, models


class Flatten(nnx.Module):
    def __init__(self, features_in: int, features_out: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(features_in, features_out, rngs=rngs)

    def __call__(self, x):
        return nnx.tanh(self.linear(x.reshape(x.shape[0], -1)))


def two_layer_chain(input_shape, num_outputs, *, key):
    """A chain of two blocks (a hidden tanh layer on the flattened input, a linear head)."""
    rngs = nnx.Rngs(key)
    features = int(np.prod(input_shape))
    return models.Chain([Flatten(features, 24, rngs=rngs), nnx.Linear(24, num_outputs, rngs=rngs)])


def one_module(input_shape, num_outputs, *, key):
    """Not a chain: one nnx module (the CLI wraps it as a chain of one block)."""
    return nnx.Linear(int(np.prod(input_shape)), num_outputs, rngs=nnx.Rngs(key))


def blobs(*, seed, test_fraction, data_dir):
    """Three Gaussian blobs in 6 dimensions (a user's loader: any function returning a jaxalgo Dataset)."""
    del data_dir
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 6)) * 3
    y = rng.integers(0, 3, 600).astype(np.int32)
    x = (centres[y] + rng.standard_normal((600, 6))).astype(np.float32)
    cut = int(600 * (1 - test_fraction))
    return data.Dataset("blobs", "classification", x[:cut], y[:cut], x[cut:], y[cut:], num_outputs=3)
