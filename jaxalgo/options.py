"""Options dataclasses and catalogues: how every family names its algorithms, once.

Every algorithm (an estimator, a parallel strategy, a low-rank method, a model, an optimizer) has one frozen
dataclass of options beside its code. That dataclass is the single source of

- the defaults (its field defaults),
- the validation (its ``__post_init__``; :func:`check_fields` checks the annotated types and ``Literal`` choices,
  so an error names the field, the value and what is allowed),
- the documentation (its docstring's ``Attributes:`` section, which also becomes the ``--help`` text).

A **catalogue** maps the names a user types to :class:`Entry` s: an options class plus the fields its name pins,
so that named variants are presets (``frog`` is the forward gradient with
``aggregation="orthogonal_projection"``, as optax's ``nadam`` is ``adam`` with ``nesterov=True``). The command
line and the run configuration are generated from the entries: each free field is a flag, named
``prefix + field`` (or the field's ``flag`` metadata), with its type from the annotation, its choices from a
``Literal`` and its help from the docstring. A field whose type is itself an options dataclass is flattened into
flags with its own prefix (its ``prefix`` metadata).

This module knows no algorithm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import operator
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np


def option(default: Any = dataclasses.MISSING, *, flag: str | None = None, prefix: str | None = None, **kwargs):
    """A dataclass field with flag metadata: ``flag`` spells its command-line name (without the family prefix
    rule), ``prefix`` is the prefix of a nested options dataclass's flags."""
    metadata = dict(kwargs.pop("metadata", {}))
    if flag is not None:
        metadata["flag"] = flag
    if prefix is not None:
        metadata["prefix"] = prefix
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag of an options class.

    Attributes:
      name: the flag's name with underscores (``daso_global_skip`` is ``--daso-global-skip``).
      path: the field names from the options class down to the field (nested options dataclasses).
      type: the field's resolved annotation.
      default: the field's default.
      help: the field's line of its class's ``Attributes:`` docstring.
    """

    name: str
    path: tuple[str, ...]
    type: Any
    default: Any
    help: str

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A catalogue entry: an options class, the fields its name pins (a preset) and its flags' prefix.

    Attributes:
      options: a frozen dataclass with defaults for every field; its ``__post_init__`` validates.
      fixed: the fields this entry pins, which are not flags (``{"aggregation": "mean"}``).
      prefix: prefix of the flag names of its fields (``"daso_"``); a field's ``flag`` metadata overrides it.
      help: one line for ``--help``.
    """

    options: type
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prefix: str = ""
    help: str = ""

    def make(self, **values: Any) -> Any:
        """The options with the given field values and this entry's pinned ones."""
        pinned = sorted(set(values) & set(self.fixed))
        if pinned:
            field = pinned[0]
            raise ValueError(f"{field}: fixed to {self.fixed[field]!r} by this choice; got {values[field]!r}")
        return self.options(**values, **self.fixed)

    @property
    def flags(self) -> tuple[Flag, ...]:
        """The flags of the fields this entry leaves free."""
        return tuple(f for f in flags_of(self.options, self.prefix) if f.path[0] not in self.fixed)


Catalogue = Mapping[str, Entry]


def pick(catalogue: Catalogue, name: Any, *, family: str, noun: str | None = None) -> Entry:
    """The entry called ``name``, or a ValueError naming the family, the value and the allowed names."""
    if not isinstance(name, str) or name not in catalogue:
        raise ValueError(f"{family}: unknown {noun or family} {name!r}; allowed: {', '.join(catalogue)}")
    return catalogue[name]


def import_object(target: str, *, argument: str) -> Any:
    """The callable named ``"package.module:attribute"``; a ValueError naming ``argument`` when it cannot be had."""
    module_name, sep, attribute = target.partition(":")
    if not (sep and module_name and attribute):
        raise ValueError(f"{argument}: expected 'module:function', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{argument}: cannot import module {module_name!r} of {target!r} ({error})") from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise ValueError(f"{argument}: module {module_name!r} has no callable {attribute!r}")
    return found


# -- fields, types and docstrings -----------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.init)


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` sections of a class's docstring and its bases' (continuation lines
    joined; a subclass's line wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_own_attribute_docs(klass.__dict__.get("__doc__") or ""))
    return docs


def _own_attribute_docs(doc: str) -> dict[str, str]:
    _, found, section = doc.partition("Attributes:")
    if not found:
        return {}
    docs: dict[str, str] = {}
    current, indent = None, 0
    for line in section.splitlines()[1:]:
        match = re.match(r"^(\s+)(\w+): (.*)$", line)
        if match and (current is None or len(match.group(1)) <= indent):
            indent, current = len(match.group(1)), match.group(2)
            docs[current] = match.group(3).strip()
        elif line.strip() and current is not None:
            docs[current] += " " + line.strip()
        elif not line.strip() and docs:
            break
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{field.name}: options fields need a default")


def is_options_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def flags_of(cls: type, prefix: str = "") -> tuple[Flag, ...]:
    """Every flag of an options class: one per field, nested options dataclasses flattened."""
    flags: list[Flag] = []
    docs = attribute_docs(cls)
    for field in _init_fields(cls):
        tp = _hints(cls)[field.name]
        if is_options_class(tp):
            inner_prefix = field.metadata.get("prefix", prefix)
            for inner in flags_of(tp, inner_prefix):
                flags.append(dataclasses.replace(inner, path=(field.name, *inner.path)))
            continue
        name = field.metadata.get("flag", prefix + field.name)
        flags.append(Flag(name, (field.name,), tp, _default(field), docs.get(field.name, "")))
    return tuple(flags)


def _optional(tp: Any) -> tuple[Any, bool]:
    """``(inner type, allows None)`` for ``X | None``."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return functools.reduce(operator.or_, rest), True
    return tp, False


def describe(tp: Any) -> str:
    """What values a type allows, in words."""
    inner, optional = _optional(tp)
    if typing.get_origin(inner) is Literal:
        text = ", ".join(str(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is tuple:
        text = "a sequence of integers" if typing.get_args(inner)[0] is int else "a sequence"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(inner, str(inner))
    return text + (" or None" if optional else "")


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotated type (ints count as floats; bools are not numbers)."""
    inner, optional = _optional(tp)
    if value is None:
        return optional
    origin = typing.get_origin(inner)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(inner))
    if origin is tuple:
        item = typing.get_args(inner)[0]
        return isinstance(value, tuple) and all(conforms(v, item) for v in value)
    if inner is bool:
        return isinstance(value, bool | np.bool_)
    if inner is int:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    return True  # other annotations (callables, arrays) are the class's own business


def check_fields(obj: Any) -> None:
    """Raises ValueError naming the first field of an options dataclass whose value is not of its annotated type
    (or not one of its ``Literal`` choices). Call it first in ``__post_init__``."""
    cls: type = type(obj)
    for field in _init_fields(cls):
        tp = _hints(cls)[field.name]
        value = getattr(obj, field.name)
        if is_options_class(tp):
            if not isinstance(value, tp):
                raise ValueError(f"{field.name}: expected {tp.__name__}, got {value!r}")
        elif not conforms(value, tp):
            raise ValueError(f"{field.name}: got {value!r}; allowed: {describe(tp)}")


# -- options <-> flat flag values -------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def to_flags(entry: Entry, options: Any) -> dict[str, Any]:
    """The values of ``entry``'s free flags in ``options`` (JSON-able)."""
    values = {}
    for flag in entry.flags:
        value = options
        for name in flag.path:
            value = getattr(value, name)
        values[flag.name] = jsonable(value)
    return values


def _coerce(value: Any, tp: Any) -> Any:
    """JSON lists back to tuples for tuple-typed fields."""
    inner, _ = _optional(tp)
    if typing.get_origin(inner) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _renamed(error: ValueError, names: Mapping[str, str]) -> ValueError:
    """``error`` with its leading ``field:`` replaced by the field's flag name."""
    field, sep, rest = str(error).partition(":")
    if sep and field in names and names[field] != field:
        return ValueError(f"{names[field]}:{rest}")
    return error


def _build(cls: type, flags: tuple[Flag, ...], values: Mapping[str, Any], fixed: Mapping[str, Any], depth: int):
    kwargs: dict[str, Any] = dict(fixed) if depth == 0 else {}
    names = {f.path[depth]: f.name for f in flags if len(f.path) == depth + 1}
    for field in _init_fields(cls):
        tp = _hints(cls)[field.name]
        if field.name in kwargs:
            continue
        if is_options_class(tp):
            inner = tuple(f for f in flags if len(f.path) > depth + 1 and f.path[depth] == field.name)
            kwargs[field.name] = _build(tp, inner, values, {}, depth + 1)
        elif field.name in names and names[field.name] in values:
            kwargs[field.name] = _coerce(values[names[field.name]], tp)
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise _renamed(error, names) from None


@contextlib.contextmanager
def errors_as_flags(entry: Entry):
    """Re-raises a ValueError whose leading ``field:`` is one of ``entry``'s fields under the field's flag name
    (for errors raised while building from the options, e.g. a ViT's patch size that does not divide the image)."""
    names = {f.path[-1]: f.name for f in entry.flags}
    try:
        yield
    except ValueError as error:
        raise _renamed(error, names) from None


def from_flags(entry: Entry, values: Mapping[str, Any]) -> Any:
    """``entry``'s options from flat flag values (absent flags take their defaults). A validation error names
    the flag (``daso_global_skip: ...``), not the field."""
    return _build(entry.options, entry.flags, values, entry.fixed, 0)


# -- argparse ---------------------------------------------------------------------------------------------------


def _parse_optional(parse):
    def parse_text(text: str) -> Any:
        return None if text.strip().lower() == "none" else parse(text)

    parse_text.__name__ = getattr(parse, "__name__", "value")
    return parse_text


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated integers, got {text!r}")
    return values


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def argparse_kwargs(flag: Flag) -> dict[str, Any]:
    """``add_argument`` keywords for a flag (``default`` is left to the caller)."""
    inner, optional = _optional(flag.type)
    help_text = flag.help or flag.name
    extra = f" (default: {_show(flag.default)})"
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text + extra}
    if typing.get_origin(inner) is Literal:
        choices = [str(c) for c in typing.get_args(inner)]
        return {"choices": choices, "help": help_text + extra, "metavar": "{" + ",".join(choices) + "}"}
    if typing.get_origin(inner) is tuple:
        parse = _int_tuple
    else:
        parse = {int: int, float: float}.get(inner, str)
    return {"type": _parse_optional(parse) if optional else parse, "help": help_text + extra}


def add_flags(group: Any, flags: Sequence[Flag]) -> None:
    """Adds one argument per flag to an argparse group; absent flags stay absent from the namespace."""
    for flag in flags:
        group.add_argument(flag.cli, dest=flag.name, default=argparse.SUPPRESS, **argparse_kwargs(flag))


__all__ = [
    "Catalogue",
    "Entry",
    "Flag",
    "add_flags",
    "argparse_kwargs",
    "attribute_docs",
    "check_fields",
    "conforms",
    "describe",
    "errors_as_flags",
    "flags_of",
    "from_flags",
    "import_object",
    "is_options_class",
    "jsonable",
    "option",
    "pick",
    "to_flags",
]
