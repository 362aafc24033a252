"""The built package: ``python -m build`` makes a wheel and an sdist that hold what they should, and the wheel,
installed into a fresh virtual environment, imports every public module and trains one epoch.

The virtual environment sees this interpreter's site-packages (``--system-site-packages``), so jax and the other
dependencies are not installed again; jaxalgo itself comes from the wheel (``pip install --no-deps``), and every
check asserts that the jaxalgo it ran lies inside the environment, not in this checkout (the editable install).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

pytestmark = pytest.mark.slow


def _run(args, *, cwd, timeout, env=None):
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel of this checkout (the wheel is built from the sdist, as ``python -m build`` does).

    Built once per test session: pytest-xdist's workers share the build, and a lock keeps two builds of the one
    checkout from running at once (setuptools writes its release tree into the checkout, so two builds clash).
    """
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' temp dirs' parent
    out = shared / "dist"
    with open(shared / "dist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "built").exists():
            out.mkdir(exist_ok=True)
            _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out, timeout=300)
            (out / "built").touch()
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh virtual environment with the wheel installed (no dependencies: they come from this interpreter)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
        cwd=env_dir.parent,
        timeout=120,
    )
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    _run([*pip, str(dist[0])], cwd=env_dir.parent, timeout=300)
    return env_dir, python


def test_wheel_contents(dist):
    wheel, _ = dist
    assert wheel.name == f"jaxalgo-{VERSION}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "jaxalgo/py.typed" in names
    assert f"jaxalgo-{VERSION}.dist-info/licenses/LICENSE" in names
    assert not any(name.startswith(("tests/", "notebooks/", "docs/", "benchmarks/")) for name in names)
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxalgo").rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"


def test_sdist_contents(dist):
    _, sdist = dist
    assert sdist.name == f"jaxalgo-{VERSION}.tar.gz"
    top = f"jaxalgo-{VERSION}/"
    names = {name.removeprefix(top) for name in tarfile.open(sdist).getnames()}
    for required in ("LICENSE", "README.md", "CHANGELOG.md", "CITATION.cff", "pyproject.toml", "jaxalgo/py.typed"):
        assert required in names, f"{required} is not in the sdist"


def test_version_defined_once():
    """pyproject holds the version; CITATION.cff and the changelog name the same one."""
    citation = re.search(r"^version:\s*['\"]?([^'\"\s]+)", (ROOT / "CITATION.cff").read_text(), re.MULTILINE)
    assert citation and citation.group(1) == VERSION
    assert f"{VERSION}" in (ROOT / "CHANGELOG.md").read_text()
    init = (ROOT / "jaxalgo" / "__init__.py").read_text()
    spelled = re.search(rf"__version__\s*=\s*['\"]{re.escape(VERSION)}['\"]", init)
    assert not spelled, "jaxalgo/__init__.py spells the version out again (read it from the installed metadata)"


_IMPORT_ALL = """
import importlib, json, pkgutil
import jaxalgo
names = ["jaxalgo"] + [m.name for m in pkgutil.walk_packages(jaxalgo.__path__, "jaxalgo.")]
public = [n for n in names if not any(part.startswith("_") for part in n.split("."))]
files = {name: importlib.import_module(name).__file__ for name in public}
print(json.dumps({"version": jaxalgo.__version__, "files": files}))
"""


def _public_modules_of_the_checkout() -> set[str]:
    """``jaxalgo.X.Y`` for every module file of the checkout with no private (underscore) part."""
    found = set()
    for path in (ROOT / "jaxalgo").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not any(part.startswith("_") for part in parts):
            found.add(".".join(parts))
    return found


def test_installed_wheel_imports_every_public_module(venv, tmp_path):
    env_dir, python = venv
    result = _run([str(python), "-c", _IMPORT_ALL], cwd=tmp_path, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["version"] == VERSION
    assert set(report["files"]) >= _public_modules_of_the_checkout() | {"jaxalgo.grads", "jaxalgo.parallel.ab"}
    for name, file in report["files"].items():
        assert pathlib.Path(file).resolve().is_relative_to(env_dir.resolve()), f"{name} came from {file}"


def test_installed_wheel_trains_one_epoch(venv, tmp_path):
    """The console script of the wheel trains a small MLP on scikit-learn's digits for one epoch; the accuracy is
    well above chance (0.1 for ten classes)."""
    env_dir, _ = venv
    script = env_dir / ("Scripts" if os.name == "nt" else "bin") / "jaxalgo"
    workdir = tmp_path / "run"
    args = [
        str(script),
        "train",
        "--model",
        "mlp",
        "--hidden",
        "32",
        "--dataset",
        "digits",
        "--estimator",
        "backprop",
        "--optimizer",
        "adam",
        "--lr",
        "3e-3",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--seed",
        "0",
        "--quiet",
        "--workdir",
        str(workdir),
    ]
    _run(args, cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    assert final.get("final") is True
    assert final["test_accuracy"] > 0.5, final
    assert final["steps"] == _digits_train_examples(0.2) // 32


def _digits_train_examples(test_fraction: float) -> int:
    """The training split's size: the split holds out ``round(test_fraction * n_c)`` examples of each class."""
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    return int(counts.sum() - sum(round(test_fraction * int(n)) for n in counts))
