"""Pipeline parallelism on 4 simulated CPU devices: F3 (stages update as microbatches stream through, no backward
wave) against a GPipe backprop pipeline (forward wave, backward wave, flush every step), side by side.

Models: the MLP 784-1024x6-10 (tanh, sigmoid + BCE, generated data; 7 blocks; its weights outweigh its activations)
and a ViT (16x16x1 images, patch 2: 64 tokens of width 32, 4 heads, 4 Transformer blocks; 6 blocks; its activations
outweigh its weights). For S = 2 and 4 stages and M = 4, 8, 16 microbatches of
``MICRO`` examples per step:

- idle stage-ticks as a share of all stage-ticks, counted from the ``busy`` masks the programs return (the schedule
  that ran): GPipe over one step (each wave: (S - 1) / (M + S - 1)); F3 over one epoch of ``CALLS`` calls of M
  microbatches that fills and drains once ((S - 1) / (CALLS M + S - 1)); the F3 figure for an MNIST-sized epoch
  (60000 examples) is the same formula, printed beside it;
- compiled temp memory per stage (``compile().memory_analysis().temp_size_in_bytes``; every device runs the same
  program) and how it grows per added microbatch, ``(temp(M=16) - temp(M=4)) / 12``: GPipe keeps every
  microbatch's stage input for its backward wave, F3 one microbatch in flight. The absolute figure also holds
  parameter-sized buffers (the gradient, the optimizer's temporaries);
- bytes per microbatch between stages, from the compiled HLO (``jaxalgo.parallel.comm_report``: the
  collective-permutes of one tick, which carries one microbatch over every link): F3 sends activations, the error
  signal, labels and indices forward and the new error rows back; GPipe activations forward and their gradients back;
- the time of one call (M microbatches) on the simulated devices: medians of interleaved repeats. NOT a speed-up
  measurement: the 4 "devices" share this machine's 2 cores, so pipelining cannot overlap anything here;
- accuracy on digits (tanh MLP 64-128-128-128-10, sigmoid + BCE, 4 stages, 4 microbatches of 16, Adam 1e-3) after
  ``EPOCHS`` epochs for pipelined F3, DRTP and GPipe backprop, through ``jaxalgo train --parallel pipeline``.

    python benchmarks/pipeline.py

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxalgo import grads, losses, models  # noqa: E402
from jaxalgo.config import RunConfig  # noqa: E402
from jaxalgo.parallel import comm_report  # noqa: E402
from jaxalgo.parallel import pipeline as pl  # noqa: E402
from jaxalgo.train import train_and_evaluate  # noqa: E402

STAGES, MICROBATCHES, MICRO, CALLS, REPEATS, EPOCHS = (2, 4), (4, 8, 16), 16, 2, 3, 10
MNIST = 60000


def mlp_problem():
    fn, params = models.split_chain(
        models.mlp((784,), 10, hidden=(1024,) * 6, activation="tanh", key=jax.random.key(0))
    )
    return fn, params, (784,), losses.sigmoid_bce, "sigmoid_bce"


def vit_problem():
    module = models.vit((16, 16, 1), 10, patch_size=2, dim=32, depth=4, heads=4, mlp_dim=64, key=jax.random.key(0))
    fn, params = models.split_chain(module)
    return fn, params, (16, 16, 1), losses.softmax_cross_entropy, "cross_entropy"


def data(input_shape, count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, *input_shape)).astype(np.float32)
    y = rng.integers(0, 10, count).astype(np.int32)
    return x, y


def temp_bytes(program, state, batch) -> int:
    return int(program.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def permute_bytes(program, state, batch, mesh) -> dict[str, int]:
    """Bytes per device of one tick's collective-permutes, split by direction (forward: to the next stage)."""
    report = comm_report(program, state, batch, mesh=mesh)
    out = {"forward": 0, "backward": 0}
    for c in report.collectives:
        if c.kind == "collective-permute":
            forward = all(t == s + 1 for s, t in c.replica_groups)
            out["forward" if forward else "backward"] += c.requested_bytes
    return out


def measure(name, build):
    fn, params, input_shape, loss, loss_name = build()
    rows = []
    for S in STAGES:
        mesh = pl.stage_mesh(S)
        for M in MICROBATCHES:
            size = M * MICRO
            x, y = data(input_shape, CALLS * size)
            problem = grads.Problem.from_chain(
                fn, loss, loss_name=loss_name, input_shape=input_shape, num_outputs=10, train_targets=y,
                key=jax.random.key(1),
            )  # fmt: skip
            tx = optax.adam(1e-3)
            common = dict(params=params, num_microbatches=M, microbatch_size=MICRO)
            f3 = pl.feedback_pipeline(problem, grads.FeedbackOptions(), tx, mesh, **common)
            gp = pl.gpipe(problem, tx, mesh, **common)
            batches = [
                {"x": x[k * size : (k + 1) * size], "y": y[k * size : (k + 1) * size],
                 "idx": np.arange(k * size, (k + 1) * size, dtype=np.int32)}
                for k in range(CALLS)
            ]  # fmt: skip
            f3_batches = [f3.place_batch(b) for b in batches]
            gp_batch = gp.place_batch(batches[0])
            f3_state, gp_state = f3.init(params), gp.init(params)
            run, drain = f3.program(drain=False), f3.program(drain=True)
            temp = {
                "f3": temp_bytes(run, f3_state, f3_batches[0]),
                "gpipe": temp_bytes(gp.program(), gp_state, gp_batch),
            }
            sent = {
                "f3": permute_bytes(run, f3_state, f3_batches[0], mesh),
                "gpipe": permute_bytes(gp.program(), gp_state, gp_batch, mesh),
            }
            masks = []  # one epoch of F3: fill once, drain once
            for k, batch in enumerate(f3_batches):
                f3_state, out = (drain if k == CALLS - 1 else run)(f3_state, batch)
                masks.append(out.busy)
            f3_idle, f3_total = pl.idle_ticks(masks)
            gp_state, gp_out = gp.program()(gp_state, gp_batch)
            gp_idle, gp_total = pl.idle_ticks([gp_out.busy, gp_out.backward_busy])
            times = {"f3": [], "gpipe": []}
            jax.block_until_ready(f3_state)
            for _ in range(REPEATS):  # interleaved; F3's pipeline stays full between calls
                start = time.perf_counter()
                f3_state, out = run(f3_state, f3_batches[0])
                jax.block_until_ready(out)
                times["f3"].append(time.perf_counter() - start)
                start = time.perf_counter()
                gp_state, out = gp.program()(gp_state, gp_batch)
                jax.block_until_ready(out)
                times["gpipe"].append(time.perf_counter() - start)
            row = {
                "model": name,
                "stages": S,
                "microbatches": M,
                "split": [list(b) for b in f3.split.bounds],
                "f3_idle_fraction": f3_idle / f3_total,
                "f3_idle_fraction_formula": pl.feedback_idle_fraction(S, M, CALLS),
                "f3_idle_fraction_mnist_epoch": pl.feedback_idle_fraction(S, M, MNIST // size),
                "gpipe_idle_fraction": gp_idle / gp_total,
                "gpipe_idle_fraction_formula": pl.gpipe_idle_fraction(S, M),
                "f3_temp_bytes": temp["f3"],
                "gpipe_temp_bytes": temp["gpipe"],
                "f3_bytes_per_microbatch": sent["f3"],
                "gpipe_bytes_per_microbatch": sent["gpipe"],
                "f3_call_ms": 1e3 * statistics.median(times["f3"]),
                "gpipe_step_ms": 1e3 * statistics.median(times["gpipe"]),
            }
            rows.append(row)
            print(
                f"{name} S={S} M={M:2d} split {row['split']}: idle F3 {row['f3_idle_fraction']:.3f} per epoch of "
                f"{CALLS} calls ({pl.feedback_idle_fraction(S, M, MNIST // size):.5f} for MNIST), GPipe "
                f"{row['gpipe_idle_fraction']:.3f} every step | temp/stage F3 {temp['f3'] / 1e6:.2f} MB, GPipe "
                f"{temp['gpipe'] / 1e6:.2f} MB | bytes/microbatch F3 {sum(sent['f3'].values())} "
                f"({sent['f3']['forward']} fwd + {sent['f3']['backward']} back), GPipe {sum(sent['gpipe'].values())} | "
                f"time of M microbatches F3 {row['f3_call_ms']:.0f} ms, GPipe {row['gpipe_step_ms']:.0f} ms "
                "(simulated devices: not a speed-up measurement)"
            )
    for S in STAGES:
        low, high = (next(r for r in rows if r["stages"] == S and r["microbatches"] == m) for m in (4, 16))
        for algo in ("f3", "gpipe"):
            growth = (high[f"{algo}_temp_bytes"] - low[f"{algo}_temp_bytes"]) / 12
            low[f"{algo}_temp_growth_per_microbatch"] = high[f"{algo}_temp_growth_per_microbatch"] = growth
        print(
            f"{name} S={S}: temp growth per added microbatch F3 {low['f3_temp_growth_per_microbatch']:.0f} B, GPipe "
            f"{low['gpipe_temp_growth_per_microbatch']:.0f} B"
        )
    return rows


def accuracy() -> dict[str, float]:
    common = {"parallel": "pipeline", "mesh": "4", "microbatches": 4, "hidden": (128, 128, 128), "batch_size": 64}
    common |= {"activation": "tanh", "loss": "sigmoid_bce"}  # the F3 paper's setup
    common |= {"epochs": EPOCHS, "quiet": True, "seed": 0}
    out = {}
    for estimator in ("f3", "drtp", "backprop"):
        with tempfile.TemporaryDirectory() as workdir:
            final = train_and_evaluate(RunConfig.from_flags(common, estimator=estimator), workdir)
        out[estimator] = final["test_accuracy"]
        print(f"digits, {EPOCHS} epochs, 4 stages: {estimator:8s} test accuracy {100 * final['test_accuracy']:.2f}%")
    return out


def main() -> None:
    started = time.perf_counter()
    figures = {"mlp": measure("mlp", mlp_problem), "vit": measure("vit", vit_problem)}
    figures["digits_accuracy"] = accuracy()
    figures["seconds"] = time.perf_counter() - started
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
