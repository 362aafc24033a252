"""OIALR against full-rank training on digits, MLP, ViT and ResNet: test accuracy and trainable fraction, same run.

Each model is trained twice with the same seed, data order and optimizer (Adam 1e-3, batch 64): full rank, and
OIALR with the flags below. The trainable fraction is that of the converted layers' parameters (``S`` and the
biases against ``W`` and the biases), as the ``trainable_fraction`` metric reports it. For a convolution converted at
full rank ``S`` is ``c_out x c_out`` against the ``(kh kw c_in) x c_out`` kernel, so its fraction starts near
``c_out / (kh kw c_in)`` (about 1/9 for 3x3 kernels with c_in = c_out) before any cut.

    python benchmarks/lowrank_digits.py            # all models; or name some: ... lowrank_digits.py resnet

The equivalent CLI runs, e.g.:

    jaxalgo train --model mlp --epochs 30 --lowrank oialr --lowrank-delay 100 --lowrank-frequency 10 \
        --lowrank-cutoff 0.45
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

from jaxalgo.config import RunConfig
from jaxalgo.train import train_and_evaluate

RUNS = {
    "mlp": (
        {"model": "mlp", "epochs": 30},
        {"lowrank": "oialr", "lowrank_delay": 100, "lowrank_frequency": 10, "lowrank_cutoff": 0.45},
    ),
    "vit": (
        {"model": "vit", "epochs": 20},
        {
            "lowrank": "oialr",
            "lowrank_delay": 100,
            "lowrank_frequency": 20,
            "lowrank_cutoff": 0.55,
            "lowrank_bucket_ratio": 1.25,
        },
    ),
    "resnet": (
        {"model": "resnet", "epochs": 10},
        {"lowrank": "oialr", "lowrank_delay": 66, "lowrank_frequency": 11, "lowrank_cutoff": 0.4},
    ),
}


def main(names: tuple[str, ...] = tuple(RUNS)) -> None:
    started = time.perf_counter()
    result = {}
    header = ("model", "full acc", "oialr acc", "gap (pts)", "trainable", "model frac", "compiles")
    print(f"{header[0]:<5} " + " ".join(f"{h:>9}" for h in header[1:]))
    for name in names:
        base, oialr = RUNS[name]
        finals = []
        for extra in ({}, oialr):
            with tempfile.TemporaryDirectory() as workdir:
                final = train_and_evaluate(RunConfig.from_flags(quiet=True, seed=0, **base, **extra), workdir)
            final.pop("state")
            finals.append(final)
        full, low = finals
        gap = 100 * (full["test_accuracy"] - low["test_accuracy"])
        result[name] = {
            "full_rank_accuracy": full["test_accuracy"],
            "oialr_accuracy": low["test_accuracy"],
            "gap_points": gap,
            "trainable_fraction": low["trainable_fraction"],
            "trainable_fraction_model": low["trainable_fraction_model"],
            "compilations": low["compilations"],
            "ranks": low["lowrank_ranks"],
            "full_rank_seconds": full["seconds"],
            "oialr_seconds": low["seconds"],
        }
        print(
            f"{name:<5} {100 * full['test_accuracy']:7.2f}% {100 * low['test_accuracy']:8.2f}% {gap:9.2f} "
            f"{low['trainable_fraction']:9.3f} {low['trainable_fraction_model']:10.3f} {low['compilations']:8d}"
        )
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result))


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or tuple(RUNS))
