"""GPU and TPU portability, proven on CPU: every program a training run compiles lowers for ``cuda`` and ``tpu``.

``jax.export.export(program, platforms=("cuda", "tpu"))`` lowers a jitted program for other platforms offline, on
this CPU-only machine: it traces the program and applies every primitive's lowering rule for each platform (one
multi-platform module; where the rules differ, e.g. Cholesky is ``cusolver_potrf_ffi`` on cuda and native on tpu,
the module switches on the platform). It does not compile, so it is fast. A program fails here when

- a primitive has no lowering for cuda or tpu (a construct that only lowers on CPU, e.g. ``lax.linalg.schur``);
- it holds a host callback (``jax.pure_callback``, ``io_callback``, ``jax.debug.print`` / ``callback``): jax
  refuses to export those;
- its module calls a CPU-specific custom call (LAPACK, DUCC) or a callback target, which jax's own checks let
  through when a target is on its stable list: :func:`portability_problems` reads the ``custom_call`` targets of
  ``exported.mlir_module()``.

The negative tests at the end show that each of these is caught, so the positive tests are not vacuous.

What is exported. Runs are built as the driver builds them (``RunConfig.from_flags`` with small sizes,
:func:`jaxalgo.train.setup`, :func:`jaxalgo.train.make_runner`, ``runner.init``), for every entry of
``jaxalgo.grads.ESTIMATORS`` (single device, and DDP where the estimator declares ``data_parallel``), of
``jaxalgo.parallel.STRATEGIES`` and of ``jaxalgo.lowrank.LOWRANK`` (OIALR before and after its conversion to low
rank, which is driven through ``runner.after_step``). Each runner type has an exporter that lists the jitted
programs its host code calls, with the arguments it calls them with (host-side loops such as AB's re-SVD or the
evaluation's chunk loop are exported as the jitted pieces they call); :func:`reachable_programs` then walks the
runner (attributes, containers, partials, closures of jaxalgo functions) and the test fails if it finds a jitted
program that no exporter exported, and for a runner type without an exporter. Entries added to the catalogues are
picked up by the parametrisation.

Meshes. Sharded programs are exported over the run's concrete mesh (2 x 4 simulated CPU devices, axes
``("node", "local")`` or ``("group", "dp")``), not over a device-free ``jax.sharding.AbstractMesh``: with jax 0.10
the runners' programs close over their concrete ``Mesh`` (``jax.shard_map(mesh=...)``, ``jax.sharding.reshard``
to ``NamedSharding(mesh, ...)``, ``Explicit`` axes), whose abstract mesh carries the CPU's device kind, and tracing
them with inputs sharded over a device-free ``AbstractMesh`` of the same axes fails ("Mesh for all inputs should be
equal"). The exported module does not name devices: it records the device count (``nr_devices``, checked to be the
mesh's size) and the HLO shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback
from jax.sharding import NamedSharding

from jaxalgo import data, grads, lowrank
from jaxalgo import parallel as par
from jaxalgo.config import RunConfig
from jaxalgo.lowrank import OIALRRunner
from jaxalgo.parallel.pipeline import PipelineRunner
from jaxalgo.runner import SingleDeviceRunner
from jaxalgo.train import make_runner, setup

PLATFORMS = ("cuda", "tpu")
SMALL = {"hidden": (32,), "batch_size": 16, "epochs": 1, "quiet": True}
MESH = "2x4"

# -- what makes a lowered module non-portable -----------------------------------------------------------------

_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call\s+@([\w.$-]+)|call_target_name\s*=\s*\"([^\"]+)\"")
_CPU_TARGET = re.compile(r"^(lapack|blas|ducc|dynamic_ducc)_|cpu", re.IGNORECASE)  # jaxlib's XLA:CPU kernels
_CALLBACK_TARGET = re.compile(r"callback", re.IGNORECASE)  # host callbacks, on any platform


def custom_call_targets(module_text: str) -> list[str]:
    """The distinct ``custom_call`` targets of a lowered StableHLO module, sorted."""
    return sorted({a or b for a, b in _CUSTOM_CALL.findall(module_text)})


def portability_problems(exported: jax.export.Exported, platforms: tuple[str, ...] = PLATFORMS) -> list[str]:
    """What makes ``exported`` unfit for ``platforms``: other lowering platforms, CPU-specific custom calls and
    host-callback custom calls (empty when it is portable)."""
    problems = []
    if tuple(exported.platforms) != tuple(platforms):
        problems.append(f"lowered for {exported.platforms}, expected {platforms}")
    for target in custom_call_targets(exported.mlir_module()):
        if _CPU_TARGET.search(target):
            problems.append(f"CPU-specific custom call {target!r}")
        elif _CALLBACK_TARGET.search(target):
            problems.append(f"host callback custom call {target!r}")
    return problems


# -- programs, their arguments and their export -----------------------------------------------------------------


class Program(NamedTuple):
    """A jitted program and the (abstract) arguments a run calls it with."""

    name: str
    fn: Any  # a jitted function (jax.stages.Wrapped)
    args: tuple


def abstract(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """Arrays (jax, numpy, PRNG keys) as ``jax.ShapeDtypeStruct``; named shardings moved onto ``mesh`` (dropped
    without one: single-device arguments); anything else (Python scalars, static arguments) unchanged."""

    def leaf(x):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            return x
        sharding = getattr(x, "sharding", None)
        sharding = (
            NamedSharding(mesh, sharding.spec) if mesh is not None and isinstance(sharding, NamedSharding) else None
        )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=getattr(x, "weak_type", False))

    return jax.tree.map(leaf, tree)


def export(program: Program, platforms: tuple[str, ...] = PLATFORMS) -> jax.export.Exported:
    """``program`` lowered for ``platforms`` with :func:`jax.export.export` (traced and lowered, not compiled)."""
    return jax.export.export(program.fn, platforms=platforms)(*program.args)


def problems_of(program: Program) -> list[str]:
    """Why ``program`` is not portable to :data:`PLATFORMS` (it does not lower, or :func:`portability_problems`)."""
    try:
        exported = export(program)
    except Exception as error:  # reported with the program's name, not swallowed
        return [f"does not lower for {PLATFORMS}: {type(error).__name__}: {error}"]
    problems = portability_problems(exported)
    sharded = [x for x in jax.tree.leaves(program.args) if isinstance(getattr(x, "sharding", None), NamedSharding)]
    if sharded and exported.nr_devices != sharded[0].sharding.mesh.size:
        problems.append(f"exported for {exported.nr_devices} devices, its mesh has {sharded[0].sharding.mesh.size}")
    return problems


def assert_portable(programs: list[Program]) -> None:
    """Fails naming every program of ``programs`` that is not portable, and why."""
    assert programs, "no program to export"
    failures = [f"{p.name}: {problem}" for p in programs for problem in problems_of(p)]
    assert not failures, "\n".join(failures)


# -- every jitted program a runner holds ----------------------------------------------------------------------

_OPAQUE = (str, bytes, int, float, complex, bool, type, types.ModuleType, np.ndarray, np.generic, jax.Array)


def reachable_programs(root: Any) -> dict[int, tuple[str, Any]]:
    """``{id(program): (path, program)}`` of every jitted program reachable from ``root`` through the attributes of
    jaxalgo objects, containers, ``functools.partial`` and ``functools.cache`` wrappers, and the closures of
    jaxalgo's functions (a jitted program is not entered: what it calls is part of it)."""
    found: dict[int, tuple[str, Any]] = {}
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("runner", root)]
    while stack:
        path, obj = stack.pop()
        if obj is None or isinstance(obj, _OPAQUE) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, jax.stages.Wrapped):
            found[id(obj)] = (path, obj)
        elif isinstance(obj, functools.partial):
            stack += [(f"{path}.func", obj.func), (f"{path}.args", obj.args), (f"{path}.keywords", obj.keywords)]
        elif isinstance(obj, types.FunctionType):
            if obj.__module__.startswith("jaxalgo"):
                cells = zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=True)
                stack += [(f"{path}<{name}>", cell.cell_contents) for name, cell in cells]
        elif isinstance(obj, types.MethodType):
            stack.append((f"{path}.__func__", obj.__func__))
        elif isinstance(obj, dict):
            stack += [(f"{path}[{key!r}]", value) for key, value in obj.items()]
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
        elif callable(obj) and hasattr(obj, "__wrapped__"):  # functools.cache and friends
            stack.append((f"{path}.__wrapped__", obj.__wrapped__))
        elif type(obj).__module__.startswith("jaxalgo"):
            if dataclasses.is_dataclass(obj):
                fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            else:
                fields = dict(getattr(obj, "__dict__", {}))
            stack += [(f"{path}.{name}", value) for name, value in fields.items()]
    return found


def the_program(obj: Any) -> Any:
    """The one jitted program reachable from ``obj`` (a host-side function or partial that calls it)."""
    found = list(reachable_programs(obj).values())
    assert len(found) == 1, f"expected one jitted program behind {obj!r}, found {sorted(p for p, _ in found)}"
    return found[0][1]


def assert_all_exported(runner: Any, programs: list[Program]) -> None:
    """Fails naming the jitted programs reachable from ``runner`` that ``programs`` leave out."""
    exported = {id(p.fn) for p in programs}
    missing = sorted(path for program_id, (path, _) in reachable_programs(runner).items() if program_id not in exported)
    assert not missing, f"{type(runner).__name__} holds jitted programs this test does not export: {missing}"


# -- runs and the programs of each runner type -----------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A run built as the driver builds it, and one training batch (host arrays, as the data pipeline yields)."""

    config: RunConfig
    experiment: Any
    runner: Any
    state: Any
    batch: dict[str, np.ndarray]

    @property
    def mesh(self):
        return getattr(self.runner, "mesh", None)

    def placed_batch(self):
        """The batch as the runner places it: split over every mesh axis (on its device without a mesh)."""
        return self.batch if self.mesh is None else par.shard(self.batch, self.mesh)


def build(flags: dict[str, Any]) -> Run:
    """The run of ``flags`` (on top of :data:`SMALL`), built as :func:`jaxalgo.train.train_and_evaluate` builds it."""
    config = RunConfig.from_flags({**SMALL, **flags})
    experiment = setup(config)
    runner = make_runner(config, experiment)
    state = runner.init(experiment.init_state())
    batch = next(data.iterate_batches(experiment.dataset, config.batch_size, seed=config.seed, epoch=0))
    return Run(config, experiment, runner, state, batch)


def evaluation(evaluate: Callable[..., Any], params: Any, dataset: data.Dataset) -> Program:
    """The jitted per-chunk sums behind ``evaluate`` (:func:`jaxalgo.runner.make_evaluate`), on host parameters and
    the test split (one chunk: it is smaller than the chunk size)."""
    args = (abstract(params), dataset.x_test, dataset.y_test)
    return Program("evaluate", the_program(evaluate), abstract(args))


def _single_device(run: Run) -> list[Program]:
    """The jitted step of :func:`jaxalgo.runner.make_train_step` and the evaluation."""
    runner = run.runner
    step = Program("train_step", runner.train_step, abstract((run.state, run.batch, runner.run_key)))
    return [step, evaluation(runner._evaluate, run.state.params, run.experiment.dataset)]


def _data_parallel(run: Run) -> list[Program]:
    """DDP's step (the data-parallel estimator inside the same step) on the sharded batch, and the evaluation of the
    (host) parameters."""
    runner, mesh = run.runner, run.mesh
    step = Program("train_step", runner.train_step, abstract((run.state, run.placed_batch(), runner.run_key), mesh))
    return [step, evaluation(runner._evaluate, run.experiment.init_params, run.experiment.dataset)]


def _daso(run: Run) -> list[Program]:
    """DASO's step per phase, the window program of the run's ``S``, the loss means, the consensus of the nodes and
    the evaluation. (An adaptive schedule may build windows for other ``S``: the same program at another length.)"""
    runner, mesh, daso = run.runner, run.mesh, run.runner.daso
    state, batch = run.state, run.placed_batch()
    programs = [
        Program(f"step[{phase}]", step, abstract((state, batch, runner.run_key), mesh))
        for phase, step in daso.steps.items()
    ]
    loss_per_node = jax.eval_shape(daso.steps["local"], state, batch, runner.run_key)[1]
    programs.append(Program("mean", runner._mean, abstract((loss_per_node,), mesh)))
    wait = runner.config.batches_to_wait
    if wait >= 1:  # the window from a send to its merge, S + 1 steps in one program (built once per S)
        window = daso.window(wait)
        args = (state, [batch] * (wait + 1), runner.run_key)
        programs.append(Program(f"window[S={wait}]", window, abstract(args, mesh)))
        window_losses = jax.eval_shape(window, *args)[1]
        programs.append(Program("step_means", runner._step_means, abstract((window_losses,), mesh)))
    programs.append(Program("consensus", daso.consensus, abstract((state.params,), mesh)))
    return [*programs, evaluation(runner._evaluate, run.experiment.init_params, run.experiment.dataset)]


def _ab(run: Run) -> list[Program]:
    """AB-training's step per phase, the loss mean, the sync (also behind the consensus), the re-SVD's pieces and
    the evaluation."""
    runner, mesh, ab = run.runner, run.mesh, run.runner.ab
    state, batch = run.state, run.placed_batch()
    programs = [
        Program(f"step[{phase}]", step, abstract((state, batch, runner.run_key, 1.0), mesh))
        for phase, step in ab.steps.items()
    ]
    loss_per_group = jax.eval_shape(ab.steps["ddp"], state, batch, runner.run_key, 1.0)[1]
    programs.append(Program("mean", runner._mean, abstract((loss_per_group,), mesh)))
    # sync, and consensus for evaluation, run the same program
    programs.append(Program("sync", ab.sync_program, abstract((state.train, state.opt_state), mesh)))
    # the re-SVD (ab.factorize, host code): the SVD of one device's copy of the parameters (svd_program), then the
    # install of the full-rank factors cut to the agreed ranks' sizes (here: half of each rank)
    local = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.train["params"])
    programs.append(Program("factorize/svd", the_program(ab.svd_program), (local,)))
    factors = state.train["factors"]
    full_a, full_b = ({name: f[part] for name, f in factors.items()} for part in ("A", "B"))
    sizes = tuple(sorted((name, max(1, size // 2)) for name, size in ab.sizes(state).items()))
    install_args = (*abstract((state, full_a, full_b, state.ranks), mesh), sizes)
    programs.append(Program("factorize/install", the_program(ab.resize), install_args))
    return [*programs, evaluation(runner._evaluate, run.experiment.init_params, run.experiment.dataset)]


def _oialr_stage(run: Run, stage: str) -> list[Program]:
    """The OIALR trainer's current step and evaluation (rebuilt by the conversion)."""
    runner, trainer = run.runner, run.runner.trainer
    step = Program(f"train_step ({stage})", trainer._train_step, abstract((run.state, run.batch, runner.run_key)))
    evaluate = evaluation(trainer._evaluate, run.state.params, run.experiment.dataset)
    return [step, evaluate._replace(name=f"evaluate ({stage})")]


def _oialr(run: Run) -> list[Program]:
    """OIALR before its conversion, then converted (``after_step`` at the delay) and after it."""
    runner = run.runner
    dense = [
        *_oialr_stage(run, "dense"),
        # the runner's base evaluation of the dense chain (OIALRRunner evaluates through its trainer instead)
        evaluation(runner._evaluate, run.state.params, run.experiment.dataset)._replace(name="evaluate (base)"),
    ]
    assert_all_exported(runner, dense)
    converted = runner.after_step(run.config.lowrank.options.delay, run.state)
    assert runner.trainer.status.converted
    assert jax.tree.structure(converted.params) != jax.tree.structure(run.state.params)  # U, S, V now
    run = dataclasses.replace(run, state=converted)
    return [*dense, *_oialr_stage(run, "low rank")]


def _pipeline(run: Run) -> list[Program]:
    """The pipeline's programs on the batch it replicates over the stages: F3 / DRTP / LLO's call without and with
    its drain, or GPipe's step; and the evaluation."""
    runner, mesh, pipe = run.runner, run.mesh, run.runner.pipe
    args = abstract((run.state, pipe.place_batch(run.batch)), mesh)
    if runner.form == "feedback":
        programs = [Program(f"run[drain={drain}]", pipe.program(drain=drain), args) for drain in (False, True)]
    else:
        programs = [Program("step", pipe.program(), args)]
    return [*programs, evaluation(runner._evaluate, run.experiment.init_params, run.experiment.dataset)]


EXPORTERS: dict[type, Callable[[Run], list[Program]]] = {
    SingleDeviceRunner: _single_device,
    par.DataParallelRunner: _data_parallel,
    par.DasoRunner: _daso,
    par.ABRunner: _ab,
    OIALRRunner: _oialr,
    PipelineRunner: _pipeline,
}


def programs_of(run: Run) -> list[Program]:
    """The programs of ``run``'s runner, checked to be every jitted program it holds."""
    exporter = EXPORTERS.get(type(run.runner))
    if exporter is None:
        pytest.fail(f"no exporter for {type(run.runner).__name__}: add one to EXPORTERS in tests/test_export.py")
    programs = exporter(run)
    assert_all_exported(run.runner, programs)
    return programs


# -- the catalogues --------------------------------------------------------------------------------------------


def estimator_flags(name: str) -> dict[str, Any]:
    """``--estimator name``, with 4 tangents where it takes ``--tangents``."""
    takes = {f.name for f in grads.ESTIMATORS[name].flags}
    return {"estimator": name, **({"tangents": 4} if "tangents" in takes else {})}


@pytest.mark.parametrize("name", list(grads.ESTIMATORS))
def test_every_estimator_lowers_for_gpu_and_tpu(name):
    flags = estimator_flags(name)
    single = build(flags)
    programs = programs_of(single)
    if type(single.config.estimator.options).data_parallel:
        parallel = build({**flags, "parallel": "ddp", "mesh": MESH})
        programs += [p._replace(name=f"ddp {p.name}") for p in programs_of(parallel)]
    assert_portable(programs)


def _multi_device(name: str) -> bool:
    return not par.STRATEGIES[name].options.single_device


STRATEGY_CASES: dict[str, list[dict[str, Any]]] = {
    "ddp": [
        {"estimator": "backprop"},
        # forward-gradient data parallelism: the all-reduce carries the k directional derivatives
        {"estimator": "fg", "tangents": 4, "parallel_reduce": "directional"},
        {"estimator": "frog", "tangents": 4, "parallel_reduce": "directional"},
    ],
    "daso": [
        {"estimator": "backprop"},
        {"estimator": "backprop", "daso_sharded": True, "daso_batches_to_wait": 2},
        {"estimator": "frog", "tangents": 4, "parallel_reduce": "directional"},
    ],
    "ab": [{"estimator": "backprop", "ab_sync_mode": mode} for mode in par.SYNC_MODES],
    "pipeline": [{"estimator": "backprop", "mesh": "2"}, {"estimator": "f3", "mesh": "2"}],  # stages, not NODESxLOCAL
}


def _case_id(name: str, case: dict[str, Any]) -> str:
    parts = [str(v) if k == "estimator" else f"{k}={v}" for k, v in case.items() if k != "tangents"]
    return "-".join([name, *parts])


def _strategy_cases() -> Iterator[Any]:
    for name in par.STRATEGIES:
        for case in STRATEGY_CASES.get(name, [{}]):
            flags = {"parallel": name, **({"mesh": MESH} if _multi_device(name) else {}), **case}
            yield pytest.param(flags, id=_case_id(name, case))


@pytest.mark.parametrize("flags", list(_strategy_cases()))
def test_every_strategy_lowers_for_gpu_and_tpu(flags):
    assert_portable(programs_of(build(flags)))


LOWRANK_CASES: dict[str, list[dict[str, Any]]] = {
    "oialr": [{"estimator": "backprop"}, {"estimator": "frog", "tangents": 4}, {"estimator": "f3"}],
}


def _lowrank_cases() -> Iterator[Any]:
    for name in lowrank.LOWRANK:
        for case in LOWRANK_CASES.get(name, [{}]):
            yield pytest.param({"lowrank": name, **case}, id=_case_id(name, case))


@pytest.mark.parametrize("flags", list(_lowrank_cases()))
def test_every_low_rank_method_lowers_for_gpu_and_tpu(flags):
    assert_portable(programs_of(build(flags)))


def _compute_dtypes() -> list[str]:
    return [d for d in typing.get_args(typing.get_type_hints(RunConfig)["compute_dtype"]) if d != "float32"]


@pytest.mark.parametrize("compute_dtype", _compute_dtypes())
@pytest.mark.parametrize(
    "flags", [{"estimator": "backprop"}, {"estimator": "frog", "tangents": 4}], ids=["backprop", "frog"]
)
def test_mixed_precision_steps_lower_for_gpu_and_tpu(flags, compute_dtype):
    single = build({**flags, "compute_dtype": compute_dtype})
    parallel = build({**flags, "compute_dtype": compute_dtype, "parallel": "ddp", "mesh": MESH})
    programs = programs_of(single) + programs_of(parallel)
    assert_portable(programs)
    text = export(programs[0]).mlir_module()
    assert re.search(r"tensor<[\dx]*bf16>", text), "the bfloat16 step computes no bfloat16"


def _module_programs() -> dict[str, Any]:
    """``{"module.name": program}``: the jitted programs defined at module level in jaxalgo (those a run calls
    outside its runner: the driver's finite check, the feedback matrices drawn by ``estimator.init``)."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("jaxalgo") and module is not None:
            for name, value in vars(module).items():
                if isinstance(value, jax.stages.Wrapped) and value.__module__ == module_name:
                    found[f"{module_name}.{name}"] = value
    return found


_KEY = abstract(jax.random.key(0))
_F32 = jnp.dtype("float32")
MODULE_PROGRAMS: dict[str, Callable[[Any, Run], list[Program]]] = {
    "jaxalgo.grads._feedback._draw": lambda fn, run: [
        Program(f"_draw[{init}]", fn, (_KEY, (10, 32), init, _F32)) for init in grads.FEEDBACK_INITS
    ],
    "jaxalgo.grads._feedback._draw_all": lambda fn, run: [
        Program(f"_draw_all[{init}]", fn, (_KEY, ((10, 32), (10, 16)), init, _F32)) for init in grads.FEEDBACK_INITS
    ],
    "jaxalgo.train._all_finite": lambda fn, run: [Program("_all_finite", fn, (abstract(run.state.params),))],
}


def test_the_module_level_programs_lower_for_gpu_and_tpu():
    found = _module_programs()
    assert set(found) == set(MODULE_PROGRAMS), "module-level jitted programs changed: update MODULE_PROGRAMS"
    run = build({"estimator": "f3"})
    assert_portable([p for name, fn in found.items() for p in MODULE_PROGRAMS[name](fn, run)])


def test_the_walk_finds_the_programs_a_runner_holds_and_a_missed_one_fails():
    run = build({"parallel": "daso", "mesh": MESH})
    daso = run.runner.daso
    found = reachable_programs(run.runner)
    assert {id(step) for step in daso.steps.values()} | {id(daso.consensus)} <= set(found)
    assert isinstance(the_program(run.runner._evaluate), jax.stages.Wrapped)
    single = build({"estimator": "backprop"})
    programs = programs_of(single)
    single.runner.extra = {"nested": functools.partial(lambda program: program, jax.jit(jnp.sin))}
    with pytest.raises(AssertionError, match=r"runner\.extra\['nested'\]"):
        assert_all_exported(single.runner, programs)


# -- the check bites -------------------------------------------------------------------------------------------


def _step_with(inner: Callable[[jax.Array], jax.Array]) -> Program:
    """A small jitted training step whose updated weights pass through ``inner``."""

    @jax.jit
    def step(w, x):
        loss = lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)
        return inner(w - 0.1 * jax.grad(loss)(w))

    return Program("step", step, (jax.ShapeDtypeStruct((4, 4), jnp.float32), jax.ShapeDtypeStruct((8, 4), jnp.float32)))


def _host_double(v):
    return np.asarray(v) * 2


CALLBACKS = {
    "pure_callback": lambda w: jax.pure_callback(_host_double, jax.ShapeDtypeStruct(w.shape, w.dtype), w),
    "io_callback": lambda w: io_callback(_host_double, jax.ShapeDtypeStruct(w.shape, w.dtype), w),
    "debug_print": lambda w: (jax.debug.print("w = {}", w), w)[1],
    "debug_callback": lambda w: (jax.debug.callback(lambda v: None, w), w)[1],
}


def test_the_control_step_is_portable():
    assert problems_of(_step_with(lambda w: w)) == []


@pytest.mark.parametrize("kind", list(CALLBACKS))
def test_a_host_callback_in_a_step_is_caught(kind):
    problems = problems_of(_step_with(CALLBACKS[kind]))
    assert problems and problems[0].startswith("does not lower"), problems


def test_a_construct_that_lowers_only_on_cpu_is_caught():
    program = _step_with(lambda w: jax.lax.linalg.schur(w)[0])
    export(program, platforms=("cpu",))  # it lowers on CPU
    (problem,) = problems_of(program)
    assert "schur" in problem and "not found for platforms" in problem


@pytest.mark.parametrize(
    "target", ["lapack_sgesdd_ffi", "ducc_fft", "xla_ffi_python_gpu_callback"], ids=["lapack", "ducc", "callback"]
)
def test_a_cpu_or_callback_custom_call_that_jax_lets_through_is_caught(target):
    program = _step_with(lambda w: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(w.shape, w.dtype))(w))
    checks = [jax.export.DisabledSafetyCheck.custom_call(target)]  # a target jax does not know stays unrefused
    exported = jax.export.export(program.fn, platforms=PLATFORMS, disabled_checks=checks)(*program.args)
    assert target in custom_call_targets(exported.mlir_module())
    (problem,) = portability_problems(exported)
    assert target in problem and ("CPU-specific" in problem) == (target != "xla_ffi_python_gpu_callback")


def test_the_cpu_lowering_of_an_svd_is_flagged_and_its_gpu_tpu_lowering_is_not():
    program = Program("svd", jax.jit(jnp.linalg.svd), (jax.ShapeDtypeStruct((6, 4), jnp.float32),))
    on_cpu = export(program, platforms=("cpu",))
    assert any("lapack" in p for p in portability_problems(on_cpu, ("cpu",)))
    assert problems_of(program) == []
