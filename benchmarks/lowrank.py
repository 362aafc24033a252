"""Factorised (OIALR) layers against dense: inference and training step time, and compilations over OIALR runs.

Part 1, step time: an MLP 784-1024-1024-1024-10 (batch 256, Adam) whose three eligible layers are factorised at
rank fractions r / min(m, n) of 1/2, 1/4, 1/10 and 1/20, against the same dense model (backprop) in the same run;
then the same for a ResNet (channels 32-64-128, 32x32x3 inputs, batch 32) whose convolutions (kernels viewed as
(kh kw c_in) x c_out) and head are factorised. Timings are interleaved and repeated; medians and same-run ratios are
printed. The forward pass is computed in factored form when r (m + n) < m n, i.e. below rank fraction 1/2 for a
square layer (a conv: a conv with r output channels, then S V^T on the channels).

Part 2, compilations: digits MLP 64-256-256-10 trained for 12 epochs with OIALR (delay 44, a check every 11
steps, cutoff 0.4) with exact shapes (bucket ratio 1) and with padded storage compacted at ratios 1.25 and 2 (see
``jaxalgo.lowrank.storage_sizes``); the number of traces of
the training step, the final test accuracy and trainable fraction; plus the same run with the moments of S
rotated at each check (does rotating help?) and the full-rank baseline.

    python benchmarks/lowrank.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxalgo
from jaxalgo import lowrank
from jaxalgo.config import RunConfig
from jaxalgo.train import TrainState, make_loss_fn, make_train_step, train_and_evaluate

BATCH, CONV_BATCH, REPEATS, STEPS = 256, 32, 7, 10
FRACTIONS = (0.5, 0.25, 0.1, 0.05)


def make_batch(size: int, input_shape: tuple[int, ...]) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "x": jnp.asarray(rng.normal(size=(size, *input_shape)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, size=size), jnp.int32),
        "idx": jnp.arange(size, dtype=jnp.int32),
    }


def step_times(chain: jaxalgo.models.Chain, batch: dict[str, jax.Array], title: str) -> dict[str, dict[str, float]]:
    fn, params = jaxalgo.models.split_chain(chain)
    layers = lowrank.find_layers(fn, params)
    models = {"dense": (fn, params)}
    for fraction in FRACTIONS:
        ranks = {i.name: (max(1, int(fraction * i.full_rank)),) * 2 for i in layers}
        fn_r, params_r, _ = lowrank.factorize_chain(fn, params, ranks=ranks)
        models[f"rank_{fraction}"] = (fn_r, params_r)
    tx = lowrank.freeze_factors(optax.adam(1e-3))
    run_key = jax.random.key(1)
    runners = {}
    for name, (f, p) in models.items():
        estimator = jaxalgo.grads.backprop(make_loss_fn(f, jaxalgo.losses.softmax_cross_entropy))
        step = make_train_step(estimator, tx)
        forward = jax.jit(f.apply)
        # models share unconverted arrays and the step donates its state: private copies for each use
        infer_params, p = jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, p)
        state = TrainState(jnp.zeros((), jnp.int32), p, estimator.init(p), tx.init(p))
        runners[name] = {"step": step, "forward": forward, "state": state, "params": infer_params}
        state, loss = step(state, batch, run_key)  # compile
        runners[name]["state"] = state
        forward(infer_params, batch["x"]).block_until_ready()
    times = {name: {"train": [], "infer": []} for name in models}
    for _ in range(REPEATS):
        for name, r in runners.items():
            start = time.perf_counter()
            state = r["state"]
            for _ in range(STEPS):
                state, loss = r["step"](state, batch, run_key)
            loss.block_until_ready()
            r["state"] = state
            times[name]["train"].append((time.perf_counter() - start) / STEPS)
            start = time.perf_counter()
            for _ in range(STEPS):
                out = r["forward"](r["params"], batch["x"])
            out.block_until_ready()
            times[name]["infer"].append((time.perf_counter() - start) / STEPS)
    medians = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    dense = medians["dense"]
    print(f"\n{title}\n{'model':<12} {'train ms':>9} {'ratio':>6} {'infer ms':>9} {'ratio':>6}")
    result = {}
    for name, m in medians.items():
        tr, ir = m["train"] / dense["train"], m["infer"] / dense["infer"]
        print(f"{name:<12} {1e3 * m['train']:9.2f} {tr:6.2f} {1e3 * m['infer']:9.2f} {ir:6.2f}")
        result[name] = {
            "train_ms": 1e3 * m["train"],
            "train_ratio": tr,
            "infer_ms": 1e3 * m["infer"],
            "infer_ratio": ir,
        }
    return result


def oialr_runs() -> dict[str, dict[str, float]]:
    base = RunConfig.from_flags(epochs=12, quiet=True, seed=0)
    oialr = {"lowrank": "oialr", "lowrank_delay": 44, "lowrank_frequency": 11, "lowrank_cutoff": 0.4}
    runs = {
        "full_rank": {},
        "oialr_bucket_1": {**oialr, "lowrank_bucket_ratio": 1.0},
        "oialr_bucket_1.25": {**oialr, "lowrank_bucket_ratio": 1.25},
        "oialr_bucket_2": {**oialr, "lowrank_bucket_ratio": 2.0},
        "oialr_bucket_1.25_rotated": {**oialr, "lowrank_bucket_ratio": 1.25, "lowrank_rotate_moments": True},
    }
    result = {}
    print(f"\n{'digits MLP run':<27} {'test acc':>8} {'loss':>6} {'trainable':>9}", end="")
    print(f" {'checks':>6} {'compiles':>8} {'seconds':>7}")
    for name, extra in runs.items():
        with tempfile.TemporaryDirectory() as workdir:
            final = train_and_evaluate(base.with_flags(**extra), workdir)
            checks = 0
            with open(f"{workdir}/metrics.jsonl") as f:
                checks = sum(1 for line in f if json.loads(line).get("event") == "oialr_check")
        row = {
            "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"],
            "trainable_fraction": final.get("trainable_fraction", 1.0),
            "checks": checks,
            "compilations": final.get("compilations", 1),
            "seconds": final["seconds"],
        }
        result[name] = row
        print(
            f"{name:<27} {100 * row['test_accuracy']:7.2f}% {row['test_loss']:6.4f} "
            f"{row['trainable_fraction']:9.3f} {checks:6d} "
            f"{row['compilations']:8d} {row['seconds']:7.1f}"
        )
    return result


def main() -> None:
    started = time.perf_counter()
    mlp = jaxalgo.models.mlp((784,), 10, hidden=(1024, 1024, 1024), activation="relu", key=jax.random.key(0))
    times = step_times(mlp, make_batch(BATCH, (784,)), "MLP 784-1024-1024-1024-10, batch 256")
    resnet = jaxalgo.models.resnet((32, 32, 3), 10, channels=(32, 64, 128), key=jax.random.key(0))
    conv_times = step_times(resnet, make_batch(CONV_BATCH, (32, 32, 3)), "ResNet 32-64-128 on 32x32x3, batch 32")
    runs = oialr_runs()
    print(
        json.dumps(
            {
                "step_time": times,
                "step_time_resnet": conv_times,
                "digits_mlp": runs,
                "seconds": time.perf_counter() - started,
            }
        )
    )


if __name__ == "__main__":
    main()
