"""The run configuration: a few core fields and one :class:`Choice` per family, generated from the catalogues.

A family is a catalogue of named entries (:mod:`jaxalgo.options`): models, estimators, optimizers, parallel
strategies and low-rank methods. A :class:`RunConfig` holds, for each family, the chosen name and an instance of
that entry's options dataclass, which alone defines the defaults and the validation. The flat *flag view* of a
configuration (``{"estimator": "frog", "tangents": 16, "daso_global_skip": 4, ...}``: the core fields, the family
names and the chosen entries' free fields under their flag names) is what the command line parses, what
checkpoints record and what :meth:`RunConfig.fingerprint` compares, so a refused ``--resume`` names the flag that
differs.

This module knows no algorithm: it only reads the catalogues.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from jaxalgo import data, grads, losses, lowrank, models, optimizers, parallel
from jaxalgo.data._split import Standardize
from jaxalgo.options import Entry, Flag, attribute_docs, check_fields, flags_of, from_flags, pick, to_flags

FamilyName = Literal["model", "estimator", "optimizer", "parallel", "lowrank"]
"""The families of choices of a run (the :class:`RunConfig` fields that hold a :class:`Choice`)."""
FAMILY_NAMES: tuple[FamilyName, ...] = typing.get_args(FamilyName)


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of choices: its catalogue and the noun of its errors.

    Attributes:
      name: the configuration field and flag (``estimator``).
      default: the default entry's name.
      entries: the catalogue.
      noun: what an unknown name is called in errors (``unknown mode 'x'``).
      find: how a name is looked up, when more than the catalogue's names are allowed (models: ``module:function``).
    """

    name: FamilyName
    default: str
    entries: Mapping[str, Entry]
    noun: str
    find: Callable[[str], Entry] | None = None

    def lookup(self, name: str) -> Entry:
        if self.find is not None:
            return self.find(name)
        return pick(self.entries, name, family=self.name, noun=self.noun)


FAMILIES: tuple[Family, ...] = (
    Family("model", "mlp", models.MODELS, "model", find=models.model_entry),
    Family("estimator", "backprop", grads.ESTIMATORS, "estimator"),
    Family("optimizer", "adam", optimizers.OPTIMIZERS, "optimizer"),
    Family("parallel", "none", parallel.STRATEGIES, "mode"),
    Family("lowrank", "none", lowrank.LOWRANK, "method"),
)
assert tuple(f.name for f in FAMILIES) == FAMILY_NAMES

# Fields that may differ between a checkpointed run and the run that resumes it: they do not change what has
# been computed so far, or are meant to change (the learning rate, to recover from a divergence).
RESUMABLE_FIELDS: frozenset[str] = frozenset(
    {"epochs", "quiet", "checkpoint_every", "keep_checkpoints", "data_dir", "log_every", "lr", "tensorboard"}
)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A family's chosen entry: its name and its options (an instance of the entry's options class)."""

    name: str
    options: Any

    def entry(self, family: Family) -> Entry:
        return family.lookup(self.name)


def _family(name: str) -> Family:
    if name not in FAMILY_NAMES:
        raise ValueError(f"family: unknown family {name!r}; allowed: {', '.join(FAMILY_NAMES)}")
    return FAMILIES[FAMILY_NAMES.index(name)]


def _default_choice(family_name: FamilyName) -> Choice:
    family = _family(family_name)
    return Choice(family.default, family.lookup(family.default).make())


def _choice_field(family_name: FamilyName):
    return dataclasses.field(default_factory=lambda: _default_choice(family_name))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on. Every field has a default that trains digits well.

    The family fields (``model``, ``estimator``, ``optimizer``, ``parallel``, ``lowrank``) are :class:`Choice` s; a
    bare name is accepted and takes the entry's default options. Build a configuration from flag values with
    :meth:`from_flags` (``RunConfig.from_flags(estimator="frog", tangents=4, lr=10.0)``).

    Attributes:
      dataset: data set, one of jaxalgo.data.DATASETS, or a loader module:function returning a jaxalgo.data.Dataset
        (called with seed, test_fraction and data_dir).
      data_dir: directory with local files (mnist, fashion_mnist, cifar10), or the cache of mnist1d.
      test_fraction: held-out fraction of the bundled data sets, in (0, 1).
      standardize: input standardisation, fitted on the train split: channel (one mean/std per channel: per
        feature for tables, one for one-channel images such as digits), feature (per input element, e.g. per
        pixel) or global (one over all elements).
      loss: output loss: auto (cross-entropy or MSE by task) or one of jaxalgo.losses.LOSSES.
      epochs: passes over the training split (>= 1).
      batch_size: examples per step (1 <= batch_size <= training examples; the last partial batch is dropped).
      seed: seeds the model init, the data order, every step's key and the estimator's own randomness.
      checkpoint_every: save a checkpoint every this many steps (0: every epoch); one is always saved at the end.
      keep_checkpoints: how many checkpoints to keep (>= 1).
      log_every: steps between progress-bar updates and finite-loss checks (>= 1).
      quiet: no progress bar and no summary table.
      tensorboard: also write TensorBoard event files of the metrics to WORKDIR/tensorboard (needs
        jaxalgo[tensorboard]).
      compute_dtype: dtype of activations and matmuls (float32, or bfloat16 with float32 parameters and optimizer
        state).
      model: the model and its options.
      estimator: the gradient estimator and its options.
      optimizer: the optax optimizer and its options.
      parallel: the way of training on devices: none, ddp, daso or ab.
      lowrank: the low-rank method: none or oialr.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    test_fraction: float = 0.2
    standardize: Standardize = "channel"
    loss: typing.Literal["auto", losses.LossName] = "auto"
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    quiet: bool = False
    tensorboard: bool = False
    compute_dtype: typing.Literal["float32", "bfloat16"] = "float32"
    model: Choice = _choice_field("model")
    estimator: Choice = _choice_field("estimator")
    optimizer: Choice = _choice_field("optimizer")
    parallel: Choice = _choice_field("parallel")
    lowrank: Choice = _choice_field("lowrank")

    def __post_init__(self):
        for family in FAMILIES:
            value = getattr(self, family.name)
            if isinstance(value, str):
                object.__setattr__(self, family.name, Choice(value, family.lookup(value).make()))
            elif not isinstance(value, Choice):
                raise ValueError(f"{family.name}: expected a name or a Choice, got {value!r}")
            _check_choice(family, getattr(self, family.name))
        _check_core(self)

    # -- the flag view ------------------------------------------------------------------------------------------

    @classmethod
    def from_flags(cls, values: Mapping[str, Any] | None = None, /, *, strict: bool = True, **flags: Any) -> RunConfig:
        """The configuration of flat flag values (absent ones take their defaults).

        Args:
          values, flags: core fields, family names (``estimator="frog"``) and option flags (``tangents=4``).
          strict: refuse a flag that belongs to an entry that is not chosen (``mesh`` without ``parallel``) or that
            the chosen entry pins to another value; ``False`` ignores them (old checkpoint records hold every field).

        Raises:
          ValueError: naming the flag, the value and what is allowed.
        """
        values = {**(values or {}), **flags}
        core = {f.name for f in dataclasses.fields(cls) if f.name not in FAMILY_NAMES}
        known = core | set(FAMILY_NAMES) | set(_every_flag())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; allowed: {sorted(known)}")
        choices: dict[str, Any] = {}
        for family in FAMILIES:
            name = values.get(family.name, family.default)
            entry = family.lookup(name)
            if strict:
                _check_applicable(family, name, entry, values)
            choices[family.name] = Choice(name, from_flags(entry, values))
        return cls(**{k: v for k, v in values.items() if k in core}, **choices)

    def flags(self) -> dict[str, Any]:
        """The flat flag view: core fields, family names and the chosen entries' free fields (JSON-able)."""
        view: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Choice):
                view[field.name] = value.name
                view.update(to_flags(value.entry(_family(field.name)), value.options))
            else:
                view[field.name] = value
        return view

    def with_flags(self, **changes: Any) -> RunConfig:
        """This configuration with some flags changed (a family changed to another entry drops the old entry's
        flags): ``config.with_flags(estimator="f3", f3_variant="delayed_loss")``."""
        view = self.flags()
        for family in FAMILIES:
            if family.name in changes and changes[family.name] != view[family.name]:
                for flag in self.entry(family.name).flags:
                    view.pop(flag.name, None)
        return RunConfig.from_flags({**view, **changes})

    def to_dict(self) -> dict[str, Any]:
        return self.flags()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """The configuration of a recorded flag view (lenient: old records hold the fields of every entry)."""
        return cls.from_flags(values, strict=False)

    def fingerprint(self) -> dict[str, Any]:
        """The flags a checkpoint must agree on to be resumed by this config."""
        return {k: v for k, v in self.flags().items() if k not in RESUMABLE_FIELDS}

    def entry(self, family: FamilyName) -> Entry:
        """The catalogue entry chosen for ``family`` (``config.entry("estimator")``), one of :data:`FAMILY_NAMES`."""
        checked = _family(family)  # first: a ValueError naming the families, for any other name
        return getattr(self, family).entry(checked)


def _every_flag() -> dict[str, list[tuple[Family, str]]]:
    """``{flag: [(family, entry name), ...]}`` over every entry of every family (pinned fields included)."""
    owners: dict[str, list[tuple[Family, str]]] = {}
    for family in FAMILIES:
        for name, entry in family.entries.items():
            for flag in flags_of(entry.options, entry.prefix):
                owners.setdefault(flag.name, []).append((family, name))
    return owners


def _check_applicable(family: Family, name: str, entry: Entry, values: Mapping[str, Any]) -> None:
    """Refuses a flag of this family that the chosen entry does not take, or pins to another value."""
    free = {f.name for f in entry.flags}
    pinned = {f.name: f.path[0] for f in flags_of(entry.options, entry.prefix) if f.path[0] in entry.fixed}
    for flag, owners in _every_flag().items():
        if flag not in values or flag in free or all(owner is not family for owner, _ in owners):
            continue
        if flag in pinned:
            fixed = entry.fixed[pinned[flag]]
            if values[flag] == fixed:
                continue
            raise ValueError(
                f"{flag}: {family.name} {name!r} always uses {fixed!r}, got {values[flag]!r}; choose another "
                f"{family.name} (one that leaves {flag} free: "
                f"{', '.join(n for n, e in family.entries.items() if any(f.name == flag for f in e.flags))})"
            )
        if any(owner is not family for owner, _ in owners):
            continue  # the flag also belongs to another family, which takes it
        takers = ", ".join(n for _, n in owners)
        raise ValueError(f"{flag}: {values[flag]!r} is given but {family.name} is {name!r}; it applies to {takers}")


def _check_choice(family: Family, choice: Choice) -> None:
    entry = family.lookup(choice.name)
    if not isinstance(choice.options, entry.options):
        raise ValueError(
            f"{family.name}: {choice.name!r} takes {entry.options.__name__}, got {type(choice.options).__name__}"
        )
    for field, value in entry.fixed.items():
        if getattr(choice.options, field) != value:
            raise ValueError(f"{field}: {family.name} {choice.name!r} always uses {value!r}, got a different value")


def _check_core(config: RunConfig) -> None:
    """The core fields' types and ranges; raises ValueError naming the field."""
    if ":" in config.dataset and config.standardize != "channel":
        raise ValueError(
            f"standardize: got {config.standardize!r} for the user loader {config.dataset!r}, which standardises "
            "its own data; allowed: channel (the default)"
        )
    # The loss before check_fields, so that an unknown one is reported as such (check_fields words it generically).
    if config.loss != "auto" and config.loss not in losses.LOSSES:
        raise ValueError(f"loss: unknown loss {config.loss!r}; allowed: auto, {', '.join(losses.LOSSES)}")
    check_fields(config)
    for name, low in (("epochs", 1), ("batch_size", 1), ("keep_checkpoints", 1), ("log_every", 1)):
        if getattr(config, name) < low:
            raise ValueError(f"{name}: must be an integer >= {low}, got {getattr(config, name)!r}")
    if config.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: must be >= 0 (0 = every epoch), got {config.checkpoint_every!r}")
    if not (math.isfinite(config.test_fraction) and 0.0 < config.test_fraction < 1.0):
        raise ValueError(f"test_fraction: must be in (0, 1), got {config.test_fraction!r}")
    if ":" not in config.dataset and config.dataset not in data.DATASETS:
        raise ValueError(
            f"dataset: unknown data set {config.dataset!r}; allowed: {', '.join(data.DATASETS)}, or module:function"
        )


_CORE: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in FAMILY_NAMES)


def core_flags():
    """The flags of the core fields (for the command line), with their docstring help."""
    hints, docs = typing.get_type_hints(RunConfig), attribute_docs(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    return tuple(Flag(name, (name,), hints[name], fields[name].default, docs.get(name, "")) for name in _CORE)


def dumps(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "RESUMABLE_FIELDS",
    "Choice",
    "Family",
    "RunConfig",
    "core_flags",
    "dumps",
]
