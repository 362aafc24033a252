"""Rank-1 vs dense Gaussian tangents for forward gradients: step time as a ratio to backprop, compiled memory.

Model: MLP 784-1024-1024-1024-10 (ReLU, softmax cross-entropy, 2.9M parameters), batch 256, k = 16 tangents.
Every step is one jit-compiled ``value_and_grad`` (tangent sampling included) on random data; timings are medians
of interleaved repetitions measured in this run (the machine is shared, so only same-run ratios mean anything).

Run: ``python benchmarks/rank1_tangents.py`` (no arguments, a few minutes on 2 CPU cores). The last line is one
JSON object with the figures.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved_medians  # same directory
from forward_gradients import BATCH, SIZES, init_params, loss_fn  # the same MLP and loss, same directory

from jaxalgo.grads import backprop, rank1_forward_gradient

K = 16
REPEATS = 7


def dense_gaussian_frog(loss_fn, num_tangents):
    """Baseline: k dense Gaussian tangents (k x n matrix drawn in the step), vmap(jvp), Gram solve, V^T c."""

    def value_and_grad(params, state, batch, *, key):
        leaves, treedef = jax.tree.flatten(params)
        sizes = [x.size for x in leaves]
        v = jax.random.normal(key, (num_tangents, sum(sizes)))
        parts = jnp.split(v, np.cumsum(sizes)[:-1], axis=1)
        tangents = [p.reshape(num_tangents, *x.shape) for p, x in zip(parts, leaves, strict=True)]

        def jvp(t):
            return jax.jvp(lambda p: loss_fn(p, batch), (params,), (jax.tree.unflatten(treedef, t),))

        loss, d = jax.vmap(jvp, out_axes=(None, 0))(tangents)
        c = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(v @ v.T, lower=True), d)
        return loss, jax.tree.unflatten(treedef, [jnp.tensordot(c, t, axes=1) for t in tangents]), state

    return value_and_grad


def main():
    key = jax.random.key(0)
    params = init_params(key, SIZES)
    batch = {
        "x": jax.random.normal(jax.random.fold_in(key, 100), (BATCH, SIZES[0])),
        "y": jax.random.randint(jax.random.fold_in(key, 101), (BATCH,), 0, SIZES[-1]),
    }
    steps = {
        "backprop": backprop(loss_fn).value_and_grad,
        "rank1_frog": rank1_forward_gradient(
            loss_fn, num_tangents=K, aggregation="orthogonal_projection"
        ).value_and_grad,
        "rank1_mean": rank1_forward_gradient(loss_fn, num_tangents=K, aggregation="mean").value_and_grad,
        "rank1_frog_scan": rank1_forward_gradient(
            loss_fn, num_tangents=K, aggregation="orthogonal_projection", batching="scan"
        ).value_and_grad,
        "dense_gaussian_frog": dense_gaussian_frog(loss_fn, K),
    }
    compiled, temp_bytes = {}, {}
    for name, fn in steps.items():
        jitted = jax.jit(lambda p, b, k, fn=fn: fn(p, None, b, key=k)[:2])
        compiled[name] = jitted.lower(params, batch, key).compile()
        temp_bytes[name] = int(compiled[name].memory_analysis().temp_size_in_bytes)
        jax.block_until_ready(compiled[name](params, batch, key))  # warm-up
    medians = interleaved_medians(compiled, lambda r: (params, batch, jax.random.fold_in(key, r)), REPEATS)
    ratios = {name: medians[name] / medians["backprop"] for name in steps}

    # Quality check in the same run: projection property of the rank-1 FROG estimate.
    _, g = compiled["rank1_frog"](params, batch, jax.random.key(1))
    true = jax.grad(loss_fn)(params, batch)
    gf = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    tf = jnp.concatenate([x.ravel() for x in jax.tree.leaves(true)])
    cosine = float(gf @ tf / (jnp.linalg.norm(gf) * jnp.linalg.norm(tf)))
    norm_ratio = float(jnp.linalg.norm(gf) / jnp.linalg.norm(tf))

    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"MLP {'-'.join(map(str, SIZES))} ({num_params:,} params), batch {BATCH}, k = {K}; median of {REPEATS}")
    print(f"{'step':<22}{'median ms':>11}{'x backprop':>12}{'temp MiB':>11}")
    for name in steps:
        print(f"{name:<22}{1e3 * medians[name]:>11.1f}{ratios[name]:>12.2f}{temp_bytes[name] / 2**20:>11.1f}")
    print(f"rank-1 FROG: cosine to the true gradient {cosine:.5f}, norm ratio {norm_ratio:.5f}")
    print(
        f"dense Gaussian / rank-1 FROG: time {medians['dense_gaussian_frog'] / medians['rank1_frog']:.1f}x, "
        f"temp memory {temp_bytes['dense_gaussian_frog'] / temp_bytes['rank1_frog']:.1f}x"
    )
    figures = {
        "model": "mlp-784-1024-1024-1024-10",
        "num_params": int(num_params),
        "batch": BATCH,
        "k": K,
        "repeats": REPEATS,
        "median_ms": {n: round(1e3 * m, 2) for n, m in medians.items()},
        "ratio_to_backprop": {n: round(r, 3) for n, r in ratios.items()},
        "temp_bytes": temp_bytes,
        "rank1_frog_cosine": cosine,
        "rank1_frog_norm_ratio": norm_ratio,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
