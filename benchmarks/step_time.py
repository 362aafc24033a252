"""Backprop step time through jaxalgo's training step against a hand-written jax.value_and_grad + optax step.

Same model (MLP 784-1024-1024-10), same batch (256), same optimizer (Adam), same run; timings interleaved and
repeated, medians reported. The ratio near 1.0 means the library adds no overhead.

    python benchmarks/step_time.py
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxalgo
from jaxalgo.train import TrainState, make_loss_fn, make_train_step

BATCH, REPEATS, STEPS_PER_REPEAT = 256, 15, 20


def main() -> None:
    chain = jaxalgo.models.mlp((784,), 10, hidden=(1024, 1024), activation="relu", key=jax.random.key(0))
    fn, params = jaxalgo.models.split_chain(chain)
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(BATCH, 784)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, size=BATCH), jnp.int32),
        "idx": jnp.arange(BATCH, dtype=jnp.int32),
    }
    loss_fn = make_loss_fn(fn, jaxalgo.losses.softmax_cross_entropy)
    tx = optax.adam(1e-3)

    estimator = jaxalgo.grads.backprop(loss_fn)
    library_step = make_train_step(estimator, tx)
    run_key = jax.random.key(1)

    def hand_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    hand_step = jax.jit(hand_step, donate_argnums=(0, 1))

    state = TrainState(jnp.zeros((), jnp.int32), params, estimator.init(params), tx.init(params))
    hand_params, hand_opt = jax.tree.map(jnp.copy, params), tx.init(params)

    def time_library() -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(STEPS_PER_REPEAT):
            state, loss = library_step(state, batch, run_key)
        loss.block_until_ready()
        return (time.perf_counter() - start) / STEPS_PER_REPEAT

    def time_hand() -> float:
        nonlocal hand_params, hand_opt
        start = time.perf_counter()
        for _ in range(STEPS_PER_REPEAT):
            hand_params, hand_opt, loss = hand_step(hand_params, hand_opt, batch)
        loss.block_until_ready()
        return (time.perf_counter() - start) / STEPS_PER_REPEAT

    time_library(), time_hand()  # compile and warm up
    library, hand = [], []
    for _ in range(REPEATS):
        library.append(time_library())
        hand.append(time_hand())
    lib_ms, hand_ms = 1e3 * statistics.median(library), 1e3 * statistics.median(hand)
    ratios = [a / b for a, b in zip(library, hand, strict=True)]
    ratio = statistics.median(ratios)
    print(f"MLP 784-1024-1024-10, batch {BATCH}, Adam; median of {REPEATS} x {STEPS_PER_REPEAT} steps")
    print(f"  jaxalgo train step      {lib_ms:8.2f} ms")
    print(f"  hand-written jax+optax  {hand_ms:8.2f} ms")
    print(f"  ratio (median of paired ratios)  {ratio:.3f}  [min {min(ratios):.3f}, max {max(ratios):.3f}]")
    figures = {"benchmark": "step_time", "library_ms": lib_ms, "hand_ms": hand_ms, "ratio": ratio}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
