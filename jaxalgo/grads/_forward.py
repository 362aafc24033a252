"""Multi-tangent forward gradients with dense tangents (weight perturbation): sum, mean and FROG.

With ``k`` tangents ``v_1 .. v_k`` over the whole parameter vector (rows of ``V``, ``k x n``; see
:mod:`jaxalgo.grads._tangents`) and the directional derivatives ``d_i = <grad f, v_i>`` from forward-mode AD, the
estimate is ``g = V^T c`` with (see :mod:`jaxalgo.grads._combine`)

- ``sum``: ``c = d``;  ``mean``: ``c = d / k`` (unbiased: ``E[v v^T] = I``);
- ``orthogonal_projection`` (FROG): ``c = (V V^T)^{-1} d``, so ``g`` is the orthogonal projection of ``grad f``
  onto ``span(v_i)``: exact for ``k = n``, ``cos(g, grad f) = |g| / |grad f|``, ``E[g] = (k / n) grad f``.

The primal is computed once (``jax.linearize``); the ``k`` Jacobian-vector products reuse its residuals.

Batching strategies and the memory each holds besides the linearised primal (``n`` parameters, ``k`` tangents,
``A`` the activation memory of one JVP, ``B = min(2**12, n)`` a coordinate block):

======== ========================================================== ==============================
strategy what it does                                               extra memory
======== ========================================================== ==============================
vmap     draws ``V`` once (tangent by tangent into one buffer);   ``k n + k A``
         the k JVPs together; ``V V^T``, ``V^T c``
scan     one tangent at a time (drawn, pushed, dropped); Gram and   ``n + A + k B``
         estimate by coordinate blocks, redrawing ``V`` block by
         block (no ``k x n`` matrix)
chunk    ``chunk_size = c`` tangents at a time (drawn one by one), ``c n + c A + k B``
         otherwise as scan
======== ========================================================== ==============================

With ``scan`` and ``chunk``, ``sum`` and ``mean`` draw each tangent once: the pass that pushes it also adds
``c_i v_i`` to the estimate (``c_i`` depends on ``d_i`` and ``|v_i|`` only), holding ``n`` more numbers. The
projection draws each tangent three times (JVP pass, Gram pass, estimate pass), since its coefficients need every
``d_i`` and the whole Gram matrix; so does the split form (the directional derivatives are reduced across devices
between its two halves). ``vmap`` draws once. All strategies give the same estimate for the same key (up to
rounding).

How ``d`` is obtained is a *directional source* (:data:`Source`): forward-mode AD here, two forward evaluations
in :func:`jaxalgo.grads._zo.zeroth_order`; the tangents, the batching and the aggregation (:class:`DenseTangents`)
are shared, so both estimators draw the same tangents for a key and combine their ``d`` the same way.

``mode="simulated"`` replaces the JVPs by ``d = V grad f`` with ``grad f`` from backprop: the estimator the
reference runs for its networks, kept as a test oracle and for parity with the paper, not as a default.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
  Baydin et al., "Gradients without Backpropagation", arXiv 2202.08587, 2022.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from jaxalgo.grads import _combine, _tangents
from jaxalgo.grads._combine import Aggregation
from jaxalgo.grads._estimator import (
    Batch,
    DirectionalSplit,
    EmptyState,
    Estimator,
    Params,
    Problem,
    check_float_params,
    check_scalar_loss,
    stateless_init,
)
from jaxalgo.grads._rank1 import rank1_forward_gradient
from jaxalgo.grads._tangents import Distribution, FlatLayout
from jaxalgo.options import check_fields, option

Tangents = Literal[Distribution, "rank1"]
"""The tangents of a weight-perturbation forward gradient: dense Gaussian or Rademacher, or structured rank-1."""
TANGENTS: tuple[Tangents, ...] = typing.get_args(Tangents)
Batching = Literal["vmap", "scan", "chunk"]
"""How a dense-tangent estimator goes through its tangents: all at once, one at a time, or ``chunk_size`` at a time."""
BATCHINGS: tuple[Batching, ...] = typing.get_args(Batching)
ForwardMode = Literal["forward", "simulated"]
"""How the directional derivatives are computed: by forward-mode AD, or from backprop's gradient (a test oracle)."""
MODES: tuple[ForwardMode, ...] = typing.get_args(ForwardMode)


# -- validation (shared with the zeroth-order estimator and the options classes) ----------------------------------


def check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")


def check_choice(name: str, what: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raises ``ValueError("name: unknown what 'value'; allowed: ...")`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def check_flags(**flags: Any) -> None:
    """Raises ValueError naming the first argument that is not ``True`` or ``False``."""
    for name, value in flags.items():
        if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy's bool counts
            raise ValueError(f"{name}: must be True or False, got {value!r}")


def check_batching(batching: Any, chunk_size: Any) -> None:
    """``batching`` one of :data:`BATCHINGS`; ``chunk_size`` an integer >= 1 with ``"chunk"``, else None."""
    check_choice("batching", "batching", batching, BATCHINGS)
    if batching == "chunk":
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: batching='chunk' needs an integer chunk_size >= 1, got {chunk_size!r}")
    elif chunk_size is not None:
        raise ValueError(f"chunk_size: only used with batching='chunk' (got batching={batching!r}); leave it None")


def _check_rank1_options(
    normalize_tangents: bool, batching: Batching, mode: ForwardMode, name: str = "tangents"
) -> None:
    if normalize_tangents:
        raise ValueError(f"normalize_tangents: not supported with {name}='rank1'; use False")
    if batching == "chunk":
        raise ValueError(f"batching: {name}='rank1' supports 'vmap' and 'scan', not 'chunk'")
    if mode != "forward":
        raise ValueError(f"mode: {name}='rank1' supports mode='forward' only, got {mode!r}")


def check_forward_options(
    *,
    num_tangents: Any,
    aggregation: Any,
    tangents: Any,
    normalize_tangents: Any,
    scaling_correction: Any,
    batching: Any,
    chunk_size: Any,
    has_aux: Any = False,
    mode: Any = "forward",
    tangents_name: str = "tangents",
) -> None:
    """Every check of :func:`forward_gradient`'s options (``tangents_name`` is how the caller spells
    ``tangents``: ``tangent_dist`` in :class:`ForwardOptions`); errors name the argument, the value and what is
    allowed."""
    _combine.check_num_tangents(num_tangents)
    _combine.check_aggregation(aggregation)
    check_choice(tangents_name, "tangent distribution", tangents, TANGENTS)
    check_choice("batching", "batching", batching, BATCHINGS)
    check_choice("mode", "mode", mode, MODES)
    check_flags(normalize_tangents=normalize_tangents, scaling_correction=scaling_correction, has_aux=has_aux)
    if tangents == "rank1":
        _check_rank1_options(normalize_tangents, batching, mode, tangents_name)
    check_batching(batching, chunk_size)


# -- tangents, pushed and combined -----------------------------------------------------------------------------


Push = Callable[[list[jax.Array], jax.Array], jax.Array]
Source = Callable[[Params, Batch], tuple[Any, Push]]
"""How a dense estimator gets its directional derivatives: ``out, push = source(params, batch)``, with ``out`` the
loss output at ``params`` (a scalar, or ``(scalar, aux)``) and ``push(v_leaves, v_flat)`` the directional
derivative along one tangent, given both as leaves in the params' dtypes and as one flat vector in the compute
dtype. ``push`` may be ``vmap``-ed over tangents."""


def checked_loss(loss_fn: Callable[..., Any], has_aux: bool) -> Callable[[Params, Batch], Any]:
    """``loss_fn`` that checks (at trace time) that it returns a floating scalar, or ``(scalar, aux)``."""

    def checked(params, batch):
        out = loss_fn(params, batch)
        check_scalar_loss(out, has_aux=has_aux)
        return out

    return checked


def _fold_tangents(
    add: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    total: Any,
    keys: jax.Array,
    batching: Batching,
    chunk_size: int | None,
) -> tuple[Any, jax.Array]:
    """``(total, d)`` after ``total, d_chunk = add(total, chunk_keys)`` over the keys, one at a time (``scan``) or
    ``chunk_size`` at a time (``chunk``; the last chunk may be shorter); ``d`` stacks the chunks' ``d_chunk``.
    ``total`` may be ``None`` (a plain map)."""
    k = keys.shape[0]
    if batching == "scan":
        c = 1
    elif chunk_size is None:
        raise ValueError(f"chunk_size: needed with batching={batching!r}, got None")
    else:
        c = min(chunk_size, k)
    full = (k // c) * c
    parts = []
    if full:
        total, d = jax.lax.scan(add, total, keys[:full].reshape(k // c, c, *keys.shape[1:]))
        parts.append(d.reshape(full, *d.shape[2:]))
    if full < k:
        total, d = add(total, keys[full:])
        parts.append(d)
    return total, parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _vary_like(tangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``tangent`` marked as varying over the ``shard_map`` axes ``primal`` varies over (a no-op outside
    ``shard_map``): inside a data-parallel step the parameters are per-device values while the tangents, drawn from
    the shared key, are not, and ``jax.linearize`` wants tangents typed like the primals."""
    missing = tuple(
        frozenset(jax.typeof(primal).manual_axis_type.varying) - frozenset(jax.typeof(tangent).manual_axis_type.varying)
    )
    return jax.lax.pcast(tangent, missing, to="varying") if missing else tangent


def _linearized(loss_fn: Callable[..., Any], has_aux: bool, mode: ForwardMode) -> Source:
    """The forward gradient's :data:`Source`: ``jax.linearize`` (the primal once, one JVP per tangent), or
    ``d = <v, grad f>`` with ``grad f`` by backprop (``mode="simulated"``)."""
    checked = checked_loss(loss_fn, has_aux)

    def source(params, batch):
        if mode == "simulated":
            out, grads = jax.value_and_grad(checked, has_aux=has_aux)(params, batch)
            flat_grad = FlatLayout.of(jax.tree.leaves(grads)).concat(jax.tree.leaves(grads))
            return out, lambda v_leaves, v_flat: _combine.full_precision_matmul(v_flat, flat_grad.astype(v_flat.dtype))
        if has_aux:
            loss, lin, aux = jax.linearize(lambda p: checked(p, batch), params, has_aux=True)
            out = (loss, aux)
        else:
            out, lin = jax.linearize(lambda p: checked(p, batch), params)
        param_leaves, treedef = jax.tree.flatten(params)

        def push(v_leaves, v_flat):
            v_leaves = [_vary_like(v, p) for v, p in zip(v_leaves, param_leaves, strict=True)]
            return lin(jax.tree.unflatten(treedef, v_leaves))

        return out, push

    return source


@dataclasses.dataclass(frozen=True)
class DenseTangents:
    """The choices of a dense-tangent estimator that do not depend on how ``d`` is obtained: which tangents (drawn
    from ``fold_in(key, i)``, see :mod:`jaxalgo.grads._tangents`), how many at a time, and how their directional
    derivatives combine. :func:`dense_estimator` joins it to a :data:`Source`.

    Attributes:
      num_tangents: ``k``.
      aggregation: one of :data:`jaxalgo.grads._combine.AGGREGATIONS`.
      distribution: one of :data:`jaxalgo.grads._tangents.DISTRIBUTIONS`.
      normalize: use ``v_i / |v_i|``.
      correct: apply the scaling correction.
      batching: one of :data:`BATCHINGS`.
      chunk_size: tangents per chunk (``chunk`` only).
      has_aux: whether the source's ``out`` is ``(loss, aux)``.
    """

    num_tangents: int
    aggregation: Aggregation
    distribution: Distribution
    normalize: bool = False
    correct: bool = False
    batching: Batching = "vmap"
    chunk_size: int | None = None
    has_aux: bool = False

    @property
    def projection(self) -> bool:
        return self.aggregation == "orthogonal_projection"

    def keys(self, key: jax.Array, layout: FlatLayout) -> jax.Array:
        """The per-tangent keys ``fold_in(key, i)`` (resampled for a projection on dependent Rademacher tangents)."""
        keys = _tangents.tangent_keys(key, self.num_tangents)
        if self.projection and _tangents.needs_resampling(self.distribution, layout.num_params):
            keys = _tangents.independent_tangent_keys(keys, layout, self.distribution)
        return keys

    def draw(self, keys: jax.Array, layout: FlatLayout) -> jax.Array:
        """The tangents of ``keys`` as rows ``(c, n)``, drawn one by one into the buffer."""
        return jax.lax.map(lambda tk: _tangents.tangent_flat(tk, layout, self.distribution), keys)

    def push(self, push: Push, keys: jax.Array, layout: FlatLayout, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """``(V, d)`` for the tangents of ``keys``: drawn, then pushed together."""
        v = self.draw(keys, layout)
        return v, jax.vmap(lambda vf: push(layout.split(vf), vf))(v).astype(dtype)

    def _start(self, source: Source, params: Params, batch: Batch, key: jax.Array):
        layout = FlatLayout.of(jax.tree.leaves(params))
        out, push = source(params, batch)
        loss = out[0] if self.has_aux else out
        return layout, self.keys(key, layout), out, push, jnp.promote_types(loss.dtype, layout.dtype)

    def directional(self, source: Source, params: Params, batch: Batch, key: jax.Array):
        """``(out, d, keys, V or None)``; ``V`` (``k x n``) is returned only by ``vmap``, which holds it anyway."""
        layout, keys, out, push, dtype = self._start(source, params, batch, key)
        if self.batching == "vmap":
            v, d = self.push(push, keys, layout, dtype)
            return out, d, keys, v
        _, d = _fold_tangents(lambda _, ks: (None, self.push(push, ks, layout, dtype)[1]), None, keys,
                              self.batching, self.chunk_size)  # fmt: skip
        return out, d, keys, None

    def coefficients(self, d: jax.Array, layout: FlatLayout, gram: jax.Array | None, sq_norms: jax.Array | None):
        """``c`` of the estimate ``V^T c`` (see :mod:`jaxalgo.grads._combine`)."""
        k, n = self.num_tangents, layout.num_params
        d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
        if self.projection:
            if gram is None:
                raise ValueError("gram: the orthogonal projection needs the tangents' Gram matrix, got None")
            used = min(k, n)
            if used < k:  # more tangents than parameters: the first n span the whole space.
                mask = jnp.arange(k) < used
                d = jnp.where(mask, d, 0)
                gram = jnp.where(mask[:, None] & mask[None, :], gram, jnp.eye(k, dtype=gram.dtype))
            c = _combine.combination_coefficients(self.aggregation, d, gram.astype(d.dtype))
        else:
            c = _combine.combination_coefficients(self.aggregation, d)
            if self.normalize:  # u_i = v_i / |v_i|: d_i' u_i = d_i v_i / |v_i|^2
                if sq_norms is None:
                    raise ValueError("sq_norms: normalised tangents need their squared norms, got None")
                c = c / sq_norms.astype(c.dtype)
        if self.correct:
            c = c * _combine.scaling_correction(self.aggregation, num_tangents=k, num_params=n)
        return c

    def _squared_norms(self, v: jax.Array | None, layout: FlatLayout) -> jax.Array | None:
        """``|v_i|^2`` of the rows of ``v`` (``n`` for Rademacher tangents, also without ``v``; else None)."""
        if self.distribution == "rademacher":
            rows = self.num_tangents if v is None else v.shape[0]
            return jnp.full((rows,), float(layout.num_params), layout.dtype)
        return None if v is None else jnp.sum(v * v, axis=1)

    def estimate(self, params: Params, d: jax.Array, keys: jax.Array, v: jax.Array | None) -> Params:
        """``V^T c`` as a pytree like ``params``, from ``V`` if given (``vmap``) or block by block (redrawn)."""
        leaves, treedef = jax.tree.flatten(params)
        layout = FlatLayout.of(leaves)
        need_gram = self.projection
        need_norms = self.normalize and not self.projection
        if v is not None:  # vmap: V is here, use it.
            gram = _combine.full_precision_matmul(v, v.T) if need_gram else None
            sq_norms = self._squared_norms(v, layout) if need_norms else None
            c = self.coefficients(d, layout, gram, sq_norms)
            flat = _combine.full_precision_matmul(c.astype(layout.dtype), v)
            return jax.tree.unflatten(treedef, layout.split(flat))
        block = lambda b: _tangents.tangent_block(keys, b, layout, self.distribution)
        gram, sq_norms = None, self._squared_norms(None, layout)
        need_norms = need_norms and sq_norms is None
        if need_gram or need_norms:

            def gram_step(total, b):
                x = block(b)
                return total + (
                    _combine.full_precision_matmul(x, x.T) if need_gram else jnp.diag(jnp.sum(x * x, axis=1))
                ), None

            k = self.num_tangents
            total, _ = jax.lax.scan(gram_step, jnp.zeros((k, k), layout.dtype), jnp.arange(layout.num_blocks))
            gram = total if need_gram else None
            sq_norms = jnp.diagonal(total) if need_norms else sq_norms
        c = self.coefficients(d, layout, gram, sq_norms).astype(layout.dtype)
        blocks = jax.lax.map(lambda b: _combine.full_precision_matmul(c, block(b)), jnp.arange(layout.num_blocks))
        flat = blocks.reshape(-1)[: layout.num_params]
        return jax.tree.unflatten(treedef, layout.split(flat))

    def estimate_from_directional(self, params: Params, d: jax.Array, key: jax.Array) -> Params:
        k = self.num_tangents
        if getattr(d, "shape", None) != (k,):
            raise ValueError(f"d: expected shape ({k},) (one directional derivative per tangent), got {d.shape}")
        layout = FlatLayout.of(jax.tree.leaves(params))
        keys = self.keys(key, layout)
        return self.estimate(params, d, keys, self.draw(keys, layout) if self.batching == "vmap" else None)

    def fused_sum_or_mean(self, source: Source, params: Params, batch: Batch, key: jax.Array):
        """``sum`` / ``mean`` with ``scan`` or ``chunk``: each tangent drawn once, pushed, and ``c_i v_i`` added."""
        layout, keys, out, push, dtype = self._start(source, params, batch, key)
        weight = 1.0 if self.aggregation == "sum" else 1.0 / self.num_tangents
        if self.correct:
            weight *= _combine.scaling_correction(
                self.aggregation, num_tangents=self.num_tangents, num_params=layout.num_params
            )

        def add(total, tangent_keys):
            v, d = self.push(push, tangent_keys, layout, dtype)
            c = d.astype(jnp.promote_types(d.dtype, jnp.float32)) * weight
            if self.normalize:  # u_i = v_i / |v_i|: d_i' u_i = d_i v_i / |v_i|^2
                c = c / self._squared_norms(v, layout).astype(c.dtype)
            return total + _combine.full_precision_matmul(c.astype(layout.dtype), v), d

        # inside shard_map the estimate varies over the axes the loss does (per-device params or batch)
        zeros = _vary_like(jnp.zeros(layout.num_params, layout.dtype), out[0] if self.has_aux else out)
        flat, _ = _fold_tangents(add, zeros, keys, self.batching, self.chunk_size)
        return out, jax.tree.unflatten(jax.tree.structure(params), layout.split(flat))


def dense_estimator(source: Source, tangents: DenseTangents) -> Estimator:
    """The stateless estimator ``V^T c(d)`` with ``d`` from ``source`` and everything else from ``tangents``; its
    ``split`` is the :class:`DirectionalSplit` (``d`` first, the estimate from ``d`` and the key second)."""

    def directional_derivatives(params: Params, batch: Batch, *, key: jax.Array) -> tuple[Any, jax.Array]:
        check_float_params(params)
        out, d, _, _ = tangents.directional(source, params, batch, key)
        return out, d

    def estimate_from_directional(params: Params, d: jax.Array, *, key: jax.Array) -> Params:
        check_float_params(params)
        return tangents.estimate_from_directional(params, d, key)

    def value_and_grad(params: Params, state: EmptyState, batch: Batch, *, key: jax.Array):
        check_float_params(params)
        if not tangents.projection and tangents.batching != "vmap":
            out, grads = tangents.fused_sum_or_mean(source, params, batch, key)
            return out, grads, state
        out, d, keys, v = tangents.directional(source, params, batch, key)
        return out, tangents.estimate(params, d, keys, v), state

    split = DirectionalSplit(directional_derivatives, estimate_from_directional)
    return Estimator(stateless_init, value_and_grad, split)


# -- the forward gradient ----------------------------------------------------------------------------------------


def forward_gradient_directional(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: Aggregation = "mean",
    tangents: Tangents = "gaussian",
    normalize_tangents: bool = False,
    scaling_correction: bool = False,
    batching: Batching = "vmap",
    chunk_size: int | None = None,
    has_aux: bool = False,
    mode: ForwardMode = "forward",
) -> DirectionalSplit:
    """The split form of :func:`forward_gradient`: directional derivatives, then the estimate.

    Args: as for :func:`forward_gradient`.

    Returns:
      A :class:`~jaxalgo.grads.DirectionalSplit` with

      - ``directional_derivatives(params, batch, *, key) -> (loss, d)``: the loss (or ``(loss, aux)``) and
        ``d_i = <grad loss, v_i>`` along the *unnormalised* tangents drawn from ``key``, shape (k,), in at least
        float32;
      - ``estimate_from_directional(params, d, *, key) -> grads``: ``V^T c`` with the aggregation's coefficients
        (normalisation and scaling correction applied here), redrawing the same tangents from ``key``. Only the
        shapes and dtypes of ``params`` are used.
    """
    estimator = forward_gradient(
        loss_fn, num_tangents=num_tangents, aggregation=aggregation, tangents=tangents,
        normalize_tangents=normalize_tangents, scaling_correction=scaling_correction, batching=batching,
        chunk_size=chunk_size, has_aux=has_aux, mode=mode,
    )  # fmt: skip
    assert estimator.split is not None  # forward_gradient always builds its split form
    return estimator.split


def forward_gradient(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: Aggregation = "mean",
    tangents: Tangents = "gaussian",
    normalize_tangents: bool = False,
    scaling_correction: bool = False,
    batching: Batching = "vmap",
    chunk_size: int | None = None,
    has_aux: bool = False,
    mode: ForwardMode = "forward",
) -> Estimator:
    """Multi-tangent forward gradient of ``loss_fn``; FROG with ``aggregation="orthogonal_projection"``.

    Draws ``k`` tangents ``v_i`` over the whole parameter pytree, gets ``d_i = <grad f, v_i>`` by forward-mode AD
    (``jax.linearize``: the primal once, then one Jacobian-vector product per tangent) and returns ``V^T c``:

    - ``sum``: ``c = d``; ``mean``: ``c = d / k``, an unbiased estimate of ``grad f``;
    - ``orthogonal_projection``: ``c = (V V^T)^{-1} d`` (Cholesky solve), the orthogonal projection of ``grad f``
      onto the span of the tangents: the exact gradient for ``k >= n``, ``E[g] = (k/n) grad f`` otherwise. With
      ``k > n`` the first ``n`` tangents are used; dependent Rademacher tangents are resampled.

    Step sizes: without the scaling correction the mean is about ``sqrt(n / k)`` times longer than ``grad f`` and
    the projection about ``sqrt(k / n)`` times shorter, so learning rates differ by orders of magnitude between
    aggregations (on digits, MLP 64-256-256-10, k = 16: projection with SGD lr ~10-30, mean with Adam ~1e-3).

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a floating-point scalar, or ``(scalar, aux)`` with
        ``has_aux=True``. Must be forward-differentiable (no ``custom_vjp``; ``stop_gradient`` also stops tangents).
      num_tangents: ``k >= 1``.
      aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal_projection"``.
      tangents: ``"gaussian"`` (``N(0, I)``), ``"rademacher"`` (``+-1``) or ``"rank1"`` (structured ``a b^T``
        tangents per weight, :func:`~jaxalgo.grads.rank1_forward_gradient`; no normalisation, no ``chunk``
        batching, no simulated mode).
      normalize_tangents: use ``v_i / |v_i|`` (changes ``sum`` and ``mean``; the projection does not depend on it).
      scaling_correction: multiply the estimate by the reference's factor (``jaxalgo.grads._combine``), which
        rescales it towards the norm of the gradient (derived for Gaussian tangents).
      batching: ``"vmap"`` (all tangents at once, holds ``V``), ``"scan"`` (one at a time, memory constant in
        ``k``) or ``"chunk"`` (``chunk_size`` at a time); see the module docstring for the memory of each.
      chunk_size: tangents per chunk, with ``batching="chunk"`` only.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      mode: ``"forward"`` (JVPs) or ``"simulated"`` (``d = V grad f`` with ``grad f`` by backprop: a test oracle).

    Returns:
      A stateless :class:`~jaxalgo.grads.Estimator` whose ``split`` is the :class:`~jaxalgo.grads.DirectionalSplit`
      of :func:`forward_gradient_directional`. The gradient pytree has the params' structure and dtypes (computed
      in float32 for bfloat16/float16 params). The same key gives the same estimate under every batching.

    Example::

      est = jaxalgo.grads.forward_gradient(loss_fn, num_tangents=16, aggregation="orthogonal_projection")
      state = est.init(params)
      loss, grads, state = est.value_and_grad(params, state, batch, key=key)

    References:
      Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
      arXiv 2410.17764, 2024.
    """
    check_loss_fn(loss_fn)
    check_forward_options(
        num_tangents=num_tangents, aggregation=aggregation, tangents=tangents, normalize_tangents=normalize_tangents,
        scaling_correction=scaling_correction, batching=batching, chunk_size=chunk_size, has_aux=has_aux, mode=mode,
    )  # fmt: skip
    if tangents == "rank1":
        assert batching != "chunk"  # refused by check_forward_options
        return rank1_forward_gradient(
            loss_fn,
            num_tangents=num_tangents,
            aggregation=aggregation,
            scaling_correction=scaling_correction,
            has_aux=has_aux,
            batching=batching,
        )
    spec = DenseTangents(
        num_tangents, aggregation, tangents, normalize_tangents, scaling_correction, batching, chunk_size, has_aux
    )
    return dense_estimator(_linearized(loss_fn, has_aux, mode), spec)


def dense_tangent_bytes(num_tangents: int, batching: Batching, chunk_size: int | None, param_bytes: int) -> int:
    """Bytes of the dense tangents held at once: ``k`` copies of the parameters with ``vmap``, ``chunk_size`` with
    ``chunk``, one with ``scan`` (a lower bound of the estimator's working memory, for the up-front check)."""
    held = {"vmap": num_tangents, "chunk": chunk_size or num_tangents, "scan": 1}[batching]
    return int(held) * int(param_bytes)


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Multi-tangent forward gradients with weight perturbation, FROG with the projection (see
    :func:`forward_gradient`).

    Attributes:
      num_tangents: number of random tangents k (>= 1).
      aggregation: how the k directional derivatives combine: sum, mean (unbiased) or orthogonal_projection (FROG).
      tangent_dist: gaussian, rademacher or rank1 (structured a b^T tangents per weight; no normalize_tangents,
        no chunk batching, forward mode only).
      normalize_tangents: divide each tangent by its norm (sum and mean only; the projection does not change).
      scaling_correction: multiply the estimate by the reference's correction factor (towards the gradient's norm).
      batching: vmap (all tangents at once), scan (one at a time, memory flat in k) or chunk (chunk_size at a time).
      chunk_size: tangents per chunk, with batching=chunk only.
      mode: forward (directional derivatives by forward mode) or simulated (by backprop; a test oracle).
    """

    num_tangents: int = option(16, flag="tangents")
    aggregation: Aggregation = "mean"
    tangent_dist: Tangents = "gaussian"
    normalize_tangents: bool = False
    scaling_correction: bool = False
    batching: Batching = "vmap"
    chunk_size: int | None = None
    mode: ForwardMode = option("forward", flag="forward_mode")

    data_parallel: ClassVar[bool] = True

    def __post_init__(self):
        check_fields(self)
        check_forward_options(
            num_tangents=self.num_tangents, aggregation=self.aggregation, tangents=self.tangent_dist,
            normalize_tangents=self.normalize_tangents, scaling_correction=self.scaling_correction,
            batching=self.batching, chunk_size=self.chunk_size, mode=self.mode, tangents_name="tangent_dist",
        )  # fmt: skip

    def working_bytes(self, param_bytes: int) -> int:
        """The dense tangent matrix's bytes (rank-1 tangents hold two vectors per weight: not counted)."""
        if self.tangent_dist == "rank1":
            return 0
        return dense_tangent_bytes(self.num_tangents, self.batching, self.chunk_size, param_bytes)

    def build(self, problem: Problem) -> Estimator:
        return forward_gradient(
            problem.loss_fn,
            num_tangents=self.num_tangents,
            aggregation=self.aggregation,
            tangents=self.tangent_dist,
            normalize_tangents=self.normalize_tangents,
            scaling_correction=self.scaling_correction,
            batching=self.batching,
            chunk_size=self.chunk_size,
            has_aux=problem.has_aux,
            mode=self.mode,
        )
