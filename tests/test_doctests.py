"""Every docstring example of the package runs: ``>>>`` examples as doctests, ``Example::`` blocks as scripts.

Both kinds show a call in context and use a few names they do not define (``params``, ``batch``,
``loss_fn``...). They run in the namespace of their module plus the small problem below: a digits MLP as a chain
(``model``, its pure function ``fn`` and ``params``), its ``loss_fn``, one training ``batch`` (inputs ``x``), ``ds``
and ``key``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalgo
import jaxalgo.config
import jaxalgo.train

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Examples?::[ \t]*\n(?P<body>(?:[ \t]*\n|(?P=indent)[ \t]+\S.*\n?)+)", re.M)


def _modules():
    names = ["jaxalgo"] + [m.name for m in pkgutil.walk_packages(jaxalgo.__path__, "jaxalgo.")]
    return [importlib.import_module(name) for name in sorted(names) if not name.endswith("__main__")]


def _docstrings():
    """(qualified name, docstring, module) of every module, class, function and method defined in jaxalgo."""
    seen, found = set(), []

    def visit(name, obj, module):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and id(obj) not in seen:
            seen.add(id(obj))
            found.append((name, doc, module))

    for module in _modules():
        visit(module.__name__, module, module)
        for attr, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                visit(f"{module.__name__}.{attr}", obj, module)
            elif inspect.isclass(obj):
                visit(f"{module.__name__}.{attr}", obj, module)
                for member, value in vars(obj).items():
                    value = getattr(value, "__func__", value)
                    if inspect.isfunction(value) or isinstance(value, property):
                        visit(f"{module.__name__}.{attr}.{member}", value, module)
    return found


def _example_blocks():
    blocks = []
    for name, doc, module in _docstrings():
        for index, match in enumerate(_EXAMPLE.finditer(inspect.cleandoc(doc) + "\n")):
            blocks.append(pytest.param(module, textwrap.dedent(match.group("body")), id=f"{name}:{index}"))
    return blocks


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for module in _modules():
        for test in finder.find(module):
            if test.examples and test.name not in {t.values[0].name for t in tests}:
                tests.append(pytest.param(test, id=test.name))
    return tests


def _problem():
    """The names the ``Example::`` blocks take from their context."""
    key = jax.random.key(0)
    ds = jaxalgo.data.load_dataset("digits", seed=0)
    model = jaxalgo.models.mlp(ds.x_train.shape[1:], ds.num_outputs, hidden=(16,), key=jax.random.key(1))
    fn, params = jaxalgo.models.split_chain(model)

    def loss_fn(p, b):
        return jaxalgo.losses.softmax_cross_entropy(fn.apply(p, b["x"]), b["y"])

    batch = next(jaxalgo.data.iterate_batches(ds, 32, seed=0, epoch=0))
    names = {"jax": jax, "jnp": jnp, "np": np, "optax": optax, "jaxalgo": jaxalgo, "key": key, "ds": ds}
    return {**names, "model": model, "fn": fn, "params": params, "loss_fn": loss_fn, "batch": batch, "x": batch["x"]}


def _data_parallel_step():
    """``comm_report``'s example: a data-parallel step with its arguments placed on a 2 x 4 mesh."""
    problem = _problem()
    mesh = jaxalgo.parallel.make_mesh((2, 4))
    est = jaxalgo.parallel.data_parallel(jaxalgo.grads.backprop(problem["loss_fn"]), mesh)

    def step(state, batch, key):
        return est.value_and_grad(state, est.init(state), batch, key=key)[:2]

    state = jaxalgo.parallel.replicate(problem["params"], mesh)
    batch = jaxalgo.parallel.shard(problem["batch"], mesh)
    return {**problem, "mesh": mesh, "step": jax.jit(step), "state": state, "batch": batch}


_CONTEXTS = {"jaxalgo.parallel._comm": _data_parallel_step}

EXAMPLES = _example_blocks()
DOCTESTS = _doctests()


def test_examples_were_found():
    assert len(EXAMPLES) + len(DOCTESTS) >= 5, (len(EXAMPLES), len(DOCTESTS))


@pytest.mark.parametrize(("module", "code"), EXAMPLES)
def test_example_block_runs(module, code):
    namespace = {**vars(module), **_CONTEXTS.get(module.__name__, _problem)()}
    exec(compile(code, f"<example in {module.__name__}>", "exec"), namespace)


@pytest.mark.parametrize("test", DOCTESTS)
def test_doctest(test):
    test.globs = {**_problem(), **test.globs}  # the module's own names first, then the problem's
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=lambda text: print(text, end=""))
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {test.name} failed (output above)"
