"""Choice-valued options are ``typing.Literal`` aliases, and the runtime checks allow exactly their values.

For each alias: ``typing.get_args(alias)`` is the tuple of allowed values its check uses (so the two cannot drift
apart), and a value outside it is refused by a public entry point with the check's message (naming the argument,
the value and the allowed values), also when the entry point is called while ``jax.jit`` traces.
"""

from __future__ import annotations

import re
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalgo
from jaxalgo import config, data, grads, losses, lowrank, models, parallel, plot, sweep
from jaxalgo.data import _dataset, _split
from jaxalgo.grads import _activity, _combine, _f3, _feedback, _forward, _rank1, _tangents, _zo
from jaxalgo.lowrank import _layers
from jaxalgo.lowrank._svd import Factors
from jaxalgo.models import _common
from jaxalgo.parallel import _collectives, _comm, _forward_dp
from jaxalgo.parallel._daso import _config as daso_config
from jaxalgo.parallel._daso import _steps as daso_steps
from jaxalgo.parallel.ab import _comm as ab_comm
from jaxalgo.parallel.ab import _config as ab_config
from jaxalgo.parallel.ab import _schedule as ab_schedule
from jaxalgo.parallel.ab import _steps as ab_steps

KEY = jax.random.key(0)


def _loss(params, batch):
    del batch
    return jnp.sum(params**2)


def _allowed(values: tuple[str, ...], *, sort: bool = False) -> str:
    """The ``allowed: ...`` list of the checks' messages, escaped for ``pytest.raises(match=...)``."""
    return re.escape(", ".join(sorted(values) if sort else values))


# name: (alias, the runtime tuple its check uses, the values in order)
ALIASES = {
    "Aggregation": (grads.Aggregation, _combine.AGGREGATIONS, ("sum", "mean", "orthogonal_projection")),
    "Distribution": (_tangents.Distribution, _tangents.DISTRIBUTIONS, ("gaussian", "rademacher")),
    "Tangents": (_forward.Tangents, _forward.TANGENTS, ("gaussian", "rademacher", "rank1")),
    "Batching": (_forward.Batching, _forward.BATCHINGS, ("vmap", "scan", "chunk")),
    "ForwardMode": (_forward.ForwardMode, _forward.MODES, ("forward", "simulated")),
    "ForwardMode (activity)": (_forward.ForwardMode, _activity.MODES, ("forward", "simulated")),
    "Distribution (activity)": (_tangents.Distribution, _activity.TANGENTS, ("gaussian", "rademacher")),
    "Rank1Batching": (_rank1.Rank1Batching, _rank1.BATCHINGS, ("vmap", "scan")),
    "FeedbackInit": (
        _feedback.FeedbackInit,
        grads.FEEDBACK_INITS,
        ("kaiming_uniform", "trinomial", "binomial", "identity"),
    ),
    "F3Variant": (
        _f3.F3Variant,
        grads.F3_VARIANTS,
        (
            "delayed_error",
            "delayed_loss",
            "delayed_error_one_hot",
            "delayed_loss_one_hot",
            "delayed_error_softmax",
            "delayed_loss_softmax",
            "current_error",
            "one_hot_target",
            "zeros",
        ),
    ),
    "FeedbackMode": (_f3.FeedbackMode, _f3.MODES, ("per_block", "surrogate")),
    "HiddenReduction": (_f3.HiddenReduction, _f3.HIDDEN_REDUCTIONS, ("sum", "mean")),
    "OutputActivation": (_f3.OutputActivation, _f3.OUTPUT_ACTIVATION_NAMES, ("sigmoid", "softmax", "identity")),
    "LossName": (losses.LossName, losses.LOSSES, ("cross_entropy", "sigmoid_bce", "mse")),
    "Task": (_dataset.Task, _dataset.TASKS, ("classification", "regression")),
    "Standardize": (_split.Standardize, data.STANDARDIZE, ("channel", "feature", "global")),
    "ActivationName": (
        _common.ActivationName,
        _common.ACTIVATION_NAMES,
        ("relu", "tanh", "gelu", "gelu_tanh", "sigmoid", "silu", "elu", "leaky_relu", "identity"),
    ),
    "DenseKind": (_layers.DenseKind, _layers.DENSE_KINDS, ("linear", "linear_general")),
    "Reduction": (_forward_dp.Reduction, parallel.REDUCTIONS, ("auto", "directional", "gradients")),
    "StateMerge": (_collectives.StateMerge, parallel.STATE_MERGES, ("delta_sum", "mean")),
    "CollectiveKind": (
        _comm.CollectiveKind,
        parallel.KINDS,
        ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"),
    ),
    "Level": (_comm.Level, _comm.LEVELS, ("cross-node", "node-local", "none")),
    "Phase (DASO)": (daso_config.Phase, parallel.PHASES, ("local", "send", "merge", "blocking")),
    "CommDtype": (daso_config.CommDtype, parallel.COMM_DTYPES, ("bfloat16", "float16", "float32")),
    "Program (DASO)": (daso_config.Program, parallel.PROGRAMS, ("window", "step")),
    "SyncMode": (ab_config.SyncMode, parallel.SYNC_MODES, ("full", "with-stale", "only-learned", "only-b")),
    "Phase (AB)": (ab_schedule.Phase, ab_schedule.PHASES, ("ddp", "group")),
    "Program (AB)": (ab_comm.Program, ab_comm.PROGRAMS, ("ddp", "group", "sync")),
    "SweepMode": (sweep.SweepMode, sweep.MODES, ("auto", "vmap", "sequential")),
    "Axis": (plot.Axis, plot.AXES, ("steps", "seconds", "both")),
    "FamilyName": (config.FamilyName, config.FAMILY_NAMES, ("model", "estimator", "optimizer", "parallel", "lowrank")),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_alias_is_the_runtime_tuple(name):
    alias, runtime, values = ALIASES[name]
    assert typing.get_origin(alias) is typing.Literal
    assert typing.get_args(alias) == runtime == values


def test_tables_keyed_by_an_alias_have_exactly_its_values():
    assert tuple(models.ACTIVATIONS) == typing.get_args(_common.ActivationName)
    assert tuple(_f3.OUTPUT_ACTIVATIONS) == typing.get_args(_f3.OutputActivation)
    assert set(_f3.LOSS_ACTIVATIONS) == set(typing.get_args(losses.LossName))
    assert set(_f3.LOSS_ACTIVATIONS.values()) <= set(typing.get_args(_f3.OutputActivation))
    assert tuple(f.name for f in config.FAMILIES) == config.FAMILY_NAMES


def test_options_fields_use_the_aliases():
    # the command line's choices come from these annotations (jaxalgo.options reads the Literal)
    classes = (
        grads.ForwardOptions,
        grads.ZeroOrderOptions,
        grads.ActivityOptions,
        grads.FeedbackOptions,
        grads.FAOptions,
        parallel.DDPOptions,
        parallel.DasoConfig,
        parallel.ABConfig,
        config.RunConfig,
    )
    hints = {cls: typing.get_type_hints(cls) for cls in classes}
    assert hints[grads.ForwardOptions]["aggregation"] == grads.Aggregation
    assert hints[grads.ForwardOptions]["tangent_dist"] == _forward.Tangents
    assert hints[grads.ForwardOptions]["batching"] == _forward.Batching
    assert hints[grads.ForwardOptions]["mode"] == _forward.ForwardMode
    assert hints[grads.ZeroOrderOptions]["tangent_dist"] == _tangents.Distribution
    assert hints[grads.ActivityOptions]["mode"] == _forward.ForwardMode
    assert hints[grads.FeedbackOptions]["init"] == hints[grads.FAOptions]["init"] == _feedback.FeedbackInit
    assert hints[grads.FeedbackOptions]["mode"] == _f3.FeedbackMode
    assert hints[grads.FeedbackOptions]["reduction"] == _f3.HiddenReduction
    assert hints[parallel.DDPOptions]["reduce"] == _forward_dp.Reduction
    assert hints[parallel.DasoConfig]["comm_dtype"] == daso_config.CommDtype
    assert hints[parallel.DasoConfig]["program"] == daso_config.Program
    assert hints[parallel.ABConfig]["sync_mode"] == ab_config.SyncMode
    assert hints[config.RunConfig]["standardize"] == _split.Standardize


# -- a value outside each alias, refused by a public entry point with the check's message -------------------------


def _blocks():
    return [lambda p, h: h]  # a chain of block functions for the feedback estimators (their checks run first)


def _chain():
    return models.split_chain(models.mlp((3,), 2, hidden=(4,), key=KEY))[0]


def _factors():
    return Factors(jnp.ones((2, 1)), jnp.ones((1, 1)), jnp.ones((3, 1)))


def _toy_dataset(task):
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int32)
    return data.Dataset("toy", task, x, y, x, y, 2)


_F3 = dict(input_shape=(2,), train_targets=np.zeros(3, np.int32), key=KEY)
_LOW_RANK = dict(in_shape=(2,), out_shape=(3,))
_SYNC = rf"sync_mode: unknown mode 'none'; allowed: {_allowed(parallel.SYNC_MODES)}$"

REFUSALS = {
    "aggregation": (
        lambda: grads.forward_gradient(_loss, num_tangents=2, aggregation="median"),
        rf"aggregation: unknown aggregation 'median'; allowed: {_allowed(_combine.AGGREGATIONS)}$",
    ),
    "forward tangents": (
        lambda: grads.forward_gradient(_loss, num_tangents=2, tangents="sphere"),
        rf"tangents: unknown tangent distribution 'sphere'; allowed: {_allowed(_forward.TANGENTS)}$",
    ),
    "forward tangent_dist": (
        lambda: grads.ForwardOptions(tangent_dist="sphere"),
        rf"tangent_dist: got 'sphere'; allowed: {_allowed(_forward.TANGENTS)}$",
    ),
    "batching": (
        lambda: grads.forward_gradient(_loss, num_tangents=2, batching="pmap"),
        rf"batching: unknown batching 'pmap'; allowed: {_allowed(_forward.BATCHINGS)}$",
    ),
    "forward mode": (
        lambda: grads.forward_gradient(_loss, num_tangents=2, mode="reverse"),
        rf"mode: unknown mode 'reverse'; allowed: {_allowed(_forward.MODES)}$",
    ),
    "rank-1 batching": (
        lambda: grads.rank1_forward_gradient(_loss, num_tangents=2, batching="chunk"),
        rf"batching: unknown batching 'chunk'; allowed: {_allowed(_rank1.BATCHINGS)}$",
    ),
    "zeroth-order tangents": (
        lambda: grads.zeroth_order(_loss, num_tangents=2, tangents="sphere"),
        rf"tangents: unknown tangent distribution 'sphere'; allowed: {_allowed(_tangents.DISTRIBUTIONS)}$",
    ),
    "zeroth-order tangent_dist": (
        lambda: _zo.ZeroOrderOptions(tangent_dist="rank1"),
        rf"tangent_dist: got 'rank1'; allowed: {_allowed(_tangents.DISTRIBUTIONS)}$",
    ),
    "activity mode": (
        lambda: grads.activity_forward_gradient(_chain(), losses.mse, num_tangents=2, mode="reverse"),
        rf"mode: unknown mode 'reverse'; allowed: {_allowed(_activity.MODES)}$",
    ),
    "activity tangents": (
        lambda: grads.activity_forward_gradient(_chain(), losses.mse, num_tangents=2, tangents="rank1"),
        rf"tangents: unknown tangent distribution 'rank1'; allowed: {_allowed(_activity.TANGENTS)}$",
    ),
    "f3 variant": (
        lambda: grads.f3(_blocks(), losses.sigmoid_bce, variant="delayed", **_F3),
        rf"variant: got 'delayed'; allowed: {_allowed(grads.F3_VARIANTS)}$",
    ),
    "f3 mode": (
        lambda: grads.f3(_blocks(), losses.sigmoid_bce, mode="async", **_F3),
        rf"mode: got 'async'; allowed: {_allowed(_f3.MODES)}$",
    ),
    "f3 hidden_reduction": (
        lambda: grads.f3(_blocks(), losses.sigmoid_bce, hidden_reduction="max", **_F3),
        rf"hidden_reduction: got 'max'; allowed: {_allowed(_f3.HIDDEN_REDUCTIONS)}$",
    ),
    "f3 output_activation": (
        lambda: grads.f3(_blocks(), losses.sigmoid_bce, output_activation="tanh", **_F3),
        rf"output_activation: got 'tanh'; allowed: {_allowed(_f3.OUTPUT_ACTIVATION_NAMES)}$",
    ),
    "feedback_init": (
        lambda: grads.feedback_matrices(KEY, [(2, 3)], init="zeros"),
        rf"feedback_init: unknown initialisation 'zeros'; allowed: {_allowed(grads.FEEDBACK_INITS)}$",
    ),
    "fa init": (
        lambda: grads.FAOptions(init="zeros"),
        rf"init: got 'zeros'; allowed: {_allowed(grads.FEEDBACK_INITS)}$",
    ),
    "loss": (
        lambda: losses.get_loss("hinge"),
        rf"loss: unknown loss 'hinge'; allowed: {_allowed(losses.LOSSES)}$",
    ),
    "task": (
        lambda: _toy_dataset("ranking"),
        rf"task: got 'ranking'; allowed: {_allowed(_dataset.TASKS)}$",
    ),
    "standardize": (
        lambda: data.load_dataset("digits", standardize="minmax"),
        rf"standardize: got 'minmax'; allowed: {_allowed(data.STANDARDIZE)}$",
    ),
    "run standardize": (
        lambda: config.RunConfig(standardize="minmax"),
        rf"standardize: got 'minmax'; allowed: {_allowed(data.STANDARDIZE)}$",
    ),
    "activation": (
        lambda: models.mlp((3,), 2, activation="swish", key=KEY),
        rf"activation: got 'swish'; allowed: {_allowed(_common.ACTIVATION_NAMES, sort=True)}$",
    ),
    "low-rank kind": (
        lambda: lowrank.LowRankDense(_factors(), None, kind="conv", **_LOW_RANK),
        rf"kind: unknown layer kind 'conv'; allowed: {_allowed(_layers.DENSE_KINDS)}$",
    ),
    "reduce": (
        lambda: parallel.data_parallel(grads.backprop(_loss), parallel.make_mesh(), reduce="all"),
        rf"reduce: unknown reduction 'all'; allowed: {_allowed(parallel.REDUCTIONS)}$",
    ),
    "ddp reduce": (
        lambda: parallel.DDPOptions(reduce="all"),
        rf"reduce: got 'all'; allowed: {_allowed(parallel.REDUCTIONS)}$",
    ),
    "state_merge": (
        lambda: parallel.data_parallel(grads.backprop(_loss), parallel.make_mesh(), state_merge="max"),
        rf"state_merge: unknown merge 'max'; allowed: {_allowed(parallel.STATE_MERGES)}$",
    ),
    "level": (
        lambda: parallel.CommReport(collectives=(), mesh_axes=("node",)).total(level="global"),
        rf"level: unknown level 'global'; allowed: {_allowed(_comm.LEVELS)} \(or None: all\)$",
    ),
    "kind": (
        lambda: parallel.CommReport(collectives=(), mesh_axes=("node",)).count(kind="broadcast"),
        rf"kind: unknown collective 'broadcast'; allowed: {_allowed(parallel.KINDS)} \(or None: all\)$",
    ),
    "comm_dtype": (
        lambda: parallel.DasoConfig(comm_dtype="int8"),
        rf"comm_dtype: unknown dtype 'int8'; allowed: {_allowed(parallel.COMM_DTYPES)}$",
    ),
    "daso program": (
        lambda: parallel.DasoConfig(program="jit"),
        rf"program: unknown program 'jit'; allowed: {_allowed(parallel.PROGRAMS)}$",
    ),
    "daso phase": (  # checked before the layout is used
        lambda: daso_steps.make_step(None, None, None, "idle"),
        rf"phase: unknown phase 'idle'; allowed: {_allowed(parallel.PHASES)}$",
    ),
    "ab phase": (  # checked before the layout is used
        lambda: ab_steps.make_step(None, None, None, "sync"),
        rf"phase: unknown phase 'sync'; allowed: {_allowed(ab_schedule.PHASES)}$",
    ),
    "ab sync_mode": (lambda: parallel.ABConfig(sync_mode="none"), _SYNC),
    "ab_mesh sync_mode": (lambda: parallel.ab_mesh(2, sync_mode="none"), _SYNC),
    "check_ab_mesh sync_mode": (lambda: parallel.check_ab_mesh(parallel.ab_mesh(2), "none"), _SYNC),
    "ab program": (
        lambda: parallel.ab.ab_program_report(None, "factorize", None, None, KEY),
        rf"program: unknown program 'factorize'; allowed: {_allowed(ab_comm.PROGRAMS)}$",
    ),
    "plot x": (
        lambda: plot.plot_runs(["run"], "runs.png", x="epochs"),
        rf"x: 'epochs' is not an axis; allowed: {_allowed(plot.AXES)}$",
    ),
    "family": (
        lambda: config.RunConfig().entry("data"),
        rf"family: unknown family 'data'; allowed: {_allowed(config.FAMILY_NAMES)}$",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_value_outside_the_alias_is_refused(case):
    call, message = REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_the_checks_hold_while_jit_traces():
    def gradient(aggregation):
        def step(params):
            est = grads.forward_gradient(_loss, num_tangents=2, aggregation=aggregation)
            return est.value_and_grad(params, est.init(params), None, key=KEY)[1]

        return jax.jit(step)(jnp.ones(3))

    assert gradient("mean").shape == (3,)
    with pytest.raises(ValueError, match=r"aggregation: unknown aggregation 'median'; allowed: sum, mean"):
        gradient("median")


def test_sweep_refuses_an_unknown_mode_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=rf"mode: unknown mode 'grid'; allowed: {_allowed(sweep.MODES)}$"):
        sweep.sweep(config.RunConfig(), "lr", (1e-3, 1e-2), tmp_path / "sweep", mode="grid")
    assert not (tmp_path / "sweep").exists()


def test_the_values_inside_are_accepted():
    assert config.RunConfig().entry("estimator") is grads.ESTIMATORS["backprop"]
    assert lowrank.LowRankDense(_factors(), None, kind="linear_general", **_LOW_RANK).kind == "linear_general"
    report = parallel.CommReport(collectives=(), mesh_axes=("node",))
    assert report.total(level="cross-node", kind="all-reduce") == report.count(level="none") == 0
    assert parallel.ab_mesh(2, sync_mode="only-b").shape == {"group": 4, "dp": 2}


def test_the_public_alias_is_the_one_the_estimators_use():
    assert jaxalgo.grads.Aggregation is _combine.Aggregation
    assert "Aggregation" in jaxalgo.grads.__all__
