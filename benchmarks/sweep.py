"""A learning-rate sweep as one vmapped program against the same sweep as one run after another.

8 learning rates (log-spaced 1e-4 to 1e-1), an MLP 64-256-256-10 with Adam on digits, 3 epochs of batch 32, a
held-out tenth of the training split for selection: ``jaxalgo.sweep.sweep`` with ``mode="vmap"`` (one compiled
program over the 8 stacked train states) and with ``mode="sequential"`` (8 runs on the single-device runner of
``jaxalgo train``, each compiled for its own learning rate). Both write the same files (one metrics file per value,
a checkpoint every epoch, the summary). The wall time is end to end (setup, compilation, training, evaluation,
checkpoints), the two modes interleaved within each repeat, medians over the repeats; the two must pick the same
learning rate.

    python benchmarks/sweep.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax

from jaxalgo import sweep
from jaxalgo.config import RunConfig

VALUES = "1e-4:1e-1:8"
REPEATS = 3
FLAGS = dict(hidden=(256, 256), epochs=3, batch_size=32, quiet=True)


def main() -> None:
    config = RunConfig.from_flags(**FLAGS)
    values = sweep.parse_values(VALUES)
    times: dict[str, list[float]] = {"vmap": [], "sequential": []}
    chosen: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(REPEATS):
            for mode in times:
                start = time.perf_counter()
                result = sweep.sweep(config, "lr", values, f"{root}/{mode}-{repeat}", mode=mode, plot=False)
                times[mode].append(time.perf_counter() - start)
                chosen[mode] = result.best
                jax.clear_caches()  # every repeat compiles afresh, as a new sweep would
            print(f"repeat {repeat}: vmap {times['vmap'][-1]:.1f} s, sequential {times['sequential'][-1]:.1f} s")
    vmap, sequential = statistics.median(times["vmap"]), statistics.median(times["sequential"])
    print(f"{len(values)} learning rates, {FLAGS['epochs']} epochs, MLP 256-256 on digits (median of {REPEATS})")
    print(f"  one vmapped program:     {vmap:.1f} s")
    print(f"  one run after another:   {sequential:.1f} s")
    print(f"  ratio sequential / vmap: {sequential / vmap:.2f}x")
    print(f"  chosen lr: vmap {chosen['vmap']}, sequential {chosen['sequential']}")
    figures = {
        "values": len(values),
        "epochs": FLAGS["epochs"],
        "vmap_seconds": round(vmap, 2),
        "sequential_seconds": round(sequential, 2),
        "ratio_sequential_over_vmap": round(sequential / vmap, 3),
        "same_choice": chosen["vmap"] == chosen["sequential"],
        "chosen_lr": chosen["vmap"],
        "repeats": REPEATS,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
