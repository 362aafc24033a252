"""Dense tangents over the whole parameter vector, regenerated on demand from per-tangent keys.

A dense tangent ``v_i`` has one entry per parameter (``n`` in all, over every leaf of the pytree: a *global*
tangent). It is never stored unless a batching strategy chooses to: any part of it can be drawn again, exactly,
from two numbers, the tangent index ``i`` and a coordinate block ``b``.

Key scheme (the same for every strategy, so an estimate depends only on the key):

- tangent ``i`` uses ``key_i = fold_in(key, i)`` (as :mod:`jaxalgo.grads._rank1_tangents` does), so it does not
  depend on the number of tangents ``k`` or on the batching;
- the flattened parameter vector (leaves in ``jax.tree.leaves`` order, each raveled) is cut into blocks of
  ``B = min(2**12, n)`` coordinates; block ``b`` of tangent ``i`` is drawn from ``fold_in(key_i, b)``.

Blocks let a strategy draw either a whole tangent (all blocks of one ``i``: memory ``O(n)``) or one block of all
tangents (``(k, B)``: what the Gram matrix ``V V^T`` and the estimate ``V^T c`` need), without the ``k x n``
matrix ``V``.

Distributions (both have ``E[v v^T] = I``, so the sum and mean estimators are unbiased):

- ``"gaussian"``: ``N(0, 1)`` entries (``jax.random.normal`` on the default threefry generator);
- ``"rademacher"``: ``+-1`` with probability 1/2 each, one random *bit* per entry (32 entries per 32-bit word of
  ``jax.random.bits``), exact; 32x fewer random bits, about 2x cheaper to draw than a Gaussian on CPU.

Measured on a 2-core CPU (16 tangents of 2.9M entries; see ``benchmarks/forward_gradients.py``): the threefry
generator is faster than XLA's ``RngBitGenerator`` behind the ``rbg`` and ``unsafe_rbg`` key implementations, and
``jax.random.normal`` (inverse error function) is faster than a Box-Muller transform; hence the choice above.

Entries are drawn in the *compute dtype* (float64 if any parameter is float64, else float32) and rounded to each
leaf's dtype (bfloat16 leaves get bfloat16-representable values), so the tangent pushed through the network, the
Gram matrix and the estimate all use exactly the same numbers.

A set of Rademacher tangents can be linearly dependent (likely for small ``n``: ``(1, 1)`` and ``(-1, -1)``).
:func:`independent_tangent_keys` resamples, in order, each tangent that depends on the ones before it, as the
reference does; for ``n`` above :data:`RESAMPLE_MAX_PARAMS` the probability of a dependent set of ``k <= n``
tangents is below ``2**-200`` and nothing is checked.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxalgo.grads._rank1_tangents import tangent_keys

Distribution = Literal["gaussian", "rademacher"]
"""The distributions of dense tangents: standard Gaussian entries, or Rademacher (``+-1``) entries."""
DISTRIBUTIONS: tuple[Distribution, ...] = typing.get_args(Distribution)
MAX_BLOCK_SIZE = 1 << 12
RESAMPLE_MAX_PARAMS = 256
RESAMPLE_MAX_ATTEMPTS = 64

__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "FlatLayout",
    "independent_tangent_keys",
    "tangent_block",
    "tangent_flat",
    "tangent_keys",
]


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """How a parameter pytree's leaves sit in one flat vector of ``num_params`` entries, cut into blocks.

    Attributes:
      shapes, dtypes: of the leaves, in ``jax.tree.leaves`` order.
      offsets: where each leaf starts in the flat vector.
      num_params: ``n``.
      block_size: ``B = min(2**12, n)``; ``num_blocks * B >= n`` (the last block is cut at ``n``).
      dtype: the compute dtype (float64 if a leaf is float64, else float32).
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    offsets: tuple[int, ...]
    num_params: int
    block_size: int
    num_blocks: int
    dtype: Any

    @classmethod
    def of(cls, leaves: Sequence[Any]) -> FlatLayout:
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        dtypes = tuple(jnp.dtype(leaf.dtype) for leaf in leaves)
        sizes = [math.prod(s) for s in shapes]
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        n = sum(sizes)
        block = max(1, min(MAX_BLOCK_SIZE, n))
        dtype = jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)
        return cls(shapes, dtypes, offsets, n, block, max(1, -(-n // block)), dtype)

    def split(self, flat: jax.Array) -> list[jax.Array]:
        """``flat`` (``(..., n)``) as leaves ``(..., *shape)``, each in its leaf's dtype."""
        lead = flat.shape[:-1]
        out = []
        for shape, dtype, start in zip(self.shapes, self.dtypes, self.offsets, strict=True):
            size = math.prod(shape)
            out.append(flat[..., start : start + size].reshape(*lead, *shape).astype(dtype))
        return out

    def concat(self, leaves: Sequence[jax.Array]) -> jax.Array:
        """The leaves as one flat vector in the compute dtype (inverse of :meth:`split`)."""
        return jnp.concatenate([jnp.ravel(leaf).astype(self.dtype) for leaf in leaves]) if leaves else jnp.zeros(0)

    def round_to_leaf_dtypes(self, values: jax.Array, start: Any = 0) -> jax.Array:
        """Rounds ``values`` (``(..., L)``, coordinates ``start .. start + L - 1``) to each coordinate's leaf dtype.

        The identity when every leaf has the compute dtype; otherwise the narrower leaves' coordinates are cast to
        their dtype and back. ``start`` may be traced.
        """
        narrow = sorted({d for d in self.dtypes if d != self.dtype}, key=str)
        if not narrow:
            return values
        index = start + jnp.arange(values.shape[-1])
        for dtype in narrow:
            mask = jnp.zeros(values.shape[-1], bool)
            for leaf_dtype, shape, offset in zip(self.dtypes, self.shapes, self.offsets, strict=True):
                if leaf_dtype == dtype:
                    mask = mask | ((index >= offset) & (index < offset + math.prod(shape)))
            values = jnp.where(mask, values.astype(dtype).astype(self.dtype), values)
        return values


def _draw(key: jax.Array, size: int, distribution: Distribution, dtype: Any) -> jax.Array:
    """``size`` independent entries of the distribution, in ``dtype``."""
    if distribution == "gaussian":
        return jax.random.normal(key, (size,), dtype)
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (1 - 2 * bits.astype(dtype)).reshape(-1)[:size]


def tangent_flat(key: jax.Array, layout: FlatLayout, distribution: Distribution) -> jax.Array:
    """Tangent ``i`` as a flat vector ``(n,)`` in the compute dtype, from its key ``key_i`` (all blocks)."""
    block_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(layout.num_blocks))
    blocks = jax.vmap(lambda k: _draw(k, layout.block_size, distribution, layout.dtype))(block_keys)
    return layout.round_to_leaf_dtypes(blocks.reshape(-1)[: layout.num_params])


def tangent_block(keys: jax.Array, block: Any, layout: FlatLayout, distribution: Distribution) -> jax.Array:
    """Block ``block`` (may be traced) of every tangent, ``(k, B)``; entries past ``n`` are zero."""
    values = jax.vmap(lambda k: _draw(jax.random.fold_in(k, block), layout.block_size, distribution, layout.dtype))(
        keys
    )
    start = block * layout.block_size
    values = layout.round_to_leaf_dtypes(values, start)
    inside = start + jnp.arange(layout.block_size) < layout.num_params
    return jnp.where(inside, values, 0)


def _select_keys(use_first: jax.Array, first: jax.Array, second: jax.Array) -> jax.Array:
    """``first`` where ``use_first`` else ``second``, for typed or raw (uint32) keys."""
    if jnp.issubdtype(first.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(first)
        a, b = jax.random.key_data(first), jax.random.key_data(second)
        cond = use_first.reshape(use_first.shape + (1,) * (a.ndim - use_first.ndim))
        return jax.random.wrap_key_data(jnp.where(cond, a, b), impl=impl)
    cond = use_first.reshape(use_first.shape + (1,) * (first.ndim - use_first.ndim))
    return jnp.where(cond, first, second)


def needs_resampling(distribution: Distribution, num_params: int) -> bool:
    """Whether :func:`independent_tangent_keys` must run before a projection (Rademacher tangents, small ``n``)."""
    return distribution == "rademacher" and num_params <= RESAMPLE_MAX_PARAMS


def independent_tangent_keys(keys: jax.Array, layout: FlatLayout, distribution: Distribution) -> jax.Array:
    """Per-tangent keys whose first ``min(k, n)`` tangents are linearly independent.

    Tangent ``i`` keeps ``keys[i]`` if it is independent of tangents ``0 .. i-1``; otherwise it is redrawn from
    ``fold_in(keys[i], a)`` for ``a = 1, 2, ...`` (at most :data:`RESAMPLE_MAX_ATTEMPTS`) until it is. Holds the
    ``min(k, n) x n`` tangents: meant for small ``n`` (see :func:`needs_resampling`). Tangents past the first ``n``
    are left alone (the projection ignores them).
    """
    n, k = layout.num_params, keys.shape[0]
    used = min(k, n)
    dtype = layout.dtype

    def draw(i, attempt):
        key = _select_keys(attempt == 0, keys[i], jax.random.fold_in(keys[i], attempt))
        return key, tangent_flat(key, layout, distribution)

    def residual(basis, v):
        # Gram-Schmidt twice against the orthonormal rows found so far (zero rows are harmless).
        for _ in range(2):
            v = v - basis.T @ (basis @ v)
        return v

    def one(i, carry):
        basis, out = carry

        def retry(state):
            attempt, _, _ = state
            key, v = draw(i, attempt + 1)
            return attempt + 1, key, residual(basis, v)

        def dependent(state):
            attempt, _, r = state
            return (attempt < RESAMPLE_MAX_ATTEMPTS) & (jnp.sum(r * r) < 1e-6 * n)

        key0, v0 = draw(i, jnp.asarray(0))
        _, key, r = jax.lax.while_loop(dependent, retry, (jnp.asarray(0), key0, residual(basis, v0)))
        basis = basis.at[i].set(r / jnp.linalg.norm(r))
        out = _select_keys(jnp.arange(k) == i, jnp.broadcast_to(key, out.shape), out)
        return basis, out

    basis = jnp.zeros((used, n), dtype)
    _, out = jax.lax.fori_loop(0, used, one, (basis, keys))
    return out
