"""Multi-tangent forward gradients (weight perturbation): step time against backprop, tangent generation, memory.

Model: MLP 784-1024-1024-1024-10 (ReLU, softmax cross-entropy, 2.9M parameters), batch 256, float32, random data.

1. Step time, as a ratio to the backprop step of the same run: ``fg`` (mean) and ``frog`` (projection) for
   k = 1, 4, 16 with dense Gaussian tangents (vmap and scan batching), dense Rademacher, and rank-1 tangents.
   Every step is one jit-compiled ``value_and_grad`` including tangent sampling; medians of interleaved repeats.
2. Tangent generation on its own: 16 dense tangents of 2.9M entries with each generator JAX offers (threefry,
   rbg, unsafe_rbg key implementations; Gaussian via ``jax.random.normal``; Rademacher from raw bits), and the
   FROG k = 16 step with its tangents drawn beforehand (the step excluding generation).
3. Compiled temp memory (``memory_analysis``) of each batching strategy (vmap, scan, chunk of 4) for FROG k = 16 and
   of backprop, for MLPs of depth 4 and 32 (hidden width 1024).

The steps are a list of ``(name, builder)`` entries, ``builder(loss_fn) -> value_and_grad``. Activity perturbation
(``fg_k*_activity``, ``frog_k*_activity``, tangent generation included) needs the model as a chain of blocks: it runs
on ``jaxalgo.models.mlp`` with the same sizes and activation, timed in the same interleaved loop and divided by the
same backprop step (``backprop_chain`` is backprop on that chain, for comparison).

Reference implementation (PyTorch, forward-mode AD, one pass per tangent), measured on the same machine, MLP and
batch (issue #8): backprop 45 ms; weight-perturbation FROG k = 16 1021 ms (22.6x its backprop); activity-perturbation
FROG k = 16 185 ms (4.1x).

Run: ``python benchmarks/forward_gradients.py`` (no arguments). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalgo.grads import activity_forward_gradient, backprop, forward_gradient
from jaxalgo.grads._combine import combination_coefficients
from jaxalgo.grads._tangents import FlatLayout, tangent_flat, tangent_keys
from jaxalgo.losses import softmax_cross_entropy
from jaxalgo.models import mlp, split_chain

SIZES = (784, 1024, 1024, 1024, 10)
BATCH = 256
REPEATS = 5
REFERENCE_MS = {"backprop": 45.0, "frog_k16_weight": 1021.0, "frog_k16_activity": 185.0}


def init_params(key, sizes):
    params = []
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        w = jax.random.normal(jax.random.fold_in(key, i), (m, n)) / np.sqrt(m)
        params.append({"kernel": w, "bias": jnp.zeros(n)})
    return tuple(params)


def loss_fn(params, batch):
    h = batch["x"]
    for i, layer in enumerate(params):
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(h) * jax.nn.one_hot(batch["y"], h.shape[-1]), axis=-1))


def _forward(k, aggregation, tangents="gaussian", batching="vmap", chunk_size=None):
    def build(loss):
        est = forward_gradient(
            loss, num_tangents=k, aggregation=aggregation, tangents=tangents, batching=batching, chunk_size=chunk_size
        )
        return est.value_and_grad

    return build


STEPS: list[tuple[str, Callable]] = [("backprop", lambda loss: backprop(loss).value_and_grad)]
for _k in (1, 4, 16):
    STEPS += [
        (f"fg_k{_k}", _forward(_k, "mean")),
        (f"frog_k{_k}", _forward(_k, "orthogonal_projection")),
        (f"fg_rank1_k{_k}", _forward(_k, "mean", "rank1")),
        (f"frog_rank1_k{_k}", _forward(_k, "orthogonal_projection", "rank1")),
    ]
STEPS += [
    ("frog_k16_scan", _forward(16, "orthogonal_projection", batching="scan")),
    ("fg_k16_scan", _forward(16, "mean", batching="scan")),
    ("frog_k16_rademacher", _forward(16, "orthogonal_projection", "rademacher")),
    ("fg_k16_rademacher", _forward(16, "mean", "rademacher")),
]


def _generators(n, k):
    """Functions ``key -> sum of k dense tangents of n entries`` (the sum keeps XLA from skipping the draw).

    ``gaussian`` / ``rademacher`` are jaxalgo's tangents (threefry, drawn by blocks of 4096 from folded keys, as in a
    ``vmap`` step); the ``raw_*`` entries draw one ``(k, n)`` array with each key implementation JAX offers.
    """
    layout = FlatLayout.of([jax.ShapeDtypeStruct((n,), jnp.float32)])

    def library(distribution):
        draw = jax.vmap(lambda tk: tangent_flat(tk, layout, distribution))
        return lambda key: draw(tangent_keys(key, k)).sum(0)

    def convert(key, impl):
        if impl == "threefry":
            return key
        return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)

    def raw_normal(impl):
        return lambda key: jax.random.normal(convert(key, impl), (k, n)).sum(0)

    def raw_rademacher(impl):
        def draw(key):
            words = jax.random.bits(convert(key, impl), (k, -(-n // 32)), jnp.uint32)
            bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
            return (1 - 2 * bits.astype(jnp.float32)).reshape(k, -1)[:, :n].sum(0)

        return draw

    out = {"gaussian": library("gaussian"), "rademacher": library("rademacher")}
    for impl in ("threefry", "rbg", "unsafe_rbg"):
        out[f"raw_gaussian_{impl}"] = raw_normal(impl)
        out[f"raw_rademacher_{impl}"] = raw_rademacher(impl)
    return out


def frog_given_tangents(params, batch, v, key):
    """The vmap FROG step with the tangents ``v`` (k x n) drawn beforehand: the step excluding tangent generation."""
    del key
    leaves, treedef = jax.tree.flatten(params)
    layout = FlatLayout.of(leaves)
    loss, lin = jax.linearize(lambda p: loss_fn(p, batch), params)
    d = jax.vmap(lambda vf: lin(jax.tree.unflatten(treedef, layout.split(vf))))(v)
    c = combination_coefficients("orthogonal_projection", d, v @ v.T)
    return loss, jax.tree.unflatten(treedef, layout.split(c @ v))


def _time_interleaved(compiled: dict[str, Callable], args: dict[str, tuple], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for r in range(repeats):
        for name, fn in compiled.items():
            a = args[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*a[:-1], jax.random.fold_in(a[-1], r)))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _temp_memory(depth: int) -> dict[str, int]:
    sizes = (784, *([1024] * depth), 10)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), sizes))
    batch = {
        "x": jax.ShapeDtypeStruct((BATCH, 784), jnp.float32),
        "y": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    builders = {
        "backprop": lambda loss: backprop(loss).value_and_grad,
        "frog_k16_vmap": _forward(16, "orthogonal_projection"),
        "frog_k16_scan": _forward(16, "orthogonal_projection", batching="scan"),
        "frog_k16_chunk4": _forward(16, "orthogonal_projection", batching="chunk", chunk_size=4),
        "frog_k4_scan": _forward(4, "orthogonal_projection", batching="scan"),
    }
    out = {}
    for name, build in builders.items():
        fn = build(loss_fn)
        step = jax.jit(lambda p, b, k, fn=fn: fn(p, None, b, key=k)[:2])
        out[name] = int(step.lower(params, batch, key).compile().memory_analysis().temp_size_in_bytes)
    return out


def main():
    key = jax.random.key(0)
    params = init_params(key, SIZES)
    batch = {
        "x": jax.random.normal(jax.random.fold_in(key, 100), (BATCH, SIZES[0])),
        "y": jax.random.randint(jax.random.fold_in(key, 101), (BATCH,), 0, SIZES[-1]),
    }
    n = sum(x.size for x in jax.tree.leaves(params))

    compiled, args = {}, {}
    for name, build in STEPS:
        fn = build(loss_fn)
        compiled[name] = jax.jit(lambda p, b, k, fn=fn: fn(p, None, b, key=k)[:2]).lower(params, batch, key).compile()
        args[name] = (params, batch, key)
        jax.block_until_ready(compiled[name](params, batch, key))
    layout = FlatLayout.of(jax.tree.leaves(params))
    v = jax.lax.map(lambda tk: tangent_flat(tk, layout, "gaussian"), tangent_keys(key, 16))
    compiled["frog_k16_given_tangents"] = jax.jit(frog_given_tangents).lower(params, batch, v, key).compile()
    args["frog_k16_given_tangents"] = (params, batch, v, key)
    for name, gen in _generators(n, 16).items():
        compiled[f"gen_{name}"] = jax.jit(gen).lower(key).compile()
        args[f"gen_{name}"] = (key,)
        jax.block_until_ready(compiled[f"gen_{name}"](key))
    chain_fn, chain_params = split_chain(mlp((SIZES[0],), SIZES[-1], hidden=SIZES[1:-1], key=key))
    chain_steps = {"backprop_chain": backprop(lambda p, b: softmax_cross_entropy(chain_fn(p, b["x"]), b["y"]))}
    for k in (1, 4, 16):
        for label, aggregation in (("fg", "mean"), ("frog", "orthogonal_projection")):
            chain_steps[f"{label}_k{k}_activity"] = activity_forward_gradient(
                chain_fn, softmax_cross_entropy, num_tangents=k, aggregation=aggregation
            )
    for name, est in chain_steps.items():
        step = jax.jit(lambda p, b, k, fn=est.value_and_grad: fn(p, None, b, key=k)[:2])
        compiled[name] = step.lower(chain_params, batch, key).compile()
        args[name] = (chain_params, batch, key)
        jax.block_until_ready(compiled[name](chain_params, batch, key))
    medians = _time_interleaved(compiled, args, REPEATS)
    base = medians["backprop"]
    ratios = {name: medians[name] / base for name in medians}
    excluding = {"frog_k16": medians["frog_k16_given_tangents"] / base}
    print(f"MLP {'-'.join(map(str, SIZES))} ({n:,} params), batch {BATCH}, float32; median of {REPEATS}")
    print(f"{'step':<26}{'median ms':>11}{'x backprop':>12}")
    for name in medians:
        print(f"{name:<26}{1e3 * medians[name]:>11.1f}{ratios[name]:>12.2f}")
    print(
        "excluding tangent generation (tangents drawn beforehand; x backprop): "
        + ", ".join(f"{k} {v:.2f}" for k, v in excluding.items())
    )
    print(
        f"reference (PyTorch) on this machine: backprop {REFERENCE_MS['backprop']:.0f} ms, weight FROG k=16 "
        f"{REFERENCE_MS['frog_k16_weight']:.0f} ms; here: backprop {1e3 * base:.0f} ms, frog_k16 "
        f"{1e3 * medians['frog_k16']:.0f} ms, frog_rank1_k16 {1e3 * medians['frog_rank1_k16']:.0f} ms; "
        f"activity FROG k=16: reference {REFERENCE_MS['frog_k16_activity']:.0f} ms, here "
        f"{1e3 * medians['frog_k16_activity']:.0f} ms ({ratios['frog_k16_activity']:.2f}x backprop)"
    )
    memory = {f"depth{d}": _temp_memory(d) for d in (4, 32)}
    print(f"{'temp memory MiB':<26}" + "".join(f"{name:>17}" for name in memory["depth4"]))
    for depth, row in memory.items():
        print(f"{depth:<26}" + "".join(f"{v / 2**20:>17.1f}" for v in row.values()))
    figures = {
        "model": "mlp-784-1024-1024-1024-10",
        "num_params": int(n),
        "batch": BATCH,
        "repeats": REPEATS,
        "median_ms": {k: round(1e3 * v, 2) for k, v in medians.items()},
        "ratio_to_backprop": {k: round(v, 3) for k, v in ratios.items()},
        "ratio_excluding_generation": {k: round(v, 3) for k, v in excluding.items()},
        "temp_bytes": memory,
        "reference_ms": REFERENCE_MS,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
