"""Structured rank-1 tangents: sampling, Gram matrix and the combined estimate, all in factored form.

A weight ``W`` of shape ``(..., n)`` (a dense kernel ``(m, n)``, a conv kernel ``(kh, kw, c_in, c_out)``, an
attention kernel ``(d, heads, head_dim)``) is viewed as a matrix ``(m, n)`` whose rows are its leading axes and
whose columns are its last axis, and gets the tangent

    V = a b^T,   a ~ N(0, I_m),  b ~ N(0, I_n)  independent.

Then ``E[vec(V) vec(V)^T] = E[a a^T] (x) E[b b^T] = I``: the covariance of a standard Gaussian tangent, so the sum
and mean estimators stay unbiased and the projection stays an orthogonal projection onto the span of the tangents.
Every other parameter (biases, scales, a matrix with a side of length 1) gets an ordinary Gaussian tangent.

Nothing of size ``k x m x n`` is formed:

- sampling draws ``k (m + n)`` numbers per weight instead of ``k m n``;
- the Gram matrix uses ``<a_i b_i^T, a_j b_j^T> = (a_i . a_j)(b_i . b_j)``: ``O(k^2 (m + n))`` per weight;
- the estimate ``sum_i c_i a_i b_i^T = (a^T diag(c)) b`` is one ``(m x k)(k x n)`` product per weight.

Tangent ``i`` (all its leaves and factors) is drawn from ``fold_in(key, i)``, so tangent ``i`` is the same whether
the ``k`` tangents are drawn together or one at a time.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxalgo.grads._combine import full_precision_matmul

Groups = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class FactoredTangent:
    """``k`` stacked tangents of an array of shape ``shape``, each an outer product of factors.

    Tangent ``i`` is ``T_i[x] = prod_g factors[g][i][x[groups[g]]]``: factor ``g`` has shape
    ``(k, *[shape[ax] for ax in groups[g]])`` and the groups partition the axes ``0 .. ndim - 1``. A rank-1 matrix
    tangent ``a b^T`` is ``groups = ((0,), (1,))``, ``factors = (a, b)``.
    """

    factors: tuple[jax.Array, ...]
    groups: Groups
    shape: tuple[int, ...]

    @property
    def num_tangents(self) -> int:
        return self.factors[0].shape[0]

    @property
    def dtype(self) -> Any:
        return self.factors[0].dtype

    def materialize(self) -> jax.Array:
        """The dense stacked tangents, shape ``(k, *shape)`` (costs ``k`` times the array's size)."""
        letters = string.ascii_letters
        operands = [f"z{''.join(letters[ax] for ax in group)}" for group in self.groups]
        out = "z" + "".join(letters[ax] for ax in range(len(self.shape)))
        return jnp.einsum(f"{','.join(operands)}->{out}", *self.factors)

    def flat_factors(self) -> list[jax.Array]:
        """Each factor as a ``(k, size)`` matrix."""
        return [f.reshape(f.shape[0], -1) for f in self.factors]

    def transpose(self, permutation: Sequence[int]) -> FactoredTangent:
        """The tangents of ``jnp.transpose(x, permutation)``: the factors are unchanged, the groups renamed."""
        new_axis = {old: new for new, old in enumerate(permutation)}
        groups = tuple(tuple(new_axis[ax] for ax in group) for group in self.groups)
        return FactoredTangent(self.factors, groups, tuple(self.shape[p] for p in permutation))

    def astype(self, dtype: Any) -> FactoredTangent:
        return FactoredTangent(tuple(f.astype(dtype) for f in self.factors), self.groups, self.shape)


jax.tree_util.register_dataclass(FactoredTangent, data_fields=["factors"], meta_fields=["groups", "shape"])


def rank1_groups(shape: Sequence[int]) -> Groups | None:
    """The rank-1 view of an array of shape ``shape``: ((leading axes), (last axis,)), or None for a Gaussian tangent.

    An array is factored when it has at least two axes and both sides of its matrix view are longer than 1.
    """
    if len(shape) < 2 or shape[-1] < 2 or math.prod(shape[:-1]) < 2:
        return None
    return (tuple(range(len(shape) - 1)), (len(shape) - 1,))


def tangent_keys(key: jax.Array, num_tangents: int) -> jax.Array:
    """The ``k`` per-tangent keys ``fold_in(key, i)``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_tangents))


def _sample_one(key: jax.Array, leaves: Sequence[jax.Array]) -> list[tuple[jax.Array, ...] | jax.Array]:
    """One tangent (unstacked): for each leaf, a tuple of factors or a dense Gaussian array.

    All the numbers of one tangent come from a single draw ``normal(key, (total,))`` split over the leaves in
    order (one random-number kernel instead of one per leaf: much faster to compile), in the widest parameter
    dtype, then cast to each leaf's dtype.
    """
    sizes: list[list[tuple[int, ...]]] = []
    for leaf in leaves:
        groups = rank1_groups(leaf.shape)
        if groups is None:
            sizes.append([tuple(leaf.shape)])
        else:
            sizes.append([tuple(leaf.shape[ax] for ax in group) for group in groups])
    total = sum(math.prod(shape) for shapes in sizes for shape in shapes)
    dtype = jnp.result_type(*[leaf.dtype for leaf in leaves]) if leaves else jnp.float32
    flat = jax.random.normal(key, (total,), dtype)
    out: list[tuple[jax.Array, ...] | jax.Array] = []
    offset = 0
    for leaf, shapes in zip(leaves, sizes, strict=True):
        parts = []
        for shape in shapes:
            size = math.prod(shape)
            parts.append(flat[offset : offset + size].reshape(shape).astype(leaf.dtype))
            offset += size
        out.append(parts[0] if rank1_groups(leaf.shape) is None else tuple(parts))
    return out


def sample_tangents(keys: jax.Array, leaves: Sequence[jax.Array]) -> list[FactoredTangent | jax.Array]:
    """Stacked tangents for ``leaves``, one per key in ``keys`` (shape (k,)).

    Returns, per leaf, a :class:`FactoredTangent` (rank-1 view) or a dense array ``(k, *leaf.shape)``.
    """
    stacked = jax.vmap(lambda k: _sample_one(k, leaves))(keys)
    out: list[FactoredTangent | jax.Array] = []
    for leaf, tangent in zip(leaves, stacked, strict=True):
        if isinstance(tangent, tuple):
            groups = rank1_groups(leaf.shape)
            assert groups is not None  # _sample_one factors exactly the leaves that have a rank-1 view
            out.append(FactoredTangent(tuple(tangent), groups, tuple(leaf.shape)))
        else:
            out.append(tangent)
    return out


def gram_matrix(tangents: Sequence[FactoredTangent | jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """``G_ij = <v_i, v_j>`` summed over leaves; factored leaves use the product of the factors' Gram matrices."""
    if not tangents:
        raise ValueError("tangents: expected at least one leaf, got none")
    total: jax.Array | None = None
    for tangent in tangents:
        if isinstance(tangent, FactoredTangent):
            grams = [full_precision_matmul(f, f.T) for f in (x.astype(dtype) for x in tangent.flat_factors())]
            term = functools.reduce(operator.mul, grams)
        else:
            f = tangent.reshape(tangent.shape[0], -1).astype(dtype)
            term = full_precision_matmul(f, f.T)
        total = term if total is None else total + term
    assert total is not None
    return total


def combine(tangents: Sequence[FactoredTangent | jax.Array], coefficients: jax.Array) -> list[jax.Array]:
    """``sum_i c_i v_i`` per leaf, in factored form for factored leaves; each result has the leaf's dtype."""
    out = []
    for tangent in tangents:
        if isinstance(tangent, FactoredTangent):
            c = coefficients.astype(tangent.dtype)
            first, *rest = tangent.factors
            letters = string.ascii_letters
            groups = tangent.groups
            operands = [f"z{''.join(letters[ax] for ax in groups[0])}"]
            operands += [f"z{''.join(letters[ax] for ax in g)}" for g in groups[1:]]
            target = "".join(letters[ax] for ax in range(len(tangent.shape)))
            scaled = first * c.reshape((-1,) + (1,) * (first.ndim - 1))
            out.append(jnp.einsum(f"{','.join(operands)}->{target}", scaled, *rest))
        else:
            c = coefficients.astype(tangent.dtype)
            out.append(jnp.tensordot(c, tangent, axes=1))
    return out
