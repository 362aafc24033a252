"""Activity-perturbation forward gradients: step time as a ratio to backprop, tangent generation, compiled memory.

Model: jaxalgo's MLP 784-1024-1024-1024-10 (ReLU, softmax cross-entropy, 2.9M parameters, activity dimension
3082 per example), batch 256, float32. Every step is one jit-compiled ``value_and_grad`` on random data, tangent
generation included; ``fg`` is the mean, ``frog`` the orthogonal projection, for k = 1, 4, 16. Tangent generation
(the ``k x 3082`` activity tangents) is also timed on its own. Timings are medians of interleaved repetitions in
this run (the machine is shared: only same-run ratios mean anything); temp memory is XLA's
``memory_analysis().temp_size_in_bytes`` and FLOPs XLA's ``cost_analysis()`` of the compiled step (both independent
of the load). ``frog_k16_simulated`` (directional derivatives from backprop's activity gradients) is the oracle
mode, for comparison only.

Issue target: activity perturbation, k = 16, <= 4x backprop including tangent generation. The PyTorch reference
on this machine: backprop 45 ms, activity-perturbation FROG k = 16 185 ms (4.1x).

Run: ``python benchmarks/activity_perturbation.py`` (no arguments, about a minute on 2 CPU cores). The last line is
one JSON object with the figures.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from _timing import interleaved_medians  # same directory

from jaxalgo.grads import activity_forward_gradient, backprop, sample_activity_tangents
from jaxalgo.losses import softmax_cross_entropy
from jaxalgo.models import mlp, split_chain

HIDDEN = (1024, 1024, 1024)
BATCH = 256
TANGENTS = (1, 4, 16)
REPEATS = 9
REFERENCE_MS = {"backprop": 45.0, "frog_k16": 185.0}


def main():
    key = jax.random.key(0)
    fn, params = split_chain(mlp((784,), 10, hidden=HIDDEN, key=key))
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(BATCH, 784)).astype(np.float32),
        "y": rng.integers(0, 10, size=BATCH).astype(np.int32),
    }

    def loss_fn(p, b):
        return softmax_cross_entropy(fn(p, b["x"]), b["y"])

    steps = {"backprop": backprop(loss_fn).value_and_grad}
    for k in TANGENTS:
        for label, aggregation in (("fg", "mean"), ("frog", "orthogonal_projection")):
            est = activity_forward_gradient(fn, softmax_cross_entropy, num_tangents=k, aggregation=aggregation)
            steps[f"{label}_k{k}"] = est.value_and_grad
    simulated = activity_forward_gradient(
        fn, softmax_cross_entropy, num_tangents=16, aggregation="orthogonal_projection", mode="simulated"
    )
    steps["frog_k16_simulated"] = simulated.value_and_grad  # backprop's activity gradients, then U delta (oracle)
    shapes = [(w,) for w in (*HIDDEN, 10)]
    for k in TANGENTS:
        steps[f"tangents_k{k}"] = lambda p, s, b, *, key, k=k: sample_activity_tangents(key, k, shapes, np.float32)

    compiled, temp_bytes, flops = {}, {}, {}
    for name, step in steps.items():
        jitted = jax.jit(lambda p, b, k, step=step: step(p, None, b, key=k))
        compiled[name] = jitted.lower(params, batch, key).compile()
        temp_bytes[name] = int(compiled[name].memory_analysis().temp_size_in_bytes)
        flops[name] = float(compiled[name].cost_analysis()["flops"])
        jax.block_until_ready(compiled[name](params, batch, key))  # warm-up
    medians = interleaved_medians(compiled, lambda r: (params, batch, jax.random.fold_in(key, r)), REPEATS)
    ratios = {name: medians[name] / medians["backprop"] for name in steps}

    print(f"MLP 784-{'-'.join(map(str, HIDDEN))}-10, batch {BATCH}, float32; median of {REPEATS} interleaved runs")
    flop_ratios = {name: flops[name] / flops["backprop"] for name in steps}
    print(f"{'step':<20}{'median ms':>11}{'x backprop':>12}{'FLOPs x bp':>12}{'temp MiB':>11}")
    for name in steps:
        print(
            f"{name:<20}{1e3 * medians[name]:>11.2f}{ratios[name]:>12.2f}{flop_ratios[name]:>12.2f}"
            f"{temp_bytes[name] / 2**20:>11.2f}"
        )
    frog16 = 1e3 * medians["frog_k16"]
    print(
        f"reference (PyTorch, this machine): backprop {REFERENCE_MS['backprop']:.0f} ms, activity FROG k = 16 "
        f"{REFERENCE_MS['frog_k16']:.0f} ms; jaxalgo activity FROG k = 16 {frog16:.1f} ms "
        f"(reference / jaxalgo = {REFERENCE_MS['frog_k16'] / frog16:.2f}), target <= 4x backprop: "
        f"{'met' if ratios['frog_k16'] <= 4 else 'missed'} ({ratios['frog_k16']:.2f}x)"
    )
    figures = {
        "model": "mlp-784-1024-1024-1024-10",
        "batch": BATCH,
        "dtype": "float32",
        "repeats": REPEATS,
        "median_ms": {n: round(1e3 * m, 3) for n, m in medians.items()},
        "ratio_to_backprop": {n: round(r, 3) for n, r in ratios.items()},
        "flops_ratio_to_backprop": {n: round(r, 3) for n, r in flop_ratios.items()},
        "temp_bytes": temp_bytes,
        "reference_ms": REFERENCE_MS,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
