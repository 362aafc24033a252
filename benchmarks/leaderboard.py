"""The leaderboard: every estimator of the catalogue on digits, MNIST-1D and diabetes, each at its swept rate.

For each data set and estimator (``jaxalgo.grads.ESTIMATORS``, their default options: 16 tangents for the forward
estimators, the delayed error for F3) the learning rate of Adam is chosen by ``jaxalgo.sweep.sweep`` over
log-spaced values on a held-out tenth of the *training* split (one vmapped program over the values, seed 0); the
chosen rate is then trained with ``jaxalgo.train.train_and_evaluate`` on the whole training split for each seed and
evaluated on the test split. Every run is the command line's MLP 256-256 (ReLU, batch 64, the default per-channel
standardisation), so the cells differ by the estimator alone.

Adam for every estimator: it divides by the root of the second moment, so it hides most of the length difference
between the estimates (docs/guides/learning_rates.md: the mean is about sqrt(n/k) times longer than the gradient,
the projection about sqrt(k/n) times shorter; with Adam rates near backprop's work for all of them). The ranges
still differ: the forward-gradient estimators were best at 1e-2 with Adam on digits in that guide (backprop at
1e-3), so their range is a decade higher.

Printed: mean +- std over the seeds of the test accuracy (%, classification) or test MAE (diabetes, original
units) with the chosen rate; the gap to backprop closed by F3 against DFA and DRTP, ``(m_F3 - m_X) / (m_BP - m_X)``
of the seed means (Zhao et al., arXiv 2304.06745, the F3 paper's figure; the same formula for the MAE, where lower is
better); FROG (orthogonal projection) at k = 1, 4, 16, 64 tangents, each with its own sweep (Fournier et al., ICML
2023, arXiv 2306.06968: more tangents, a better estimate). Then a markdown table, the wall and CPU time, and one
JSON line.

Measured cost (docs/guides/leaderboard.md): the full setting (FULL) 5546 CPU-s, 59 min of wall time in 2 worker
processes (``--jobs``) on 2 cores; ``--quick`` 430 CPU-s.

    python benchmarks/leaderboard.py --quick            # the docs build's setting: a few minutes
    python benchmarks/leaderboard.py                    # the full setting (see FULL): about an hour on 2 cores
    python benchmarks/leaderboard.py --datasets digits,diabetes --out leaderboard.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax

from jaxalgo import grads, sweep
from jaxalgo.config import RunConfig
from jaxalgo.train import NonFiniteLossError, train_and_evaluate

DATASETS = ("digits", "mnist1d", "diabetes")
ESTIMATORS = tuple(grads.ESTIMATORS)
FROG_TANGENTS = (1, 4, 16, 64)
FORWARD = ("fg", "frog", "fg-rank1", "frog-rank1", "fg-activity", "frog-activity", "zo", "zo-frog")
GAP_BASELINES = ("dfa", "drtp")
# Adam learning rates (log-spaced, both ends included): backprop and the feedback methods around backprop's 1e-3,
# the forward-gradient estimators a decade higher (docs/guides/learning_rates.md)
RANGE_BACKPROP = (1e-4, 1e-2)
RANGE_FORWARD = (1e-3, 1e-1)
FLAGS = dict(hidden=(256, 256), optimizer="adam", batch_size=64, quiet=True, checkpoint_every=10**9, keep_checkpoints=1)
# FROG at k = 64 costs four times the k = 16 cell: on digits only, so the full setting fits in an hour on 2 cores
FULL = dict(
    epochs={"digits": 20, "mnist1d": 20, "diabetes": 50},
    seeds=3,
    values=5,
    estimators=ESTIMATORS,
    frog_tangents={"digits": FROG_TANGENTS, "mnist1d": (1, 4, 16), "diabetes": (1, 4, 16)},
)
QUICK = dict(
    epochs={"digits": 3, "mnist1d": 3, "diabetes": 20},
    seeds=1,
    values=3,
    estimators=("backprop", "fg", "frog", "f3", "dfa", "drtp"),
    frog_tangents={d: (1, 4, 16) for d in DATASETS},
)
VAL_FRACTION = 0.1


def lr_values(estimator: str, count: int) -> tuple[float, ...]:
    """``count`` log-spaced Adam learning rates for ``estimator`` (both ends of its range included)."""
    lo, hi = RANGE_FORWARD if estimator in FORWARD else RANGE_BACKPROP
    return sweep.parse_values(f"{lo}:{hi}:{count}")


def _metric(dataset: str) -> str:
    return "test_mae" if dataset == "diabetes" else "test_accuracy"


def run_cell(
    dataset: str, estimator: str, *, epochs: int, seeds: int, values: int, root: str, tangents: int | None = None
) -> dict[str, Any]:
    """One cell: the sweep of the learning rate on validation data (seed 0), then ``seeds`` test runs at it."""
    flags = dict(FLAGS, dataset=dataset, estimator=estimator, epochs=epochs, seed=0)
    if tangents is not None:
        flags["tangents"] = tangents
    config = RunConfig.from_flags(**flags)
    name = estimator if tangents is None else f"{estimator}-k{tangents}"
    start, cpu = time.perf_counter(), time.process_time()
    chosen = sweep.sweep(
        config,
        "lr",
        lr_values(estimator, values),
        os.path.join(root, dataset, name, "sweep"),
        val_fraction=VAL_FRACTION,
        plot=False,
    )
    scores: list[float] = []
    if chosen.best is not None:
        for seed in range(seeds):
            run = config.with_flags(lr=chosen.best, seed=seed)
            try:
                final = train_and_evaluate(run, os.path.join(root, dataset, name, f"seed{seed}"))
            except NonFiniteLossError:
                scores.append(math.nan)
                continue
            value = final[_metric(dataset)]
            scores.append(100.0 * value if dataset != "diabetes" else float(value))
    return {
        "dataset": dataset,
        "estimator": name,
        "lr": chosen.best,
        "sweep_mode": chosen.mode,
        "scores": scores,
        "mean": statistics.fmean(scores) if scores else math.nan,
        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
    }


def gap_closed(cells: dict[str, dict[str, Any]], baseline: str) -> float:
    """``(m_F3 - m_X) / (m_BP - m_X)`` of the seed means; NaN when a cell is missing or diverged."""
    try:
        f3, bp, x = (cells[name]["mean"] for name in ("f3", "backprop", baseline))
    except KeyError:
        return math.nan
    return (f3 - x) / (bp - x) if bp != x else math.nan


def _shown(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    if cell["lr"] is None or not math.isfinite(cell["mean"]):
        return "diverged"
    spread = f" ± {cell['std']:.1f}" if len(cell["scores"]) > 1 else ""
    return f"{cell['mean']:.1f}{spread} ({cell['lr']:.3g})"


def markdown(
    results: dict[str, dict[str, dict[str, Any]]],
    datasets: Sequence[str],
    estimators: Sequence[str],
    tangents: Sequence[int],
) -> str:
    """The three tables: estimators x data sets, F3's gap closed, FROG against the number of tangents."""
    units = {d: ("test MAE" if d == "diabetes" else "test acc. %") for d in datasets}
    head = "| estimator | " + " | ".join(f"{d} ({units[d]})" for d in datasets) + " |"
    rule = "| --- |" + " --- |" * len(datasets)
    lines = [head, rule]
    for est in estimators:
        lines.append(f"| {est} | " + " | ".join(_shown(results[d].get(est)) for d in datasets) + " |")
    lines += ["", "| F3's gap to backprop closed | " + " | ".join(datasets) + " |", rule]
    for base in GAP_BASELINES:
        figures = [gap_closed(results[d], base) for d in datasets]
        lines.append(
            f"| vs {base} | " + " | ".join("-" if math.isnan(g) else f"{100 * g:.0f}%" for g in figures) + " |"
        )
    if tangents:
        lines += ["", "| FROG tangents | " + " | ".join(f"{d} ({units[d]})" for d in datasets) + " |", rule]
        for k in tangents:
            lines.append(f"| k = {k} | " + " | ".join(_shown(results[d].get(f"frog-k{k}")) for d in datasets) + " |")
    return "\n".join(lines)


def _names(text: str, allowed: Sequence[str], argument: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise SystemExit(f"{argument}: unknown or empty {unknown or text!r}; allowed: {', '.join(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced setting of the docs build (QUICK)")
    parser.add_argument("--datasets", help=f"comma list of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--estimators", help="comma list of the catalogue's names (default: all; --quick: a subset)")
    parser.add_argument("--seeds", type=int, help="test runs per cell (default 3; --quick 1)")
    parser.add_argument("--epochs", type=int, help="epochs for every data set (default per data set)")
    parser.add_argument("--values", type=int, help="learning rates per sweep (default 5; --quick 3)")
    parser.add_argument(
        "--tangents", help="FROG's k list for every data set (default 1,4,16,64 on digits, else 1,4,16; 'none' to skip)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one cell each at a time (default 2)")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    args.datasets = _names(args.datasets, DATASETS, "--datasets") if args.datasets else DATASETS
    args.estimators = _names(args.estimators, ESTIMATORS, "--estimators") if args.estimators else setting["estimators"]
    args.seeds = setting["seeds"] if args.seeds is None else args.seeds
    args.values = setting["values"] if args.values is None else args.values
    args.epoch_of = {d: args.epochs or setting["epochs"][d] for d in args.datasets}
    if args.tangents is None:
        args.tangent_of = {d: tuple(setting["frog_tangents"][d]) for d in args.datasets}
    elif args.tangents.strip() == "none":
        args.tangent_of = dict.fromkeys(args.datasets, ())
    else:
        try:
            args.tangent_of = dict.fromkeys(args.datasets, tuple(int(k) for k in args.tangents.split(",")))
        except ValueError:
            raise SystemExit(
                f"--tangents: expected a comma list of integers or 'none', got {args.tangents!r}"
            ) from None
    checks = (
        ("--seeds", args.seeds, 1),
        ("--values", args.values, 2),
        ("--epochs", args.epochs, 1),
        ("--jobs", args.jobs, 1),
    )
    for name, value, low in checks:
        if value is not None and value < low:
            raise SystemExit(f"{name}: must be >= {low}, got {value}")
    if any(k < 1 for ks in args.tangent_of.values() for k in ks):
        raise SystemExit(f"--tangents: every k must be >= 1, got {args.tangents}")
    args.tangents = tuple(sorted({k for ks in args.tangent_of.values() for k in ks}))  # the rows of FROG's table
    return args


def use_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in ``directory``: a program compiled once is loaded when it comes again
    (a cell's seed runs share their programs, the evaluation programs repeat across cells). Results are unchanged:
    the cached executable is the one the compiler made."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _relative_cost(job: tuple[str, str, int | None], epochs: dict[str, int]) -> float:
    """A rough cost of a cell (steps times tangents), to start the longest cells first and keep the workers even."""
    dataset, estimator, k = job
    steps_per_epoch = {"digits": 23, "mnist1d": 63, "diabetes": 6}[dataset] + 4  # + the per-epoch evaluation
    work = (k or 16) if estimator in FORWARD and "rank1" not in estimator and "activity" not in estimator else 2
    return steps_per_epoch * epochs[dataset] * (1 + work)


def _run_job(job: tuple[str, str, int | None], args: argparse.Namespace, root: str) -> dict[str, Any]:
    dataset, estimator, k = job
    return run_cell(
        dataset,
        estimator,
        epochs=args.epoch_of[dataset],
        seeds=args.seeds,
        values=args.values,
        root=root,
        tangents=k,
    )


def _start_worker(root: str) -> None:
    """In a worker process: its own compilation cache (two processes never write one cache at once)."""
    use_compilation_cache(os.path.join(root, f"cache{os.getpid()}"))


def run_jobs(jobs: list[tuple[str, str, int | None]], args: argparse.Namespace, root: str):
    """Yields each job's cell as it finishes: in this process (``--jobs 1``) or in ``args.jobs`` worker processes,
    each a fresh interpreter (spawn) with its own compilation cache, taking the longest cells first. A cell's
    figures do not depend on which worker ran it or when: every run is a pure function of its configuration and
    seed."""
    jobs = sorted(jobs, key=lambda job: -_relative_cost(job, args.epoch_of))
    if args.jobs == 1:
        use_compilation_cache(os.path.join(root, "compilation_cache"))
        for job in jobs:
            yield _run_job(job, args, root)
        return
    context = multiprocessing.get_context("spawn")  # jax must not be forked once it has started its threads
    with concurrent.futures.ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=_start_worker, initargs=(root,)
    ) as pool:
        futures = [pool.submit(_run_job, job, args, root) for job in jobs]  # started in this order
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    start, cpu = time.perf_counter(), time.process_time()
    results: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in args.datasets}
    jobs: list[tuple[str, str, int | None]] = [(d, e, None) for d in args.datasets for e in args.estimators]
    # the catalogue's frog has 16 tangents: its cell is FROG's k = 16 row
    jobs += [
        (d, "frog", k) for d in args.datasets for k in args.tangent_of[d] if not (k == 16 and "frog" in args.estimators)
    ]
    with tempfile.TemporaryDirectory() as root:
        for cell in run_jobs(jobs, args, root):
            results[cell["dataset"]][cell["estimator"]] = cell
            print(
                f"{cell['dataset']:8s} {cell['estimator']:14s} {_shown(cell):24s} {cell['seconds']:6.0f} s wall "
                f"{cell['cpu_seconds']:6.0f} s CPU  sweep {cell['sweep_mode']}",
                flush=True,
            )
    for dataset, cells in results.items():
        if 16 in args.tangent_of[dataset] and "frog" in cells:
            cells["frog-k16"] = dict(cells["frog"], estimator="frog-k16")
        order = [*args.estimators, *(f"frog-k{k}" for k in args.tangent_of[dataset])]  # as the tables, not as finished
        results[dataset] = {name: cells[name] for name in order if name in cells}
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu + _children_cpu()  # the workers have ended: their CPU time is counted
    setting = (
        f"{'--quick' if args.quick else 'full'}: epochs {args.epoch_of}, {args.seeds} seed(s), "
        f"{args.values} learning rates per sweep, Adam, MLP 256-256, batch 64, {args.jobs} worker process(es)"
    )
    table = markdown(results, args.datasets, args.estimators, args.tangents)
    print()
    print(f"Each cell: mean ± std over the seeds at the swept learning rate (in brackets). {setting}.")
    print()
    print(table)
    print()
    print(f"wall time {wall:.0f} s, CPU time {cpu:.0f} s (this process and its workers)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{setting}; wall time {wall:.0f} s, CPU time {cpu:.0f} s.\n\n{table}\n")
    figures = {
        "setting": "quick" if args.quick else "full",
        "epochs": args.epoch_of,
        "seeds": args.seeds,
        "values": args.values,
        "jobs": args.jobs,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "cells": {
            d: {e: {"lr": c["lr"], "mean": round(c["mean"], 3), "std": round(c["std"], 3)} for e, c in cells.items()}
            for d, cells in results.items()
        },
        "gap_closed": {d: {b: round(gap_closed(results[d], b), 4) for b in GAP_BASELINES} for d in args.datasets},
    }
    print(json.dumps(_nan_free(figures), allow_nan=False))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _nan_free(tree: Any) -> Any:
    """``tree`` with every non-finite float as ``None`` (JSON has no NaN)."""
    if isinstance(tree, dict):
        return {k: _nan_free(v) for k, v in tree.items()}
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


if __name__ == "__main__":
    main()
