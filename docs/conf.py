"""Sphinx configuration of jaxalgo's documentation (build: see docs/README.md)."""

import importlib.util
import inspect
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.abspath(".."))

import nbformat
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution
from myst_nb.core.read import is_myst_markdown_notebook, myst_nb_reader_plugin
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util import logging

import jaxalgo
from tests._xla_flags import add_fast_compile_flags

project = "jaxalgo"
author = "the jaxalgo developers"
copyright = "2026, the jaxalgo developers"
release = jaxalgo.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "README.md", "**/.ipynb_checkpoints", "notebooks/README*"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# MyST: $...$ maths, ::: fences, definition lists, heading anchors for cross-references.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Notebooks (notebooks/*.ipynb through the docs/notebooks link) and the pages written as MyST notebooks are
# executed by this build, once; "cache" reuses an execution while the code cells are unchanged (a fresh
# checkout, as in CI, executes everything). A failing cell fails the build.
nb_execution_mode = "cache"
nb_execution_cache_path = os.path.join(os.path.dirname(__file__), "_build", ".jupyter_cache")
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 900
nb_merge_streams = True
# Sphinx executes a page when it reads it, and with ``-j N`` the notebooks fall into one reading chunk, one after
# the other: _execute_notebooks (below) runs the ones not yet in the cache N at a time before reading starts.
# The kernels inherit this process's environment: XLA's CPU backend compiles them with the test suite's fast-compile
# flags (tests/_xla_flags.py), each unless XLA_FLAGS already sets it. The pages' programs are small and most of
# their time is compiling; the operations computed are the same (only the machine code differs), so no figure on a
# page changes beyond float rounding; only the "notebook time" lines report this build's seconds.
add_fast_compile_flags(os.environ)

# API reference: Google-style docstrings; members in source order; type hints in the description.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False

html_theme = "sphinx_book_theme"
html_title = f"jaxalgo {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["jaxalgo.css"]

# MathJax is served from the built site, not from a CDN, so the maths typesets offline (a cluster's login node, a
# laptop on a train): the MathJax 3 files of the sphinx-mathjax-offline package land in _static/mathjax.
_mathjax = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax is None or _mathjax.origin is None:
    raise RuntimeError("the docs build needs sphinx-mathjax-offline: pip install -e '.[docs]'")
html_static_path.append(os.path.join(os.path.dirname(_mathjax.origin), "static"))
mathjax_path = "mathjax/tex-chtml.js"

# Cross-references: a broken reference to a jaxalgo object is an error (with -W); objects of other libraries are
# not linked (no inventories are fetched: the build needs no network), so their names are exempt.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jaxlib|flax|optax|orbax|chex|numpy|np|jnp|nnx|typing|collections|os|argparse|pathlib)(\..*)?"),
    ("py:.*", r"(matplotlib|tensorboardX)(\..*)?"),
    ("py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|Hashable|None|NoneType|P|Path)"),
    ("py:.*", r"(int|float|str|bool|tuple|list|dict|set|frozenset|type|object|bytes|Ellipsis)"),
    # private modules and the names inside them are not documented: a reference to them stays plain text
    ("py:.*", r"jaxalgo(\.\w+)*\._\w+(\..*)?"),
]


def _drop_inherited_type_docs(app, what, name, obj, options, lines):
    """A module constant without a docstring of its own would show its type's docstring (dict, tuple, ...)."""
    if what in ("data", "attribute") and lines:
        own = type(obj).__doc__
        if own and "\n".join(lines).strip() == inspect.cleandoc(own).strip():
            lines[:] = []


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented by the class's ``Attributes:`` section, not as "Alias for field number"."""
    doc = getattr(obj, "__doc__", None) or ""
    if isinstance(doc, str) and doc.startswith("Alias for field number"):
        return True
    return None


def _inline_attribute(self):
    """Napoleon reads ``Type: description`` on the first line of a constant's docstring; jaxalgo's constants start
    with a sentence ("The strategy catalogue: ..."), so only a word-like type before the colon counts as a type."""
    line = self._lines.next()
    _type, colon, _desc = self._partition_field_on_colon(line)
    if not colon or not _desc or re.search(r"\w\s+\w", _type):
        _type, _desc = "", line
    descs = [_desc, *self._dedent(self._consume_to_end())]
    return _type, self.__class__(descs, self._config).lines()


GoogleDocstring._consume_inline_attribute = _inline_attribute


def _protocol_signature(app, what, name, obj, options, signature, return_annotation):
    """A Protocol (EstimatorOptions, StrategyOptions) is not instantiated: no ``(*args, **kwargs)`` signature."""
    if what == "class" and getattr(obj, "_is_protocol", False):
        return "", None
    return None


def _read_notebook(path):
    """The notebook in ``path`` as myst-nb reads it (its code cells and kernelspec key the cache), or None."""
    if path.suffix == ".ipynb":
        return nbformat.read(path, as_version=4)
    if path.suffix == ".md" and is_myst_markdown_notebook(path.read_text("utf8")):
        return myst_nb_reader_plugin(str(path))
    return None


def _execute_notebooks(app, env, docnames):
    """Executes the notebooks among the pages about to be read, ``-j N`` at a time, into the execution cache.

    Each kernel is a process of its own, so N threads here run N notebooks at once. A notebook that fails is
    not cached: myst-nb executes it again when it reads the page and fails the build with its traceback.
    """
    cache = get_cache(nb_execution_cache_path)
    pending = []
    for docname in sorted(docnames):
        path = Path(env.doc2path(docname))
        notebook = _read_notebook(path)
        if notebook is None:
            continue
        try:
            cache.match_cache_notebook(notebook)
        except KeyError:
            pending.append((path, notebook))
    pending.sort(key=lambda item: item[0].suffix != ".ipynb")  # the notebooks run longest: first, for a short tail
    workers = max(1, app.parallel)
    log = logging.getLogger(__name__)
    log.info(f"executing {len(pending)} notebooks, {workers} at a time")

    def execute(item):
        path, notebook = item
        try:
            return path, single_nb_execution(
                notebook, cwd=str(path.parent), timeout=nb_execution_timeout, allow_errors=False
            )
        except Exception:  # a kernel that does not start or dies: myst-nb's own execution reports it
            return path, None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, result in pool.map(execute, pending):
            if result is not None and result.err is None:
                bundle = CacheBundleIn(result.nb, str(path), data={"execution_seconds": result.time})
                cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
                log.info(f"executed {path.name} in {result.time:.1f} s")


def setup(app):
    app.connect("env-before-read-docs", _execute_notebooks)
    app.connect("autodoc-process-docstring", _drop_inherited_type_docs)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-signature", _protocol_signature)
