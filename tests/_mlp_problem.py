"""A small tanh MLP over a flat parameter dict (``w0, b0, w1, ...``) with an MSE loss, and random data for it:
the shared test problem of the forward-gradient tests (rank-1, dense, data-parallel)."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np


def normal(seed, shape, scale=1.0, dtype=np.float64):
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def make_problem(sizes=(3, 4, 2), batch=8, seed=0, dtype=np.float64):
    params = {}
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = normal(seed + 2 * i, (m, n), 1 / math.sqrt(m), dtype)
        params[f"b{i}"] = normal(seed + 2 * i + 1, (n,), 0.1, dtype)
    data = {
        "x": normal(seed + 50, (batch, sizes[0]), dtype=dtype),
        "y": normal(seed + 51, (batch, sizes[-1]), dtype=dtype),
    }
    return params, data


def loss_fn(params, batch):
    """``0.5 |MLP(x) - y|^2`` averaged over the batch (a mean, as the data-parallel identity requires)."""
    h = batch["x"]
    layers = len(params) // 2
    for i in range(layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            h = jnp.tanh(h)
    return 0.5 * jnp.mean(jnp.sum((h - batch["y"]) ** 2, axis=-1))
