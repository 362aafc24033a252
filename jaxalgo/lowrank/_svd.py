"""SVD factorisation and truncation of 2-D weights: the pieces OIALR and AB-training share.

A weight of any shape is viewed as a matrix ``W`` of shape ``(m, n)``: its first ``in_ndim`` axes are the input
(rows), the others the output (columns). For a dense ``nnx.Linear`` kernel ``(in, out)`` that is the kernel itself,
for an attention projection ``(in, heads, head_dim)`` it is ``(in, heads * head_dim)``.

The thin SVD ``W = U diag(s) V^T`` (``U: (m, k)``, ``V: (n, k)``, ``k = min(m, n)``, ``s`` descending) gives

- OIALR's factors (:func:`factorize`): ``U``, ``S = diag(s)``, ``V``, with ``W = U S V^T``;
- AB-training's factors (:func:`ab_factors`): ``A = U sqrt(S)``, ``B = sqrt(S) V^T``, with ``W = A B``;

both optionally truncated to the leading ``r`` singular triplets (the best rank-``r`` approximation, Eckart-Young).

References:
  Coquelin, Flügel, Weiel et al., "Harnessing orthogonality to train low-rank neural networks", arXiv 2401.08505.
  Coquelin, Flügel, Weiel et al., "AB-training: a communication-efficient approach for distributed low-rank
  learning", arXiv 2405.01067.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Factors(NamedTuple):
    """``W = U @ S @ V.T`` with ``U: (m, r)``, ``S: (r, r)``, ``V: (n, r)``."""

    U: jax.Array
    S: jax.Array
    V: jax.Array


def as_matrix(weight: jax.Array, in_ndim: int = 1) -> jax.Array:
    """``weight`` viewed as a matrix: the first ``in_ndim`` axes become rows, the rest columns.

    Args:
      weight: an array with at least two axes.
      in_ndim: how many leading axes are input axes (1 for ``nnx.Linear``; 3 for a 2-D conv kernel
        ``(kh, kw, in, out)``; 2 for an attention output projection ``(heads, head_dim, out)``).

    Returns:
      The ``(prod(shape[:in_ndim]), prod(shape[in_ndim:]))`` matrix.
    """
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"weight: need an array with at least 2 axes, got shape {shape}")
    if not (isinstance(in_ndim, int) and 1 <= in_ndim < len(shape)):
        raise ValueError(f"in_ndim: must be an integer in [1, {len(shape) - 1}] for shape {shape}, got {in_ndim!r}")
    return jnp.reshape(weight, (math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:])))


def _check_rank(rank: int | None, shape: tuple[int, ...]) -> int:
    full = min(shape)
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 1 <= rank <= full:
        raise ValueError(
            f"rank: must be an integer in [1, min(m, n) = {full}] for a {shape[0]}x{shape[1]} weight, got {rank!r}"
        )
    return int(rank)


def factorize(matrix: jax.Array, rank: int | None = None) -> Factors:
    """OIALR factors of a 2-D weight: ``W ~= U S V^T`` with ``S`` diagonal, from the thin SVD.

    Args:
      matrix: a ``(m, n)`` array.
      rank: keep the leading ``rank`` singular triplets (``1 <= rank <= min(m, n)``); ``None`` keeps all, and then
        the factorisation is exact up to rounding.

    Returns:
      :class:`Factors` ``(U (m, r), S = diag(s[:r]) (r, r), V (n, r))``; ``U`` and ``V`` have orthonormal columns.
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"matrix: need a 2-D array, got shape {matrix.shape}; use as_matrix() first")
    r = _check_rank(rank, matrix.shape)
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    return Factors(u[:, :r], jnp.diag(s[:r]), vt[:r].T)


def factored_is_cheaper(m: int, n: int, r: int) -> bool:
    """Whether ``x U (S V^T)`` costs fewer multiply-adds per example than ``x W``: ``r (m + n) < m n``."""
    return r * (m + n) < m * n


def host_factorize(weight: jax.Array, in_ndim: int = 1) -> Factors:
    """:func:`factorize` of ``as_matrix(weight, in_ndim)`` at full rank, computed on the host in float64.

    For conversions outside jit (model surgery): an eager device SVD would compile once per weight shape. The
    factors are returned as device arrays of ``weight``'s dtype.
    """
    matrix = np.asarray(as_matrix(weight, in_ndim), np.float64)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    dtype = weight.dtype
    return Factors(jnp.asarray(u, dtype), jnp.asarray(np.diag(s), dtype), jnp.asarray(vt.T, dtype))


def host_compose(factors: Factors, shape: tuple[int, ...]) -> jax.Array:
    """``U S V^T`` reshaped to ``shape``, computed on the host in float64 (see :func:`host_factorize`)."""
    u, s, v = (np.asarray(f, np.float64) for f in factors)
    return jnp.asarray(((u @ s) @ v.T).reshape(shape), factors.U.dtype)


def compose(factors: Factors) -> jax.Array:
    """The dense matrix ``U S V^T``."""
    u, s, v = factors
    return (u @ s) @ v.T


def ab_factors(matrix: jax.Array, rank: int | None = None) -> tuple[jax.Array, jax.Array]:
    """AB-training factors ``A = U sqrt(S)`` (``(m, r)``) and ``B = sqrt(S) V^T`` (``(r, n)``), ``W ~= A B``.

    Args:
      matrix: a ``(m, n)`` array.
      rank: number of singular triplets kept (``None``: all).

    Returns:
      ``(A, B)``.
    """
    u, s, v = factorize(matrix, rank)
    root = jnp.sqrt(jnp.diag(s))
    return u * root[None, :], root[:, None] * v.T


def cutoff_rank(singular_values: jax.Array | np.ndarray, cutoff: float) -> int:
    """The number of leading singular values with ``s_i >= cutoff * s_0``.

    That is the first index ``i`` with ``s_i < cutoff * s_0`` (the OIALR rule: ``s`` is a 1-D array of
    non-negative values in descending order); at least 1.

    Args:
      singular_values: descending singular values.
      cutoff: relative threshold in ``(0, 1)``.
    """
    check_cutoff(cutoff)
    s = np.asarray(singular_values, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"singular_values: need a non-empty 1-D array, got shape {s.shape}")
    below = np.nonzero(s < cutoff * s[0])[0]
    return max(1, int(below[0]) if below.size else int(s.size))


def limited_rank(current: int, proposed: int, *, max_cut_fraction: float = 0.5, min_rank: int = 1) -> int:
    """A proposed new rank limited by OIALR's per-check rules.

    The rank never grows, drops by at most ``floor(max_cut_fraction * current)`` in one check, and never goes
    below ``min_rank`` (unless it is already there).

    Returns:
      ``min(current, max(proposed, current - floor(max_cut_fraction * current), min_rank))``.
    """
    if not 0.0 < max_cut_fraction <= 1.0:
        raise ValueError(f"max_cut_fraction: must be in (0, 1], got {max_cut_fraction!r}")
    lowest = current - math.floor(max_cut_fraction * current)
    return min(current, max(proposed, lowest, min_rank))


def check_cutoff(cutoff: float) -> None:
    """Raises unless ``0 < cutoff < 1``."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | float) or not 0.0 < cutoff < 1.0:
        raise ValueError(f"cutoff: must be a number in the open interval (0, 1), got {cutoff!r}")


def rank_buckets(full: int, ratio: float) -> tuple[int, ...]:
    """Descending storage sizes ``full, ceil(full / ratio), ceil(full / ratio^2), ..., 1`` (``ratio > 1``).

    A layer of rank ``r`` is stored at the smallest bucket ``>= r`` (padded with zeros), so the array shapes,
    and with them the jit re-compilations, change only when a rank crosses a bucket boundary: at most
    ``log(full) / log(ratio) + 1`` distinct shapes per layer. ``ratio == 1`` means no buckets (every rank exact).
    """
    if not (isinstance(ratio, int | float) and ratio >= 1.0):
        raise ValueError(f"bucket_ratio: must be a number >= 1 (1 = exact shapes), got {ratio!r}")
    if ratio == 1.0:
        return tuple(range(full, 0, -1))
    sizes, size = [full], float(full)
    while sizes[-1] > 1:
        size /= ratio
        nxt = min(sizes[-1] - 1, math.ceil(size))
        sizes.append(max(1, nxt))
    return tuple(sizes)


def bucket_size(rank: int, full: int, ratio: float) -> int:
    """The storage size for a layer of rank ``rank`` (see :func:`rank_buckets`)."""
    return min(b for b in rank_buckets(full, ratio) if b >= rank)
