"""How k directional derivatives become one gradient estimate: sum, mean, or orthogonal projection (FROG).

With tangents ``v_1 .. v_k`` (rows of ``V``, k x n) and directional derivatives ``d_i = <grad f, v_i>``, every
aggregation returns an estimate of the form ``g = sum_i c_i v_i = V^T c``; this module computes ``c``:

- ``sum``:  ``c = d``,
- ``mean``: ``c = d / k``,
- ``orthogonal_projection``: ``c = (V V^T)^{-1} d`` (Cholesky solve of the Gram matrix ``G = V V^T``), so that
  ``V^T c`` is the orthogonal projection of ``grad f`` onto the span of the tangents.

An optional scaling correction (off by default, as in the reference) rescales the estimate towards the norm of
the gradient: ``chi(n) / chi(k)`` for the projection with ``k < n`` (1 otherwise), with
``chi(m) = sqrt(2) Gamma((m + 1) / 2) / Gamma(m / 2)``; ``1 / (n a)`` for the mean with
``a = sqrt(2 / (pi n))`` for ``k = 1`` and ``a = sqrt((n + k) / (1 + k)) / n`` for ``k > 1`` (Gaussian tangents,
``E|v|^2 = n``); the mean's factor divided by ``k`` for the sum.

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients",
  arXiv 2410.17764, 2024.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp

Aggregation = Literal["sum", "mean", "orthogonal_projection"]
"""How the ``k`` directional derivatives of a forward-gradient estimator combine (the ``aggregation`` argument)."""
AGGREGATIONS: tuple[Aggregation, ...] = typing.get_args(Aggregation)


def check_aggregation(aggregation: object) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


def check_num_tangents(num_tangents: object) -> None:
    """Raises unless ``num_tangents`` is an integer ``k >= 1`` (every forward-gradient estimator's check)."""
    if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
        raise ValueError(f"num_tangents: must be an integer >= 1, got {num_tangents!r}")


def chi_mean(m: int) -> float:
    """``E|z|`` for ``z ~ N(0, I_m)``: ``sqrt(2) Gamma((m + 1) / 2) / Gamma(m / 2)``, via log-Gamma."""
    return math.sqrt(2.0) * math.exp(math.lgamma((m + 1) / 2) - math.lgamma(m / 2))


def scaling_correction(aggregation: Aggregation, *, num_tangents: int, num_params: int) -> float:
    """The reference's optional rescaling factor of the estimate (see the module docstring)."""
    check_aggregation(aggregation)
    k, n = num_tangents, num_params
    if aggregation == "orthogonal_projection":
        return chi_mean(n) / chi_mean(k) if k < n else 1.0
    a = math.sqrt(2.0 / (math.pi * n)) if k == 1 else math.sqrt((n + k) / (1 + k)) / n
    mean_factor = 1.0 / (n * a)
    return mean_factor if aggregation == "mean" else mean_factor / k


def full_precision_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full float32 precision on every backend. XLA's default on TPU (one bfloat16 pass) and on
    recent GPUs (TF32) keeps about 3 significant digits, which the Cholesky solve of the projection's Gram matrix
    ``V V^T`` amplifies by its condition number; on CPU this is the default anyway, so CPU and accelerator compute
    the same estimate."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def combination_coefficients(
    aggregation: Aggregation, directional: jax.Array, gram: jax.Array | None = None
) -> jax.Array:
    """The coefficients ``c`` (shape (k,)) of the estimate ``V^T c``.

    Args:
      aggregation: one of :data:`AGGREGATIONS`.
      directional: the directional derivatives ``d``, shape (k,), or (k, ...) for several right-hand sides (one
        column per example in activity perturbation).
      gram: the Gram matrix ``V V^T`` (k, k); needed only for ``orthogonal_projection``. It should be positive
        definite (linearly independent tangents, ``k <= n``); computed in at least float32. If its Cholesky
        factorisation breaks down (numerically singular: ``k`` close to ``n`` in float32, or dependent
        tangents) the pseudo-inverse is used instead, which projects onto the numerically independent
        directions rather than returning NaN.

    Returns:
      ``c`` in the dtype of ``directional`` promoted to at least float32.
    """
    check_aggregation(aggregation)
    dtype = jnp.promote_types(directional.dtype, jnp.float32)
    d = directional.astype(dtype)
    if aggregation == "sum":
        return d
    if aggregation == "mean":
        return d / d.shape[0]
    if gram is None:
        raise ValueError("gram: the orthogonal projection needs the Gram matrix V V^T of the tangents")
    return _projection_solve(gram.astype(dtype), d)


@jax.custom_jvp
def _projection_solve(gram: jax.Array, d: jax.Array) -> jax.Array:
    """``G^{-1} d`` (the pseudo-inverse where ``G`` is numerically singular), differentiable in both arguments."""
    return _solve_one_by_one(gram, d)


@_projection_solve.defjvp
def _projection_solve_jvp(primals, tangents):
    """``c = G^{-1} d`` gives ``dc = G^{-1} (dd - dG c)``, written with plain, transposable operations so that
    reverse mode works too (exact where ``G`` is invertible; with the pseudo-inverse where it is not)."""
    (gram, d), (d_gram, d_d) = primals, tangents
    c = _projection_solve(gram, d)
    rhs = d_d - jnp.tensordot(d_gram, c, axes=1)
    lower, _ = jax.scipy.linalg.cho_factor(gram, lower=True)
    invertible = jnp.all(jnp.isfinite(lower))  # of the primal only: the tangent map stays linear
    # a broken factor is replaced by the identity, so its unused branch carries no NaN into reverse mode
    safe = (jnp.where(invertible, lower, jnp.eye(gram.shape[-1], dtype=lower.dtype)), True)
    return c, jnp.where(invertible, jax.scipy.linalg.cho_solve(safe, rhs), _pseudo_solve(gram, rhs))


@jax.custom_batching.custom_vmap
def _solve_one_by_one(gram: jax.Array, d: jax.Array) -> jax.Array:
    """``G^{-1} d`` by Cholesky; only where that breaks down, the pseudo-inverse (``lax.cond``: not computed else)."""
    factor = jax.scipy.linalg.cho_factor(gram, lower=True)
    solution = jax.scipy.linalg.cho_solve(factor, d)
    return jax.lax.cond(jnp.all(jnp.isfinite(solution)), lambda: solution, lambda: _pseudo_solve(gram, d))


@_solve_one_by_one.def_vmap
def _solve_one_by_one_batched(axis_size: int, in_batched: list[bool], gram: jax.Array, d: jax.Array):
    """Under ``vmap`` (a sweep's lanes, a user's batch of runs) one solve after another, each with its own
    ``lax.cond``. A batched ``cond`` would compute both branches, and jaxlib's batched symmetric eigensolver on CPU
    splits its batch over the same thread pool that runs the program's other kernels: with two of them in flight
    on two cores, each waits for the other's pool threads, for ever (seen with FROG at 64 tangents in a sweep of
    4 or more learning rates)."""
    gram, d = (
        x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
        for x, batched in zip((gram, d), in_batched, strict=True)
    )
    return jax.lax.map(lambda pair: _solve_one_by_one(*pair), (gram, d)), True


def _pseudo_solve(gram: jax.Array, d: jax.Array) -> jax.Array:
    """``G^+ d`` by the eigendecomposition of the symmetric ``G``, eigenvalues below ``k eps max|lambda|`` dropped."""
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    cutoff = gram.shape[0] * jnp.finfo(gram.dtype).eps * jnp.max(jnp.abs(eigenvalues))
    inverse = jnp.where(eigenvalues > cutoff, 1.0 / jnp.where(eigenvalues > cutoff, eigenvalues, 1.0), 0.0)
    inverse = inverse.reshape(inverse.shape + (1,) * (d.ndim - 1))  # d may carry columns (k, ...)
    return vectors @ (inverse * (vectors.T @ d))
