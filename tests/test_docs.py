"""The API reference (docs/api/*.rst) documents every public name of every public module."""

from __future__ import annotations

import importlib
import pathlib
import re
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
MODULES = (
    "jaxalgo",
    "jaxalgo.grads",
    "jaxalgo.lowrank",
    "jaxalgo.parallel",
    "jaxalgo.parallel.ab",
    "jaxalgo.models",
    "jaxalgo.data",
    "jaxalgo.experiments",
    "jaxalgo.losses",
    "jaxalgo.optimizers",
    "jaxalgo.runner",
    "jaxalgo.options",
    "jaxalgo.config",
    "jaxalgo.train",
    "jaxalgo.sweep",
    "jaxalgo.plot",
    "jaxalgo.tensorboard_log",
)
_DIRECTIVE = re.compile(r"^\.\. (auto\w+|py:\w+):: (\S+)\s*$")
_MODULE_OPTION = re.compile(r"^\s+:module: (\S+)\s*$")


def public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or (a module without one) the names it defines that do not start with an underscore."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    own = []
    for name, obj in vars(module).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType) or name == "annotations":
            continue
        if getattr(obj, "__module__", module.__name__) in (module.__name__, None) or name.isupper():
            own.append(name)
    return own


def documented_names(*, indexed_only: bool = False) -> dict[str, str]:
    """Fully qualified name -> the page that documents it (an autodoc entry or a ``py:`` alias entry); with
    ``indexed_only``, without the ``:no-index:`` entries (aliases that are no link target)."""
    found = {}
    for page in sorted(API.glob("*.rst")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = _DIRECTIVE.match(line)
            if not match:
                continue
            name = match.group(2)
            option = _MODULE_OPTION.match(lines[i + 1]) if i + 1 < len(lines) else None
            if option:
                name = f"{option.group(1)}.{name}"
            if indexed_only and any(rest.strip() == ":no-index:" for rest in lines[i + 1 : i + 4]):
                continue
            found[name] = page.name
    return found


def _page_of(module: str) -> str:
    return "jaxalgo.rst" if module == "jaxalgo" else module.removeprefix("jaxalgo.").replace(".", "_") + ".rst"


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_reference(module_name):
    module = importlib.import_module(module_name)
    documented = documented_names()
    missing = [name for name in public_names(module) if f"{module_name}.{name}" not in documented]
    # a submodule re-exported by the top-level package is documented by its own page's automodule
    missing = [name for name in missing if not isinstance(getattr(module, name), types.ModuleType)]
    hint = "\n".join(f".. autoXXX:: {module_name}.{name}" for name in missing)
    assert not missing, f"docs/api/{_page_of(module_name)} lacks {missing}; add an entry for each:\n{hint}"


def test_reference_names_exist():
    """Every entry of the reference names a public object (no stale entries after a rename)."""
    public = {f"{m}.{n}" for m in MODULES for n in public_names(importlib.import_module(m))}
    stale = [name for name in documented_names() if name not in public and name.rsplit(".", 1)[0] in MODULES]
    stale = [name for name in stale if name not in MODULES]
    assert not stale, f"entries in docs/api for names that are not public: {stale}"


def test_built_inventory_has_every_public_name():
    """After a docs build (the test command builds before pytest runs), every indexed entry is a link target."""
    inventory = ROOT / "docs" / "_build" / "html" / "objects.inv"
    sources = [*API.glob("*.rst"), *ROOT.joinpath("jaxalgo").rglob("*.py")]
    if not inventory.exists() or inventory.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        pytest.skip("no docs build newer than the sources (python -m sphinx -W -b html docs docs/_build/html)")
    from sphinx.util.inventory import InventoryFile

    with inventory.open("rb") as f:
        targets = InventoryFile.load(f, "", lambda base, uri: uri)
    names = {name for kind, entries in targets.items() if kind.startswith("py:") for name in entries}
    for module in MODULES:
        names.add(module)
    missing = [name for name in documented_names(indexed_only=True) if name not in names]
    assert not missing, f"in docs/api but not in the built inventory: {missing}"


def test_built_pages_typeset_maths_from_the_site_itself():
    """MathJax comes with the built site (no CDN): the pages with maths load it from _static, where it is."""
    html = ROOT / "docs" / "_build" / "html"
    page = html / "algorithms" / "forward_gradients.html"
    if not page.exists() or page.stat().st_mtime < (ROOT / "docs" / "conf.py").stat().st_mtime:
        pytest.skip("no docs build newer than docs/conf.py (python -m sphinx -W -b html docs docs/_build/html)")
    scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page.read_text())
    assert scripts, "the forward-gradient page loads no MathJax"
    for src in scripts:
        assert "://" not in src, f"MathJax from another site: {src}"
        assert (page.parent / src.split("?")[0]).resolve().is_file(), src


def test_ci_command_executes_the_notebooks_once():
    """The README's test command (run verbatim by .ci/run) builds the docs with warnings as errors before pytest,
    and pytest no longer executes the notebooks (the docs build does, and fails on a failing cell)."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    steps = [step.strip() for step in command.split("&&")]
    sphinx = next(i for i, s in enumerate(steps) if s.startswith("python -m sphinx"))
    pytest_step = next(i for i, s in enumerate(steps) if s.startswith("python -m pytest"))
    assert "-W" in steps[sphinx].split() and sphinx < pytest_step
    assert "mypy" in steps
    assert "--nbmake" not in steps[pytest_step]
    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert "notebooks" not in testpaths
    conf = (ROOT / "docs" / "conf.py").read_text()
    assert re.search(r"^nb_execution_raise_on_error = True$", conf, re.MULTILINE)
    assert re.search(r"^nb_execution_mode = \"(cache|force)\"$", conf, re.MULTILINE)
