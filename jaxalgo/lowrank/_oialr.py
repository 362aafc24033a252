"""OIALR: orthogonality-informed adaptive low-rank training, as steps between ordinary training steps.

The observation (Coquelin et al. 2024): after a short full-rank warm-up the singular vectors (the orthogonal bases)
of a layer's weight barely change any more; training mostly moves the singular values. OIALR therefore

1. trains full rank for ``delay`` steps;
2. converts every eligible weight ``W = U S V^T`` (:func:`convert`), freezing ``U`` and ``V`` and training the
   ``r x r`` matrix ``S`` (diagonal at conversion, dense afterwards) and the bias; the optimizer's moments are
   zeroed, its step count kept;
3. every ``stability_frequency`` steps (:func:`stability_check`): the SVD ``S = U_s diag(s) V_s^T`` gives the
   rotation ``U <- U U_s``, ``V <- V V_s``, ``S <- diag(s)`` (``W`` unchanged), and the rank is cut to the first
   index ``i`` with ``s_i < cutoff * s_0``, by at most half the rank per check, never below 1% of ``min(m, n)``,
   never up. Check ``k`` (1-based) covers the last ``ceil(min(1, k * window_growth) * L)`` converted layers,
   the window growing from the output end.

The moments of ``S`` are sliced to the kept block (the reference's behaviour); with ``rotate_moments=True`` they
are first expressed in the rotated basis: first moments ``U_s^T M V_s``, second moments ``(U_s^2)^T N (V_s^2)``
(the exact transform of ``E[g^2]`` when the gradient entries are uncorrelated; recognised by the optax field
name ``nu``).

Shapes change only here, outside jit. A cut layer keeps its storage arrays (zero-padded beyond its rank) until the
whole model's stored factors exceed ``bucket_ratio`` times the live ones; then every layer is compacted to its rank
at once (:func:`storage_sizes`), which bounds the number of re-compilations; the padding contributes
nothing to the output or to the gradients of the live block.

Fixed defects of the reference implementation: the biases of converted layers keep training; the cutoff is
compared with the singular values of ``S`` (a vector), not with the 2-D ``S``; the forward pass is factored.

References:
  Coquelin, Flügel, Weiel et al., "Harnessing orthogonality to train low-rank neural networks", ECAI 2024,
  arXiv 2401.08505.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalgo.lowrank._layers import LayerInfo, factorize_chain, layer_params, with_layer_params
from jaxalgo.lowrank._optim import keep_count, map_param_moments, trainable_part
from jaxalgo.lowrank._svd import check_cutoff, cutoff_rank, limited_rank
from jaxalgo.models import ChainFn, ChainParams


@dataclasses.dataclass(frozen=True)
class OIALRConfig:
    """OIALR's schedule and rules.

    Attributes:
      delay: full-rank steps before conversion (>= 0).
      stability_frequency: steps between stability checks (>= 1).
      cutoff: relative singular-value threshold in ``(0, 1)`` (paper: 0.15 to 0.2).
      max_cut_fraction: at most this fraction of a layer's rank is cut per check, in ``(0, 1]``.
      min_rank_fraction: ranks never go below ``max(1, ceil(min_rank_fraction * min(m, n)))``, in ``[0, 1]``.
      window_growth: fraction of converted layers added to the check window per check, in ``(0, 1]``.
      min_aspect: a weight is eligible when ``min(m, n) > min_aspect * max(m, n)``, in ``[0, 1)``.
      bucket_ratio: compact the storage when the stored factors exceed this many times the live ones (``>= 1``;
        1 stores every rank exactly, see :func:`storage_sizes`).
      rotate_moments: express the moments of ``S`` in the rotated basis before slicing them.
    """

    delay: int = 100
    stability_frequency: int = dataclasses.field(default=20, metadata={"flag": "lowrank_frequency"})
    cutoff: float = 0.15
    max_cut_fraction: float = 0.5
    min_rank_fraction: float = 0.01
    window_growth: float = 0.1
    min_aspect: float = 0.1
    bucket_ratio: float = 1.25
    rotate_moments: bool = False

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        if not (is_int(self.delay) and self.delay >= 0):
            raise ValueError(f"delay: must be an integer >= 0 (steps of full-rank warm-up), got {self.delay!r}")
        if not (is_int(self.stability_frequency) and self.stability_frequency >= 1):
            raise ValueError(f"stability_frequency: must be an integer >= 1, got {self.stability_frequency!r}")
        check_cutoff(self.cutoff)
        for name, low, high, closed_low in (
            ("max_cut_fraction", 0.0, 1.0, False),
            ("min_rank_fraction", 0.0, 1.0, True),
            ("window_growth", 0.0, 1.0, False),
        ):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and (low <= value if closed_low else low < value) and value <= high
            if not ok:
                bracket = "[" if closed_low else "("
                raise ValueError(f"{name}: must be a number in {bracket}{low}, {high}], got {value!r}")
        if not (isinstance(self.min_aspect, int | float) and 0.0 <= self.min_aspect < 1.0):
            raise ValueError(f"min_aspect: must be a number in [0, 1), got {self.min_aspect!r}")
        if not (isinstance(self.bucket_ratio, int | float) and self.bucket_ratio >= 1.0):
            raise ValueError(f"bucket_ratio: must be a number >= 1 (1 = exact shapes), got {self.bucket_ratio!r}")

    def min_rank(self, info: LayerInfo) -> int:
        return max(1, math.ceil(self.min_rank_fraction * info.full_rank))

    def checks_due(self, step: int) -> int:
        """How many stability checks a run has done after ``step`` steps."""
        return 0 if step <= self.delay else (step - self.delay) // self.stability_frequency


@dataclasses.dataclass(frozen=True)
class LowRankStatus:
    """Where OIALR is: converted or not, checks done, each converted layer's rank and storage size (JSON-able)."""

    converted: bool = False
    checks: int = 0
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"converted": self.converted, "checks": self.checks, "ranks": self.ranks, "sizes": self.sizes}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LowRankStatus:
        return cls(
            converted=bool(values["converted"]),
            checks=int(values["checks"]),
            ranks={k: int(v) for k, v in values["ranks"].items()},
            sizes={k: int(v) for k, v in values["sizes"].items()},
        )


def convert(
    fn: ChainFn,
    params: ChainParams,
    opt_state: Any,
    tx: optax.GradientTransformation,
    config: OIALRConfig,
    *,
    ranks: dict[str, tuple[int, int]] | None = None,
) -> tuple[ChainFn, ChainParams, Any, tuple[LayerInfo, ...], LowRankStatus]:
    """Converts the eligible layers to ``U S V^T`` and re-initialises the optimizer state, keeping its step count.

    Args:
      fn, params: the chain (dense).
      opt_state: the optimizer state for ``params`` (its ``count`` fields are kept).
      tx: the base optimizer (not wrapped in :func:`jaxalgo.lowrank.freeze_factors`).
      config: OIALR settings (``min_aspect`` decides eligibility).
      ranks: optional ``{layer: (rank, size)}`` to convert straight to truncated factors (used to rebuild a
        checkpoint's shapes); default full rank, an exact conversion.

    Returns:
      ``(fn, params, opt_state, layers, status)``; ``opt_state`` is ``tx``'s state on the trainable leaves.
    """
    new_fn, new_params, layers = factorize_chain(fn, params, min_aspect=config.min_aspect, ranks=ranks)
    new_state = keep_count(opt_state, tx.init(trainable_part(new_params)))
    ranks = ranks or {}
    status = LowRankStatus(
        converted=True,
        checks=0,
        ranks={i.name: ranks.get(i.name, (i.full_rank, i.full_rank))[0] for i in layers},
        sizes={i.name: ranks.get(i.name, (i.full_rank, i.full_rank))[1] for i in layers},
    )
    return new_fn, new_params, new_state, layers, status


def check_window(layers: tuple[LayerInfo, ...], check_number: int, growth: float) -> tuple[LayerInfo, ...]:
    """The layers stability check ``check_number`` (1-based) covers: the last ``ceil(min(1, k growth) L)``."""
    count = math.ceil(min(1.0, check_number * growth) * len(layers) - 1e-9)
    return layers[len(layers) - count :] if count else ()


def _rotation(s_block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    us, s, vst = np.linalg.svd(np.asarray(s_block, dtype=np.float64))
    return us, s, vst.T


def _embed(block: np.ndarray, size: int, dtype: Any) -> jax.Array:
    """``block`` in the top-left corner of a zero ``(size, size)`` array (built on the host: the shapes change at
    every cut, and eager device ops would compile once per new shape)."""
    out = np.zeros((size, size), np.float64)
    out[: block.shape[0], : block.shape[1]] = block
    return jnp.asarray(out, dtype)


def _columns(matrix: np.ndarray, size: int, dtype: Any) -> jax.Array:
    out = np.zeros((matrix.shape[0], size), np.float64)
    out[:, : matrix.shape[1]] = matrix
    return jnp.asarray(out, dtype)


def _stored_entries(info: LayerInfo, size: int) -> int:
    """Entries of ``U``, ``S``, ``V`` stored at ``size`` (proportional to the layer's factored cost)."""
    return size * (info.m + info.n + size)


def storage_sizes(
    layers: tuple[LayerInfo, ...], ranks: dict[str, int], sizes: dict[str, int], ratio: float
) -> dict[str, int]:
    """The storage size of every converted layer after a stability check: compaction of the whole model at once.

    Sizes stay as they are while the model's stored factor entries ``sum_l size_l (m_l + n_l + size_l)`` are at most
    ``ratio`` times the live ones (the same sum at the ranks); beyond that, every layer is compacted to its exact
    rank. Each compaction therefore shrinks the stored model by more than ``ratio``, which bounds the
    re-compilations by ``1 + log(entries at conversion / final entries) / log(ratio)`` whatever the number of layers
    and the order in which their ranks drop (per-layer buckets re-compile whenever any one layer crosses its next
    bucket). ``ratio == 1`` compacts at every cut (exact shapes).
    """
    stored = sum(_stored_entries(info, sizes[info.name]) for info in layers)
    live = sum(_stored_entries(info, ranks[info.name]) for info in layers)
    if stored > ratio * live:
        return {info.name: ranks[info.name] for info in layers}
    return dict(sizes)


def stability_check(
    params: ChainParams,
    opt_state: Any,
    tx: optax.GradientTransformation,
    layers: tuple[LayerInfo, ...],
    status: LowRankStatus,
    config: OIALRConfig,
) -> tuple[ChainParams, Any, LowRankStatus, dict[str, dict[str, Any]]]:
    """One OIALR stability check: rotate the window's layers onto the singular vectors of ``S`` and cut ranks.

    Args:
      params: parameters of the factorised chain.
      opt_state: the optimizer state (``tx``'s state on the trainable leaves).
      tx: the base optimizer.
      layers: the converted layers, input end first.
      status: the status before this check.
      config: OIALR settings.

    Returns:
      ``(params, opt_state, status, report)``; ``report[layer] = {"singular_values", "rank_before", "rank"}`` for
      the layers in the window.
    """
    if not status.converted:
        raise ValueError("status: the model has not been converted yet; call convert() first")
    check_number = status.checks + 1
    window = check_window(layers, check_number, config.window_growth)
    ranks, sizes = dict(status.ranks), dict(status.sizes)
    report: dict[str, dict[str, Any]] = {}
    rotations: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for info in window:
        r = ranks[info.name]
        us, s, vs = _rotation(np.asarray(layer_params(params, info)["S"])[:r, :r])
        new_r = limited_rank(
            r,
            cutoff_rank(s, config.cutoff),
            max_cut_fraction=config.max_cut_fraction,
            min_rank=config.min_rank(info),
        )
        rotations[info.name] = (us, s, vs)
        report[info.name] = {"singular_values": s.tolist(), "rank_before": r, "rank": new_r}
    new_ranks = {**ranks, **{name: entry["rank"] for name, entry in report.items()}}
    new_sizes = storage_sizes(layers, new_ranks, sizes, config.bucket_ratio)
    moment_fns: dict[str, Any] = {}
    for info in layers:
        name = info.name
        if name not in rotations and new_sizes[name] == sizes[name]:
            continue  # neither checked nor compacted: untouched
        values = layer_params(params, info)
        u, s_mat, v = values["U"], values["S"], values["V"]
        r, new_r, new_size = ranks[name], new_ranks[name], new_sizes[name]
        u_host, v_host = np.asarray(u[:, :r], np.float64), np.asarray(v[:, :r], np.float64)
        if name in rotations:  # rotate onto the singular vectors of S, keep the leading new_r
            us, s, vs = rotations[name]
            block = np.diag(s[:new_r])
        else:  # compaction only: the live block moves to smaller arrays unchanged
            us = vs = np.eye(r)
            block = np.asarray(s_mat, np.float64)[:r, :r]
        new_u = _columns(u_host @ us[:, :new_r], new_size, u.dtype)
        new_v = _columns(v_host @ vs[:, :new_r], new_size, v.dtype)
        new_s = _embed(block, new_size, s_mat.dtype)
        params = with_layer_params(params, info, {**values, "U": new_u, "S": new_s, "V": new_v})
        moment_fns[name] = (r, new_r, new_size, us, vs)
    ranks, sizes = new_ranks, new_sizes
    opt_state = _update_moments(params, opt_state, tx, layers, moment_fns, rotate=config.rotate_moments)
    status = LowRankStatus(converted=True, checks=check_number, ranks=ranks, sizes=sizes)
    return params, opt_state, status, report


def _s_paths(layers: tuple[LayerInfo, ...]) -> dict[tuple[Any, ...], str]:
    paths = {}
    for info in layers:
        keys = (jax.tree_util.SequenceKey(info.block), *(jax.tree_util.DictKey(k) for k in info.path))
        paths[(*keys, jax.tree_util.DictKey("S"))] = info.name
    return paths


def _update_moments(params, opt_state, tx, layers, moment_fns, *, rotate: bool):
    """Rotates (optionally) and slices the optimizer state entries of each checked layer's ``S``."""
    s_paths = {p: n for p, n in _s_paths(layers).items() if n in moment_fns}
    if rotate and s_paths:

        def rotate_leaf(path, leaf):
            for suffix, name in s_paths.items():
                if len(path) >= len(suffix) and tuple(path[len(path) - len(suffix) :]) == suffix:
                    r, _, _, us, vs = moment_fns[name]
                    host = np.array(leaf, np.float64)
                    block = host[:r, :r]
                    second = any(getattr(k, "name", None) == "nu" for k in path)
                    host[:r, :r] = (us**2).T @ block @ (vs**2) if second else us.T @ block @ vs
                    return jnp.asarray(host, leaf.dtype)
            return leaf

        opt_state = jax.tree_util.tree_map_with_path(rotate_leaf, opt_state)

    def slicer_for(path, _leaf):
        name = s_paths.get(tuple(path))
        if name is None:
            return _unchanged
        _, new_r, new_size, _, _ = moment_fns[name]
        return lambda leaf: _embed(np.asarray(leaf, np.float64)[:new_r, :new_r], new_size, leaf.dtype)

    slicers = jax.tree_util.tree_map_with_path(slicer_for, trainable_part(params))
    return map_param_moments(tx, lambda leaf, slicer: slicer(leaf), opt_state, slicers)


def _unchanged(leaf: jax.Array) -> jax.Array:
    return leaf


def trainable_counts(layers: tuple[LayerInfo, ...], status: LowRankStatus) -> dict[str, int]:
    """Trainable and dense parameter counts of the converted layers: ``{"trainable", "dense"}``.

    A converted layer trains ``r^2 + bias`` parameters (``S`` and the bias) in place of ``m n + bias``; before
    conversion both counts are the dense ones.
    """
    dense = sum(i.m * i.n + i.bias_size for i in layers)
    if not status.converted:
        return {"trainable": dense, "dense": dense}
    trainable = sum(status.ranks[i.name] ** 2 + i.bias_size for i in layers)
    return {"trainable": trainable, "dense": dense}
