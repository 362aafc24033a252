"""F3 fidelity: BP, DRTP, DFA and F3 (delayed_error) in the F3 reference implementation's own setup, 3 seeds.

- digits: tanh MLP 64-256-256-10, sigmoid + BCE, Adam lr 1e-3, batch 50, 30 epochs, 20% test split; test accuracy.
- diabetes: the same net with an identity output + MSE on the standardised target, 100 epochs; test MAE in the
  original units.
- a setting where the methods separate (SEPARATING below): a deep, narrow tanh MLP on digits, where the gap closed
  ``(F3 - DRTP) / (BP - DRTP)`` is reported from the seed means.

Hidden blocks' updates sum over the batch (the reference's choice); feedback matrices Kaiming uniform.

    python benchmarks/f3_fidelity.py            # everything (a few minutes on 2 cores)
    python benchmarks/f3_fidelity.py digits     # one part: digits, diabetes or separating
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax

from jaxalgo import data
from jaxalgo.config import TrainConfig
from jaxalgo.train import make_evaluate, make_train_step, setup

SEEDS = (0, 1, 2)
METHODS = {  # name -> (estimator, f3 variant)
    "BP": ("backprop", "delayed_error"),
    "DRTP": ("drtp", "delayed_error"),
    "DFA": ("dfa", "delayed_error"),
    "F3": ("f3", "delayed_error"),
}
SETTINGS = {
    "digits": dict(
        dataset="digits", hidden=(256, 256), loss="sigmoid_bce", lr=1e-3, batch_size=50, epochs=30, metric="accuracy"
    ),
    "diabetes": dict(
        dataset="diabetes", hidden=(256, 256), loss="mse", lr=1e-3, batch_size=50, epochs=100, metric="mae"
    ),
    "separating": dict(
        dataset="digits", hidden=(32,) * 8, loss="sigmoid_bce", lr=1e-3, batch_size=50, epochs=30, metric="accuracy"
    ),
}


def run(setting: dict, estimator: str, variant: str, seed: int) -> float:
    """Trains one configuration and returns its final test accuracy (percent) or test MAE (original units)."""
    options = {k: v for k, v in setting.items() if k != "metric"}
    config = TrainConfig(
        model="mlp",
        activation="tanh",
        optimizer="adam",
        estimator=estimator,
        f3_variant=variant,
        feedback_reduction="sum",
        seed=seed,
        quiet=True,
        **options,
    )
    experiment = setup(config)
    step = make_train_step(experiment.estimator, experiment.optimizer)
    evaluate = make_evaluate(experiment.chain, experiment.output_loss, experiment.dataset)
    state = experiment.init_state()
    from jaxalgo.train import _seeds  # the run's data-order seed, as train_and_evaluate draws it

    _, data_seed, _ = _seeds(seed)
    for epoch in range(config.epochs):
        for batch in data.iterate_batches(experiment.dataset, config.batch_size, seed=data_seed, epoch=epoch):
            state, _ = step(state, batch, experiment.run_key)
    result = evaluate(state.params)
    return 100.0 * result["test_accuracy"] if "test_accuracy" in result else result["test_mae"]


def measure(name: str) -> dict:
    setting = SETTINGS[name]
    figures = {}
    for method, (estimator, variant) in METHODS.items():
        values = [run(setting, estimator, variant, seed) for seed in SEEDS]
        figures[method] = {"mean": statistics.mean(values), "std": statistics.stdev(values), "runs": values}
        unit = "% test accuracy" if setting["metric"] == "accuracy" else " test MAE"
        print(f"{name:>10} {method:>5}: {figures[method]['mean']:.2f} +- {figures[method]['std']:.2f}{unit}")
    bp, drtp, f3 = (figures[m]["mean"] for m in ("BP", "DRTP", "F3"))
    figures["gap_closed"] = (f3 - drtp) / (bp - drtp) if bp != drtp else None
    print(f"{name:>10} gap closed (F3 - DRTP) / (BP - DRTP): {figures['gap_closed']}", flush=True)
    return figures


def main(parts: list[str]) -> None:
    unknown = sorted(set(parts) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"parts: unknown {unknown}; allowed: {', '.join(SETTINGS)}")
    start = time.perf_counter()
    results = {
        "benchmark": "f3_fidelity",
        "seeds": list(SEEDS),
        "devices": jax.device_count(),
        "settings": {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in SETTINGS[name].items()} for name in parts
        },
    }
    for name in parts:
        results[name] = measure(name)
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
