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

``mode="simulated"`` replaces the JVPs by ``d = V grad f`` with ``grad f`` from backprop: the estimator the
reference runs for its networks, kept as a test oracle and for parity with the paper, not as a default.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
  Baydin et al., "Gradients without Backpropagation", arXiv 2202.08587, 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxalgo.grads import _combine, _tangents
from jaxalgo.grads._estimator import (
    Batch,
    DirectionalSplit,
    EmptyState,
    Estimator,
    Params,
    check_float_params,
    check_scalar_loss,
    stateless_init,
)
from jaxalgo.grads._rank1 import rank1_forward_gradient
from jaxalgo.grads._tangents import FlatLayout

TANGENTS: tuple[str, ...] = ("gaussian", "rademacher", "rank1")
BATCHINGS: tuple[str, ...] = ("vmap", "scan", "chunk")
MODES: tuple[str, ...] = ("forward", "simulated")


def _check_options(
    loss_fn: Any, num_tangents: Any, aggregation: Any, tangents: Any, batching: Any, chunk_size: Any, mode: Any
) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
    _combine.check_num_tangents(num_tangents)
    _combine.check_aggregation(aggregation)
    if tangents not in TANGENTS:
        raise ValueError(f"tangents: unknown tangent distribution {tangents!r}; allowed: {', '.join(TANGENTS)}")
    if batching not in BATCHINGS:
        raise ValueError(f"batching: unknown batching {batching!r}; allowed: {', '.join(BATCHINGS)}")
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if batching == "chunk":
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: batching='chunk' needs an integer chunk_size >= 1, got {chunk_size!r}")
    elif chunk_size is not None:
        raise ValueError(f"chunk_size: only used with batching='chunk' (got batching={batching!r}); leave it None")


def _check_rank1_options(normalize_tangents: bool, batching: str, mode: str) -> None:
    if normalize_tangents:
        raise ValueError("normalize_tangents: not supported with tangents='rank1'; use False")
    if batching == "chunk":
        raise ValueError("batching: tangents='rank1' supports 'vmap' and 'scan', not 'chunk'")
    if mode != "forward":
        raise ValueError(f"mode: tangents='rank1' supports mode='forward' only, got {mode!r}")


def _map_tangents(
    one: Callable[[jax.Array], Any],
    several: Callable[[jax.Array], Any],
    keys: jax.Array,
    batching: str,
    chunk_size: int | None,
) -> Any:
    """Per-tangent results stacked along axis 0: ``one(key)`` one at a time (``scan``) or ``several(keys)`` on
    chunks of ``chunk_size`` keys (``chunk``; the last chunk may be shorter)."""
    if batching == "scan":
        return jax.lax.map(one, keys)
    k = keys.shape[0]
    c = min(chunk_size, k)
    full = (k // c) * c
    parts = []
    if full:
        out = jax.lax.map(several, keys[:full].reshape(k // c, c, *keys.shape[1:]))
        parts.append(jax.tree.map(lambda x: x.reshape(full, *x.shape[2:]), out))
    if full < k:
        parts.append(several(keys[full:]))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def forward_gradient_directional(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: str = "mean",
    tangents: str = "gaussian",
    normalize_tangents: bool = False,
    scaling_correction: bool = False,
    batching: str = "vmap",
    chunk_size: int | None = None,
    has_aux: bool = False,
    mode: str = "forward",
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
    return estimator.split


def _fold_tangents(
    add: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    total: jax.Array,
    keys: jax.Array,
    batching: str,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    """``(total, d)`` after ``total, d_chunk = add(total, chunk_keys)`` over the keys, one at a time (``scan``) or
    ``chunk_size`` at a time (``chunk``; the last chunk may be shorter); ``d`` stacks the chunks' ``d_chunk``."""
    k = keys.shape[0]
    c = 1 if batching == "scan" else min(chunk_size, k)
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


def _dense_parts(
    loss_fn, k, aggregation, distribution, normalize, correct, batching, chunk_size, has_aux, mode
) -> tuple[DirectionalSplit, Callable[..., Any]]:
    projection = aggregation == "orthogonal_projection"

    def checked_loss(params, batch):
        out = loss_fn(params, batch)
        check_scalar_loss(out, has_aux=has_aux)
        return out

    def effective_keys(key: jax.Array, layout: FlatLayout) -> jax.Array:
        keys = _tangents.tangent_keys(key, k)
        if projection and _tangents.needs_resampling(distribution, layout.num_params):
            keys = _tangents.independent_tangent_keys(keys, layout, distribution)
        return keys

    def linear_part(params, batch):
        """``(out, jvp)``: the loss output and ``v -> <grad loss, v>`` (primal computed once)."""
        if mode == "simulated":
            if has_aux:
                (loss, aux), grads = jax.value_and_grad(checked_loss, has_aux=True)(params, batch)
                out = (loss, aux)
            else:
                out, grads = jax.value_and_grad(checked_loss)(params, batch)
            flat_grad = FlatLayout.of(jax.tree.leaves(grads)).concat(jax.tree.leaves(grads))
            return out, lambda v_leaves, v_flat: jnp.dot(v_flat, flat_grad.astype(v_flat.dtype))
        if has_aux:
            loss, lin, aux = jax.linearize(lambda p: checked_loss(p, batch), params, has_aux=True)
            out = (loss, aux)
        else:
            out, lin = jax.linearize(lambda p: checked_loss(p, batch), params)
        param_leaves, treedef = jax.tree.flatten(params)

        def jvp(v_leaves, v_flat):
            v_leaves = [_vary_like(v, p) for v, p in zip(v_leaves, param_leaves, strict=True)]
            return lin(jax.tree.unflatten(treedef, v_leaves))

        return out, jvp

    def directional_with_tangents(params, batch, key):
        """``(out, d, V or None)``; ``V`` (``k x n``) is returned only by ``vmap``, which holds it anyway."""
        leaves = jax.tree.leaves(params)
        layout = FlatLayout.of(leaves)
        keys = effective_keys(key, layout)
        out, jvp = linear_part(params, batch)
        loss = out[0] if has_aux else out
        dtype = jnp.promote_types(loss.dtype, layout.dtype)

        def one(tangent_key):  # one tangent: drawn, pushed, dropped
            flat = _tangents.tangent_flat(tangent_key, layout, distribution)
            return jvp(layout.split(flat), flat).astype(dtype)

        def several(tangent_keys):  # drawn one by one into a (c, n) buffer, pushed together
            v = jax.lax.map(lambda tk: _tangents.tangent_flat(tk, layout, distribution), tangent_keys)
            return v, jax.vmap(lambda vf: jvp(layout.split(vf), vf))(v).astype(dtype)

        if batching == "vmap":
            v, d = several(keys)
            return out, d, keys, v
        d = _map_tangents(one, lambda ks: several(ks)[1], keys, batching, chunk_size)
        return out, d, keys, None

    def coefficients(d: jax.Array, layout: FlatLayout, gram: jax.Array | None, sq_norms: jax.Array | None):
        n = layout.num_params
        d = d.astype(jnp.promote_types(d.dtype, jnp.float32))
        if projection:
            used = min(k, n)
            if used < k:  # more tangents than parameters: the first n span the whole space.
                mask = jnp.arange(k) < used
                d = jnp.where(mask, d, 0)
                gram = jnp.where(mask[:, None] & mask[None, :], gram, jnp.eye(k, dtype=gram.dtype))
            c = _combine.combination_coefficients(aggregation, d, gram.astype(d.dtype))
        else:
            c = _combine.combination_coefficients(aggregation, d)
            if normalize:  # u_i = v_i / |v_i|: d_i' u_i = d_i v_i / |v_i|^2
                c = c / sq_norms.astype(c.dtype)
        if correct:
            c = c * _combine.scaling_correction(aggregation, num_tangents=k, num_params=n)
        return c

    def squared_norms_known(layout: FlatLayout) -> jax.Array | None:
        if distribution == "rademacher":
            return jnp.full((k,), float(layout.num_params), layout.dtype)
        return None

    def estimate(params, d, keys, v):
        leaves, treedef = jax.tree.flatten(params)
        layout = FlatLayout.of(leaves)
        need_gram = projection
        need_norms = normalize and not projection and distribution != "rademacher"
        if v is not None:  # vmap: V is here, use it.
            gram = v @ v.T if need_gram else None
            sq_norms = jnp.sum(v * v, axis=1) if need_norms else squared_norms_known(layout)
            c = coefficients(d, layout, gram, sq_norms)
            flat = c.astype(layout.dtype) @ v
            return jax.tree.unflatten(treedef, layout.split(flat))
        gram, sq_norms = None, squared_norms_known(layout)
        if need_gram or need_norms:

            def gram_step(total, b):
                block = _tangents.tangent_block(keys, b, layout, distribution)
                return total + (block @ block.T if need_gram else jnp.diag(jnp.sum(block * block, axis=1))), None

            total, _ = jax.lax.scan(gram_step, jnp.zeros((k, k), layout.dtype), jnp.arange(layout.num_blocks))
            gram = total if need_gram else None
            sq_norms = jnp.diagonal(total) if need_norms else sq_norms
        c = coefficients(d, layout, gram, sq_norms).astype(layout.dtype)
        blocks = jax.lax.map(lambda b: c @ _tangents.tangent_block(keys, b, layout, distribution),
                             jnp.arange(layout.num_blocks))  # fmt: skip
        flat = blocks.reshape(-1)[: layout.num_params]
        return jax.tree.unflatten(treedef, layout.split(flat))

    def directional_derivatives(params: Params, batch: Batch, *, key: jax.Array) -> tuple[Any, jax.Array]:
        check_float_params(params)
        out, d, _, _ = directional_with_tangents(params, batch, key)
        return out, d

    def estimate_from_directional(params: Params, d: jax.Array, *, key: jax.Array) -> Params:
        check_float_params(params)
        if getattr(d, "shape", None) != (k,):
            raise ValueError(f"d: expected shape ({k},) (one directional derivative per tangent), got {d.shape}")
        layout = FlatLayout.of(jax.tree.leaves(params))
        keys = effective_keys(key, layout)
        v = None
        if batching == "vmap":
            v = jax.lax.map(lambda tk: _tangents.tangent_flat(tk, layout, distribution), keys)
        return estimate(params, d, keys, v)

    def fused_sum_or_mean(params, batch, key):
        """``sum`` / ``mean`` with ``scan`` or ``chunk``: each tangent drawn once, pushed, and ``c_i v_i`` added."""
        leaves, treedef = jax.tree.flatten(params)
        layout = FlatLayout.of(leaves)
        out, jvp = linear_part(params, batch)
        loss = out[0] if has_aux else out
        dtype = jnp.promote_types(loss.dtype, layout.dtype)
        weight = 1.0 if aggregation == "sum" else 1.0 / k
        if correct:
            weight *= _combine.scaling_correction(aggregation, num_tangents=k, num_params=layout.num_params)

        def add(total, tangent_keys):
            v = jax.lax.map(lambda tk: _tangents.tangent_flat(tk, layout, distribution), tangent_keys)
            d = jax.vmap(lambda vf: jvp(layout.split(vf), vf))(v).astype(dtype)
            c = d.astype(jnp.promote_types(d.dtype, jnp.float32)) * weight
            if normalize:  # u_i = v_i / |v_i|: d_i' u_i = d_i v_i / |v_i|^2
                c = c / (layout.num_params if distribution == "rademacher" else jnp.sum(v * v, axis=1).astype(c.dtype))
            return total + c.astype(layout.dtype) @ v, d

        flat, _ = _fold_tangents(add, jnp.zeros(layout.num_params, layout.dtype), _tangents.tangent_keys(key, k),
                                 batching, chunk_size)  # fmt: skip
        return out, jax.tree.unflatten(treedef, layout.split(flat))

    def value_and_grad(params: Params, state: EmptyState, batch: Batch, *, key: jax.Array):
        check_float_params(params)
        if not projection and batching != "vmap":
            out, grads = fused_sum_or_mean(params, batch, key)
            return out, grads, state
        out, d, keys, v = directional_with_tangents(params, batch, key)
        return out, estimate(params, d, keys, v), state

    parts = DirectionalSplit(directional_derivatives, estimate_from_directional)
    return parts, value_and_grad


def forward_gradient(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: str = "mean",
    tangents: str = "gaussian",
    normalize_tangents: bool = False,
    scaling_correction: bool = False,
    batching: str = "vmap",
    chunk_size: int | None = None,
    has_aux: bool = False,
    mode: str = "forward",
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
    _check_options(loss_fn, num_tangents, aggregation, tangents, batching, chunk_size, mode)
    if tangents == "rank1":
        _check_rank1_options(normalize_tangents, batching, mode)
        return rank1_forward_gradient(
            loss_fn,
            num_tangents=num_tangents,
            aggregation=aggregation,
            scaling_correction=scaling_correction,
            has_aux=has_aux,
            batching=batching,
        )
    parts, value_and_grad = _dense_parts(
        loss_fn, num_tangents, aggregation, tangents, normalize_tangents, scaling_correction, batching, chunk_size,
        has_aux, mode,
    )  # fmt: skip

    return Estimator(stateless_init, value_and_grad, parts)
