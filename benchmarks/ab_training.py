"""AB-training against DDP on 8 simulated CPU devices (2 groups x 4): bytes per step, step times, digits accuracy.

1. Digits (MLP 64-256-256-10, Adam 1e-3, batch 64, 20 epochs): test accuracy of DDP and of AB-training at the same
   epochs and seed, the ranks AB-training ends with and the model's compression ratio.
2. Bytes per device per step from the compiled HLO (``jaxalgo.parallel.ab_comm``): DDP's step, and AB's average
   over one cycle (``ddp_steps_after_sync`` data-parallel steps, the group steps, one sync, one re-SVD), for the
   MLP at the ranks the digits run reached, and for the MLP and the digits ViT at 1/8 of the full ranks.
3. Step times: medians of repeated DDP steps and AB group / data-parallel steps in this one process, as ratios to
   DDP. On simulated devices every "link" is a memory copy on the same cores: the times show the computational
   overhead (the composition ``W = A B`` and the chain rule), not network savings.

Runs with no arguments in a few minutes; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from jaxalgo import parallel as par  # noqa: E402
from jaxalgo.config import TrainConfig  # noqa: E402
from jaxalgo.parallel._train import ABRunner, DataParallelRunner  # noqa: E402
from jaxalgo.train import setup, train_and_evaluate  # noqa: E402

DIGITS = {"epochs": 20, "seed": 0, "mesh": "2x4", "quiet": True}
AB = {"parallel": "ab", "ab_cutoff": 0.3}
REPEATS = 30


def median_seconds(step, state, *args):
    state = jax.tree.map(lambda x: x.copy(), state)  # the steps donate their state
    for _ in range(3):
        state, loss = step(state, *args)
    jax.block_until_ready(loss)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        state, loss = step(state, *args)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def digits_batch(experiment):
    data = experiment.dataset
    return {"x": np.asarray(data.x_train[:64]), "y": np.asarray(data.y_train[:64])}


def cycle_ratio(runner, state, batch):
    comm = par.ab_comm(runner.ab, state, batch, runner._run_key)
    return comm, comm["cycle_bytes"] / comm["bytes"]["ddp"]


def main():
    figures = {}
    with tempfile.TemporaryDirectory() as root:
        ddp = train_and_evaluate(TrainConfig(**DIGITS, parallel="ddp"), f"{root}/ddp")
        ab_config = TrainConfig(**DIGITS, **AB)
        ab = train_and_evaluate(ab_config, f"{root}/ab")
    experiment = setup(ab_config)
    runner = ABRunner(experiment)
    state = ab["state"]
    ranks = {k: int(v) for k, v in jax.device_get(state.ranks).items()}
    batch = digits_batch(experiment)
    comm, ratio = cycle_ratio(runner, state, batch)
    figures["digits"] = {
        "ddp_test_accuracy": ddp["test_accuracy"],
        "ab_test_accuracy": ab["test_accuracy"],
        "accuracy_difference_points": 100 * (ab["test_accuracy"] - ddp["test_accuracy"]),
        "ab_final_ranks": ranks,
        "compression_ratio": runner.ab.compression(state)["compression_ratio"],
        "cycle_bytes_over_ddp_at_final_ranks": ratio,
        "bytes": comm["bytes"],
    }
    print(f"digits MLP: DDP {ddp['test_accuracy']:.4f}, AB {ab['test_accuracy']:.4f}; ranks {ranks}")
    print(f"  bytes per step over a cycle at these ranks: {ratio:.3f} x DDP ({comm['bytes']})")

    for model in ("mlp", "vit"):
        config = TrainConfig(**DIGITS, **AB, model=model)
        experiment = setup(config)
        runner = ABRunner(experiment)
        fresh = runner.init(experiment.init_state())
        eighth = {x.name: max(1, x.full_rank // 8) for x in runner.ab.layers}
        state = runner.ab.factorize(fresh, ranks=eighth)
        comm, ratio = cycle_ratio(runner, state, digits_batch(experiment))
        figures[f"{model}_rank_eighth"] = {
            "cycle_bytes_over_ddp": ratio,
            "bytes": comm["bytes"],
            "compression_ratio": runner.ab.compression(state)["compression_ratio"],
        }
        print(f"{model} at 1/8 rank: bytes per step over a cycle {ratio:.3f} x DDP ({comm['bytes']})")
        if model == "mlp":
            key = runner._run_key
            sharded = par.shard(digits_batch(experiment), runner.mesh)
            group = median_seconds(runner.ab.steps["group"], state, sharded, key, 1.0)
            ab_ddp = median_seconds(runner.ab.steps["ddp"], state, sharded, key, 1.0)
            ddp_runner = DataParallelRunner(setup(TrainConfig(**DIGITS, parallel="ddp")))
            ddp_state = ddp_runner.init(experiment.init_state())
            base = median_seconds(ddp_runner._step, ddp_state, sharded, ddp_runner._run_key)
            figures["step_time_ratio_to_ddp"] = {"ab_group_step": group / base, "ab_ddp_step": ab_ddp / base}
            figures["ddp_step_ms"] = 1e3 * base
            print(
                f"step time (median of {REPEATS}): DDP {1e3 * base:.2f} ms; AB group step {group / base:.2f} x, "
                f"AB data-parallel step {ab_ddp / base:.2f} x"
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
