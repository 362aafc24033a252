"""Sphinx configuration of jaxalgo's documentation (build: see docs/README.md)."""

import importlib.util
import inspect
import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

from sphinx.ext.napoleon.docstring import GoogleDocstring

import jaxalgo

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
# The kernels inherit this process's environment: XLA's CPU backend compiles them at LLVM optimisation level 0
# unless XLA_FLAGS already sets one. The pages' programs are small and most of their time is compiling; the
# operations computed are the same (only the machine code is less optimised), so no figure on a page changes
# beyond float rounding; only the "notebook time" lines report this build's seconds.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

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


def setup(app):
    app.connect("autodoc-process-docstring", _drop_inherited_type_docs)
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-signature", _protocol_signature)
