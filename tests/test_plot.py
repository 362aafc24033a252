"""``jaxalgo plot``: the figure of real and synthetic runs (size, not blank, one colour per run, the legend), its
errors in one line with exit status 2; and the closing table of ``jaxalgo train`` (communication and
trainable-parameter rows where the metrics have them)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxalgo.cli import main
from jaxalgo.config import RunConfig
from jaxalgo.plot import RunCurves, load_run, plot_runs, run_labels
from jaxalgo.train import format_summary, train_and_evaluate

TINY = dict(hidden=(8,), epochs=2, batch_size=128, seed=4)  # 11 steps per epoch on digits
C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours of the default cycle (tab10)


def write_lines(path, lines) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return os.fspath(path)


def synthetic_lines(accuracies, *, spe=10) -> list[dict]:
    """Lines in the format train.py writes (an epoch line per epoch, a resume event after the first, the final
    line), for a run that reaches ``accuracies``."""
    lines = []
    for epoch, accuracy in enumerate(accuracies, start=1):
        loss = 2.5 * (1 - accuracy) + 0.05
        line = {"step": spe * epoch, "epoch": epoch, "train_loss": loss, "test_loss": 1.1 * loss}
        lines.append({**line, "test_accuracy": accuracy, "seconds": 1.5 * epoch})
        if epoch == 1 and len(accuracies) > 1:
            lines.append({"step": spe, "event": "resume", "changed": {"epochs": [1, len(accuracies)]}})
    last = lines[-1]
    final = {"final": True, "step": last["step"], "epoch": last["epoch"], "test_loss": last["test_loss"]}
    return [*lines, {**final, "test_accuracy": last["test_accuracy"], "steps": last["step"], "seconds": 99.0}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        final = train_and_evaluate(RunConfig.from_flags(**TINY), root / "real")
    synthetic = write_lines(root / "synthetic-frog", synthetic_lines([0.3, 0.6, 0.8, 0.85]))
    return {
        "root": root,
        "real": os.fspath(root / "real"),
        "synthetic": synthetic,
        "table": table.getvalue(),
        "final": final,
    }


def colour_pixels(image: np.ndarray, rgb, tolerance=12) -> int:
    return int(np.sum(np.all(np.abs(image[..., :3].astype(int) - np.array(rgb)) <= tolerance, axis=-1)))


@pytest.mark.parametrize(("x", "size"), [("both", (800, 560)), ("steps", (400, 560)), ("seconds", (400, 560))])
def test_png_has_the_figure_size_and_one_colour_per_run(runs, tmp_path, x, size):
    out = plot_runs([runs["real"], runs["synthetic"]], tmp_path / "curves.png", x=x, dpi=80)
    image = Image.open(out)
    assert image.format == "PNG" and image.size == size  # (columns * 5, 2 * 3.5) inches at 80 dpi
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20  # not blank
    assert colour_pixels(pixels, C0) > 40 and colour_pixels(pixels, C1) > 40  # both runs' curves are drawn
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_svg_holds_the_legend_and_the_axes_as_text(runs, tmp_path):
    out = tmp_path / "curves.svg"
    assert main(["plot", runs["real"], os.path.join(runs["synthetic"], "metrics.jsonl"), "-o", str(out)]) == 0
    svg = out.read_text()
    assert svg.startswith("<?xml") and "</svg>" in svg
    for text in ("backprop · none", "synthetic-frog", "test accuracy (%)", "seconds of training"):
        assert text in svg, text


def test_load_run_reads_what_train_writes(runs):
    real = load_run(runs["real"])
    final = runs["final"]
    assert [line["epoch"] for line in real.epochs] == [1, 2] and real.metric == "test_accuracy"
    assert real.epochs[-1]["test_accuracy"] == final["test_accuracy"] and real.epochs[-1]["step"] == final["steps"]
    assert real.config["estimator"] == "backprop" and real.config["hidden"] == [8]
    synthetic = load_run(runs["synthetic"])
    assert synthetic.resumes == (10,) and synthetic.config is None and len(synthetic.epochs) == 4
    assert synthetic.series("test_accuracy", "seconds") == ([1.5, 3.0, 4.5, 6.0], [30.0, 60.0, 80.0, 85.0])


def _curves(name, config):
    return RunCurves(
        name=name, path=f"/runs/{name}/metrics.jsonl", metric="test_mae", epochs=(), resumes=(), config=config
    )


def test_labels_name_estimator_and_strategy_then_what_differs():
    frog = {"estimator": "frog", "parallel": "none", "lowrank": "none", "lr": 0.01, "seed": 0, "quiet": True}
    runs = [
        _curves("a", frog),
        _curves("b", {**frog, "lr": 0.1, "quiet": False}),  # quiet does not change the curves: not a difference
        _curves("c", {**frog, "estimator": "backprop", "parallel": "ddp"}),
        _curves("d", {**frog, "lowrank": "oialr", "seed": 1}),
        _curves("e", None),
    ]
    assert run_labels(runs) == [
        "frog · none, lr=0.01",
        "frog · none, lr=0.1",
        "backprop · ddp",
        "frog · none · oialr",
        "e",
    ]
    twins = [_curves("x", frog), _curves("y", frog), _curves("y", frog)]
    assert run_labels(twins) == [
        "frog · none (x)",
        "frog · none (/runs/y/metrics.jsonl)",
        "frog · none (/runs/y/metrics.jsonl)",
    ]


def _corrupt(root):
    path = write_lines(root / "corrupt", synthetic_lines([0.5, 0.6]))
    with open(os.path.join(path, "metrics.jsonl"), "a") as f:
        f.write('{"step": 30, "epoch": 3, "train_l\n')
    return path, "line 5 is not valid JSON"  # after 4 good lines


def _no_loss(root):
    lines = synthetic_lines([0.5, 0.6])
    del lines[2]["test_loss"]  # the second epoch line: line 3 of the file
    return write_lines(root / "no-loss", lines), "line 3 is an epoch line without a number 'test_loss'"


def _no_epoch(root):
    return write_lines(root / "empty", []), "has no epoch line"


@pytest.mark.parametrize(
    ("make", "output"),
    [
        (lambda root: (os.fspath(root / "missing"), "no metrics file"), "out.png"),
        (_corrupt, "out.png"),
        (_no_loss, "out.svg"),
        (_no_epoch, "out.png"),
        (
            lambda root: (write_lines(root / "ok", synthetic_lines([0.5])), "extension '.pdf'; allowed: .png, .svg"),
            "out.pdf",
        ),
    ],
)
def test_errors_are_one_line_naming_the_file_and_line(tmp_path, capsys, make, output):
    run, message = make(tmp_path)
    assert main(["plot", run, "-o", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    if "extension" not in message:
        assert run in err  # names the file
    assert not os.path.exists(tmp_path / output)


def test_runs_of_two_tasks_and_a_missing_matplotlib_are_refused(tmp_path, monkeypatch, capsys):
    classification = write_lines(tmp_path / "c", synthetic_lines([0.5]))
    regression = [
        {k.replace("test_accuracy", "test_mae"): v for k, v in line.items()} for line in synthetic_lines([0.5])
    ]
    assert main(["plot", classification, write_lines(tmp_path / "r", regression), "-o", str(tmp_path / "x.png")]) == 2
    assert "mix classification (test_accuracy) and regression (test_mae)" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    assert main(["plot", classification, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install jaxalgo[plot]" in err


# -- the closing table of jaxalgo train ---------------------------------------------------------------------------


def test_closing_table_of_a_single_device_run_has_no_communication_or_parameter_rows(runs):
    table = runs["table"]
    assert "test accuracy" in table and f"{100 * runs['final']['test_accuracy']:.2f}%" in table
    assert "sent per" not in table and "trainable" not in table and "compression" not in table


def test_closing_table_shows_bytes_per_step_and_per_epoch():
    config = RunConfig.from_flags(epochs=4)
    final = {"test_accuracy": 0.9, "test_loss": 0.3, "steps": 40, "epoch": 4, "seconds": 1.0}
    final |= {"comm_bytes_per_step": 250000.0, "comm_cross_node_bytes_per_step": 50000.0}
    table = format_summary(config, final)
    # 10 steps per epoch: 2.5 MB per epoch, 0.5 MB of it across nodes
    assert "sent per device  250.0 kB per step (50.0 kB across nodes)" in table
    assert "sent per epoch   2.5 MB (500.0 kB across nodes)" in table


def test_closing_table_shows_the_trainable_parameters_and_the_ab_compression():
    config = RunConfig.from_flags(epochs=1)
    final = {"test_mae": 0.5, "test_loss": 0.3, "steps": 10, "seconds": 1.0}
    oialr = format_summary(config, {**final, "trainable_fraction_model": 0.25, "trainable_fraction": 0.125})
    assert "trainable params  25.0% of the model (12.5% of the low-rank layers' dense size)" in oialr
    last_epoch = {"step": 10, "epoch": 1, "ab_compression_ratio": 3.0, "comm_bytes_per_step": 1000.0}
    ab = format_summary(config, {**final, "comm_bytes_per_step": 2000.0}, last_epoch=last_epoch)
    assert re.search(r"\nAB compression +3\.00x fewer parameters than dense\n", ab)
    assert "2.0 kB per step" in ab  # the final line's run-wide mean is preferred to the last epoch's


def test_closing_table_of_an_oialr_run_shows_its_trainable_fraction(tmp_path):
    config = RunConfig.from_flags(**{**TINY, "epochs": 1}, lowrank="oialr", lowrank_delay=0, lowrank_cutoff=0.5)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        final = train_and_evaluate(config, tmp_path)
    assert 0 < final["trainable_fraction_model"] < 1
    assert f"trainable params  {100 * final['trainable_fraction_model']:.1f}% of the model" in table.getvalue()
