"""Step time and compiled temp memory of F3, DRTP, DFA, FA and last-layer-only against backprop, in one run.

The F3 issue's setup: tanh MLP 784-1024-1024-1024-10, batch 256, Adam, sigmoid + BCE; F3's buffer sized for
MNIST (60000 x 10). Every method runs through jaxalgo's jit-compiled training step (estimator + optax update,
state donated). Timings are interleaved across methods and repeated; medians and their ratio to backprop's median
are printed, then one JSON line. Temp memory is the compiled step's ``temp_size_in_bytes``; a second, deep and
narrow MLP (16 hidden blocks of 256, batch 4096) shows how it grows with depth when activations dominate.

    python benchmarks/f3.py
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalgo import grads, losses, models
from jaxalgo.train import TrainState, make_train_step

BATCH, NUM_TRAIN, REPEATS, STEPS_PER_REPEAT = 256, 60000, 9, 10
REFERENCE_MS = {"BP": 74.6, "DRTP": 46.3, "DFA": 56.9, "F3": 48.8}  # PyTorch reference, same machine, per the issue


def estimators(fn, input_shape, labels, key) -> dict[str, grads.Estimator]:
    loss = losses.sigmoid_bce
    common = dict(input_shape=input_shape, key=key)
    result = {"BP": grads.backprop(lambda p, b: loss(fn.apply(p, b["x"]), b["y"]))}
    for mode in ("per_block", "surrogate"):
        suffix = "" if mode == "per_block" else " (surrogate)"
        result["F3" + suffix] = grads.f3(fn, loss, train_targets=labels, mode=mode, **common)
        result["DRTP" + suffix] = grads.drtp(fn, loss, mode=mode, **common)
        result["DFA" + suffix] = grads.dfa(fn, loss, mode=mode, **common)
    result["LLO"] = grads.last_layer_only(fn, loss, **common)
    result["FA"] = grads.fa(fn, loss, key=key)
    return result


def problem(input_dim, hidden, batch, num_train, seed=0):
    chain = models.mlp((input_dim,), 10, hidden=hidden, activation="tanh", key=jax.random.key(seed))
    fn, params = models.split_chain(chain)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=num_train).astype(np.int32)
    idx = rng.choice(num_train, size=batch, replace=False).astype(np.int32)
    batch = {
        "x": jnp.asarray(rng.normal(size=(batch, input_dim)), jnp.float32),
        "y": jnp.asarray(labels[idx]),
        "idx": jnp.asarray(idx),
    }
    return fn, params, labels, batch


def temp_bytes(estimator, params, batch) -> int:
    state = jax.eval_shape(estimator.init, params)
    step = lambda p, s, b: estimator.value_and_grad(p, s, b, key=jax.random.key(0))[1:]
    return int(jax.jit(step).lower(params, state, batch).compile().memory_analysis().temp_size_in_bytes)


def main() -> None:
    key = jax.random.key(1)
    fn, params, labels, batch = problem(784, (1024, 1024, 1024), BATCH, NUM_TRAIN)
    tx = optax.adam(1e-4)
    methods = estimators(fn, (784,), labels, key)
    steps, states = {}, {}
    for name, est in methods.items():
        steps[name] = make_train_step(est, tx)
        state = TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), est.init(params), tx.init(params))
        for _ in range(2):  # compile and warm up
            state, loss = steps[name](state, batch, key)
        loss.block_until_ready()
        states[name] = state

    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(REPEATS):
        for name in methods:
            state = states[name]
            start = time.perf_counter()
            for _ in range(STEPS_PER_REPEAT):
                state, loss = steps[name](state, batch, key)
            loss.block_until_ready()
            times[name].append((time.perf_counter() - start) / STEPS_PER_REPEAT)
            states[name] = state

    median_ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = {name: median_ms[name] / median_ms["BP"] for name in methods}
    temp = {name: temp_bytes(est, params, batch) for name, est in methods.items()}
    print(f"MLP 784-1024-1024-1024-10, batch {BATCH}, Adam; medians of {REPEATS} x {STEPS_PER_REPEAT} steps")
    print(f"{'method':>16} {'ms/step':>9} {'x BP':>6} {'temp MiB':>9} {'reference ms':>13}")
    for name in methods:
        ref = REFERENCE_MS.get(name)
        ref_text = f"{ref:.1f}" if ref else "-"
        print(f"{name:>16} {median_ms[name]:9.2f} {ratio[name]:6.2f} {temp[name] / 2**20:9.2f} {ref_text:>13}")

    # depth: temp memory of a deep narrow MLP where activations dwarf the weights
    deep_fn, deep_params, deep_labels, deep_batch = problem(64, (256,) * 16, 4096, 8192)
    deep = estimators(deep_fn, (64,), deep_labels, key)
    deep_temp = {
        name: temp_bytes(deep[name], deep_params, deep_batch)
        for name in ("BP", "F3", "F3 (surrogate)", "DFA", "DFA (surrogate)")
    }
    activation_mib = 4096 * 256 * 4 / 2**20
    print(
        f"deep MLP 64-(256 x 16)-10, batch 4096 (one activation = {activation_mib:.0f} MiB): temp MiB "
        + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in deep_temp.items())
    )

    print(
        json.dumps(
            {
                "benchmark": "f3",
                "model": "mlp 784-1024-1024-1024-10 tanh",
                "batch": BATCH,
                "step_ms": median_ms,
                "ratio_to_backprop": ratio,
                "temp_bytes": temp,
                "reference_ms": REFERENCE_MS,
                "speedup_vs_reference": {k: REFERENCE_MS[k] / median_ms[k] for k in REFERENCE_MS},
                "deep_mlp_temp_bytes": deep_temp,
            }
        )
    )


if __name__ == "__main__":
    main()
