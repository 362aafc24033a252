"""The curves of several runs side by side (``jaxalgo plot RUN [RUN ...] -o FILE``).

A run directory of ``jaxalgo train`` holds ``metrics.jsonl``: one line per epoch (``step``, ``epoch``,
``train_loss``, ``test_loss``, ``test_accuracy`` for classification or ``test_mae`` for regression, ``seconds``
since the start, and the strategy's or the low-rank method's figures), event lines (``{"step", "event":
"resume", "changed"}``, OIALR's conversions) and, last, the final evaluation (``"final": true``). The run's
configuration is in the record of its newest checkpoint (``checkpoints/<step>/record``), read from the file.

:func:`plot_runs` draws, for every run, the test metric (accuracy in %, or MAE) and the loss (training loss solid,
test loss dashed; a logarithmic axis when they span a decade or more) of its epoch lines against the step and/or
against the seconds of training, one colour per run; a resume is marked by a dotted vertical line at its step. The
legend names each run by its estimator and strategy (and low-rank method); runs that share those are told apart by
the flags in which their configurations differ (``lr=0.01``), or else by their directory names.

matplotlib (``pip install jaxalgo[plot]``) is imported only when a figure is drawn; the figure is a
``matplotlib.figure.Figure`` saved by its own canvas (Agg for PNG, the SVG backend for SVG), so pyplot's
global backend and state are left alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from jaxalgo.checkpoint import newest_record
from jaxalgo.tensorboard_log import is_epoch_line, require
from jaxalgo.workdir import read_metrics

METRICS_FILE = "metrics.jsonl"
FORMATS = (".png", ".svg")
Axis = Literal["steps", "seconds", "both"]
"""The horizontal axis of :func:`plot_runs`: steps, seconds, or both side by side."""
AXES: tuple[Axis, ...] = typing.get_args(Axis)
PANEL_SIZE = (5.0, 3.5)  # inches of one panel; the figure is (columns * width, 2 * height)
DPI = 100
# flags that do not change a run's curves: never used to tell runs apart in the legend
_NOT_DIFFERENCES = frozenset({"quiet", "checkpoint_every", "keep_checkpoints", "log_every", "data_dir", "tensorboard"})
_METRICS = {"test_accuracy": "test accuracy (%)", "test_mae": "test MAE"}


@dataclasses.dataclass(frozen=True)
class RunCurves:
    """One run's epoch lines and what its legend entry is made of.

    Attributes:
      name: the run directory's name.
      path: the metrics file.
      metric: ``"test_accuracy"`` or ``"test_mae"``.
      epochs: the epoch lines, in file order.
      resumes: the steps at which the run was resumed.
      config: the flag view of the run's configuration (newest checkpoint), ``None`` without a readable checkpoint.
    """

    name: str
    path: str
    metric: str
    epochs: tuple[dict[str, Any], ...]
    resumes: tuple[int, ...]
    config: dict[str, Any] | None

    def series(self, key: str, x: str) -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of ``key`` against ``x`` (``"step"`` or ``"seconds"``); accuracy in %."""
        scale = 100.0 if key == "test_accuracy" else 1.0
        return [float(line[x]) for line in self.epochs], [scale * float(line[key]) for line in self.epochs]


def _metrics_path(run: str | os.PathLike) -> str:
    path = os.fspath(run)
    return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def load_run(run: str | os.PathLike) -> RunCurves:
    """The curves of one run: ``run`` is a run directory or its ``metrics.jsonl``.

    Raises:
      FileNotFoundError: there is no metrics file.
      ValueError: naming the file and the line: a line that is not a JSON object, an epoch line without a field the
        plot needs; or a file with no epoch line.
    """
    path = _metrics_path(run)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"run: no metrics file {path} (give a run directory of jaxalgo train or its {METRICS_FILE})"
        )
    records = read_metrics(path)
    with open(path) as f:
        numbers = [number for number, text in enumerate(f, start=1) if text.strip()]
    epochs = [(number, r) for number, r in zip(numbers, records, strict=True) if is_epoch_line(r)]
    if not epochs:
        raise ValueError(f"metrics: {path} has no epoch line (a run writes one at the end of each epoch)")
    metric = "test_accuracy" if "test_accuracy" in epochs[0][1] else "test_mae"
    for number, line in epochs:
        for key in ("step", "seconds", "train_loss", "test_loss", metric):
            if not isinstance(line.get(key), int | float) or isinstance(line.get(key), bool):
                raise ValueError(f"metrics: {path} line {number} is an epoch line without a number {key!r}")
    resumes = tuple(int(r["step"]) for r in records if r.get("event") == "resume" and "step" in r)
    directory = os.path.dirname(os.path.abspath(path))
    record = newest_record(os.path.join(directory, "checkpoints"))
    config = record.get("config") if record else None
    return RunCurves(
        name=os.path.basename(directory),
        path=path,
        metric=metric,
        epochs=tuple(line for _, line in epochs),
        resumes=resumes,
        config=dict(config) if isinstance(config, Mapping) else None,
    )


def _base_label(run: RunCurves) -> str:
    if run.config is None:
        return run.name
    parts = [str(run.config.get("estimator", "?")), str(run.config.get("parallel", "?"))]
    if run.config.get("lowrank", "none") != "none":
        parts.append(str(run.config["lowrank"]))
    return " · ".join(parts)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(runs: Sequence[RunCurves]) -> list[str]:
    """The legend entries: estimator · strategy (· low-rank method); among runs that share those, the flags in
    which their configurations differ (``frog · none, lr=0.01``); runs still alike get their directory's name."""
    bases = [_base_label(run) for run in runs]
    labels = list(bases)
    for base in set(bases):
        group = [i for i, b in enumerate(bases) if b == base]
        configs = [c for c in (runs[i].config for i in group) if c is not None]
        if len(group) < 2 or len(configs) < len(group):
            continue
        keys = sorted({k for c in configs for k in c} - _NOT_DIFFERENCES)
        differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
        for i, config in zip(group, configs, strict=True):
            if differ:
                labels[i] = f"{base}, " + ", ".join(f"{k}={_show(config.get(k))}" for k in differ)
    alike = [i for i, label in enumerate(labels) if labels.count(label) > 1]
    names = [runs[i].name for i in alike]
    for i in alike:
        where = runs[i].name if names.count(runs[i].name) == 1 else runs[i].path
        labels[i] = where if labels[i] == runs[i].name else f"{labels[i]} ({where})"
    return labels


def _check_arguments(runs: Sequence[Any], output: str, x: Axis) -> None:
    if isinstance(runs, str | os.PathLike) or not runs:
        raise ValueError(f"runs: give one or more run directories or metrics files, got {runs!r}")
    suffix = os.path.splitext(output)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"output: {output!r} has the extension {suffix or '(none)'!r}; allowed: .png, .svg")
    if x not in AXES:
        raise ValueError(f"x: {x!r} is not an axis; allowed: {', '.join(AXES)}")


def figure_size(x: Axis) -> tuple[float, float]:
    """The figure's size in inches for ``x`` (``"both"``: two columns of panels, else one)."""
    columns = 2 if x == "both" else 1
    return (columns * PANEL_SIZE[0], 2 * PANEL_SIZE[1])


def plot_runs(
    runs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    x: Axis = "both",
    dpi: int = DPI,
) -> str:
    """Draws the curves of ``runs`` into ``output`` (PNG or SVG, by the extension); returns its path.

    Args:
      runs: run directories of ``jaxalgo train`` (or their ``metrics.jsonl``).
      output: the image file; ``.png`` (``figure_size(x)`` inches at ``dpi``) or ``.svg`` (text kept as text).
      x: the horizontal axis: ``"steps"``, ``"seconds"`` of training, or ``"both"`` side by side.
      dpi: pixels per inch of a PNG.

    Raises:
      ValueError: a bad argument, a corrupt metrics file (naming file and line), runs of different tasks.
      FileNotFoundError: a run without metrics file.
      MissingExtraError: matplotlib is not installed (``pip install jaxalgo[plot]``).
    """
    output = os.fspath(output)
    _check_arguments(runs, output, x)
    if not isinstance(dpi, int) or isinstance(dpi, bool) or not 10 <= dpi <= 1000:
        raise ValueError(f"dpi: must be an integer in [10, 1000], got {dpi!r}")
    curves = [load_run(run) for run in runs]
    metrics = {run.metric for run in curves}
    if len(metrics) > 1:
        raise ValueError(
            "runs: mix classification (test_accuracy) and regression (test_mae) runs: "
            + ", ".join(f"{run.path}: {run.metric}" for run in curves)
        )
    matplotlib = require("matplotlib", "plot")
    figure = _draw(curves, run_labels(curves), x, dpi)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "jaxalgo"}):
        metadata = {"Date": None} if output.lower().endswith(".svg") else None
        figure.savefig(output, dpi=dpi, metadata=metadata)
    return output


def _draw(curves: Sequence[RunCurves], labels: Sequence[str], x: Axis, dpi: int) -> Any:
    """The figure: a row for the metric, a row for the losses; a column per horizontal axis."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    columns = {"steps": [("step", "step")], "seconds": [("seconds", "seconds of training")]}
    columns["both"] = columns["steps"] + columns["seconds"]
    figure = Figure(figsize=figure_size(x), dpi=dpi, layout="constrained")
    axes = figure.subplots(2, len(columns[x]), squeeze=False)
    metric = curves[0].metric
    for column, (key, title) in enumerate(columns[x]):
        top, bottom = axes[0][column], axes[1][column]
        for index, (run, label) in enumerate(zip(curves, labels, strict=True)):
            colour = f"C{index % 10}"
            top.plot(*run.series(metric, key), color=colour, marker="o", markersize=3, label=label)
            bottom.plot(*run.series("train_loss", key), color=colour, marker="o", markersize=3)
            bottom.plot(*run.series("test_loss", key), color=colour, linestyle="--")
            if key == "step":
                for step in run.resumes:
                    for axis in (top, bottom):
                        axis.axvline(step, color=colour, linestyle=":", linewidth=1)
        top.set_ylabel(_METRICS[metric])
        bottom.set_ylabel("loss")
        bottom.set_xlabel(title)
        losses = [v for run in curves for name in ("train_loss", "test_loss") for v in run.series(name, key)[1]]
        if min(losses) > 0 and max(losses) > 10 * min(losses):  # a range of a decade or more: logarithmic
            bottom.set_yscale("log")
            bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.1, not 10^-1
            bottom.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        for axis in (top, bottom):
            axis.grid(True, alpha=0.3)
    styles = [Line2D([], [], color="black", label="train"), Line2D([], [], color="black", ls="--", label="test")]
    if any(run.resumes for run in curves):
        styles.append(Line2D([], [], color="black", ls=":", lw=1, label="resumed"))
    axes[1][0].legend(handles=styles, loc="best", fontsize="small")
    handles, texts = axes[0][0].get_legend_handles_labels()
    per_row = 3 if len(columns[x]) == 2 else 1
    figure.legend(handles, texts, loc="outside lower center", ncols=min(per_row, len(texts)), fontsize="small")
    title = _title(curves)
    if title:
        figure.suptitle(title)
    return figure


def _minor_label(value: float, position: Any) -> str:
    """The label of a minor tick of a logarithmic axis: 2 and 5 times a power of ten, the others unlabelled."""
    del position
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa) in (2, 5) else ""


def _title(curves: Sequence[RunCurves]) -> str:
    configs = [run.config for run in curves if run.config is not None]
    if len(configs) < len(curves):
        return ""  # a run without configuration: nothing every run is known to share
    models = {str(c.get("model")) for c in configs}
    datasets = {str(c.get("dataset")) for c in configs}
    return f"{' / '.join(sorted(models))} on {' / '.join(sorted(datasets))}"


__all__ = ["AXES", "DPI", "FORMATS", "PANEL_SIZE", "RunCurves", "figure_size", "load_run", "plot_runs", "run_labels"]
