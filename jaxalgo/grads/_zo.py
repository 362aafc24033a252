"""Two-point zeroth-order gradient estimates (SPSA / MeZO): directional derivatives from forward evaluations only.

With the same ``k`` tangents ``v_1 .. v_k`` as :func:`~jaxalgo.grads.forward_gradient` (rows of ``V``; tangent ``i``
drawn from ``fold_in(key, i)``, Gaussian or Rademacher, see :mod:`jaxalgo.grads._tangents`), the directional
derivatives are central differences

.. math::
  d_i = \\frac{f(\\theta + \\epsilon v_i) - f(\\theta - \\epsilon v_i)}{2 \\epsilon}
      = \\langle \\nabla f(\\theta), v_i \\rangle + \\frac{\\epsilon^2}{6} D^3 f(\\theta)[v_i, v_i, v_i]
        + O(\\epsilon^4),

exact (up to rounding) when ``f`` is quadratic, and the estimate is ``g = V^T c`` with the coefficients ``c`` of the
aggregation (``sum``: ``d``; ``mean``: ``d / k``, unbiased up to the ``O(eps^2)`` bias; ``orthogonal_projection``:
``(V V^T)^{-1} d``; see :mod:`jaxalgo.grads._combine`). Tangents, batching strategies and aggregation are the forward
gradient's own code (:class:`jaxalgo.grads._forward.DenseTangents`); only the directional source differs, so for a
key the two estimators use the very same tangents and differ only by the finite-difference error in ``d``.

Cost per step: ``2 k + 1`` evaluations of ``f`` and no derivative at all (no JVP, no backprop), so the memory is that
of inference plus the perturbed parameters and the tangents in flight: with ``scan``, one tangent and one perturbed
copy of the parameters (``2 n``); with ``vmap``, ``V`` and ``k`` perturbed copies. The extra evaluation is ``f(theta)``
itself: the reported loss (and aux) is the true loss at ``theta``, not the mean of ``f(theta +- eps v_i)``, which
is larger by ``(eps^2 / 2k) sum_i v_i^T H v_i`` on average and would make loss curves depend on ``eps`` and ``k``.

Numerics: the rounding error of ``d_i`` is about ``u |f| / eps`` (``u`` the unit roundoff of the loss), the
truncation error ``eps^2 |D^3 f| |v|^3 / 6``; ``eps = 1e-3`` (the paper's) suits float32. The step ``eps v_i`` is
``eps sqrt(n)`` long for Gaussian or Rademacher tangents. Each perturbed leaf is computed in at least float32 and
rounded once to the leaf's dtype; with bfloat16 or float16 parameters a perturbation below half an ulp of a parameter
is lost, so use a larger ``eps`` there.

Differences from the reference MeZO (Malladi et al.): MeZO perturbs the parameters *in place*
(``theta += eps z``, evaluate, ``theta -= 2 eps z``, evaluate, ``theta += eps z``), regenerating ``z`` from a stored
random seed at each pass so that no tangent and no parameter copy is ever stored, and fuses the SGD update into a
fourth pass (``theta -= lr d z``). JAX arrays are immutable, so here each perturbed parameter vector is a new array
(one extra copy per tangent in flight) and never drifts by rounding from the restored ``theta``; the tangents
regenerate from the step's key (``fold_in(key, i)``, block by block for the Gram matrix and the estimate, as for the
forward gradient); and the estimate is returned as an ``n``-sized gradient pytree for any optax optimizer instead of
being applied in place. MeZO uses ``k = 1`` (its n-SPSA variant averages ``n`` draws: ``aggregation="mean"``); the
projection is this library's addition. Data parallelism moves only the ``k`` numbers ``d`` (and the loss): the
central difference of a mean loss is the mean of the shards' central differences.

References:
  Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, NeurIPS 2023.
  Spall, "Multivariate Stochastic Approximation Using a Simultaneous Perturbation Gradient Approximation",
  IEEE Transactions on Automatic Control 37(3), 1992.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxalgo.grads import _combine, _tangents
from jaxalgo.grads._combine import Aggregation
from jaxalgo.grads._estimator import Batch, Estimator, Params, Problem
from jaxalgo.grads._forward import (
    Batching,
    DenseTangents,
    Source,
    check_batching,
    check_choice,
    check_flags,
    check_loss_fn,
    checked_loss,
    dense_estimator,
    dense_tangent_bytes,
)
from jaxalgo.grads._tangents import Distribution
from jaxalgo.options import check_fields, option


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` as a Python float, or a ValueError unless it is a concrete finite number ``> 0``."""
    if isinstance(epsilon, jax.core.Tracer):
        raise ValueError(
            f"epsilon: must be a number > 0 fixed when the estimator is built, got a traced value "
            f"{jax.typeof(epsilon)}; pass a Python float"
        )
    scalar_array = isinstance(epsilon, np.ndarray | jax.Array) and epsilon.shape == ()
    number = (isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool)) or (
        scalar_array and (jnp.issubdtype(epsilon.dtype, jnp.floating) or jnp.issubdtype(epsilon.dtype, jnp.integer))
    )
    value = float(epsilon) if number else math.nan
    if not (value > 0 and math.isfinite(value)):
        finite = "" if not number or math.isnan(value) or value <= 0 else " (it must be finite)"
        raise ValueError(f"epsilon: must be a number > 0, got {epsilon!r}{finite}")
    return value


def check_zeroth_order_options(
    *,
    num_tangents: Any,
    aggregation: Any,
    tangents: Any,
    epsilon: Any,
    normalize_tangents: Any,
    scaling_correction: Any,
    batching: Any,
    chunk_size: Any,
    has_aux: Any = False,
    tangents_name: str = "tangents",
) -> float:
    """Every check of :func:`zeroth_order`'s options; returns ``epsilon`` as a float. ``tangents_name`` is how the
    caller spells ``tangents`` (``tangent_dist`` in :class:`ZeroOrderOptions`)."""
    _combine.check_num_tangents(num_tangents)
    _combine.check_aggregation(aggregation)
    if isinstance(tangents, str) and tangents == "rank1":
        raise ValueError(
            f"{tangents_name}: the zeroth-order estimator draws dense tangents (allowed: "
            f"{', '.join(_tangents.DISTRIBUTIONS)}), got 'rank1'; rank-1 tangents are for "
            "forward_gradient(tangents='rank1')"
        )
    check_choice(tangents_name, "tangent distribution", tangents, _tangents.DISTRIBUTIONS)
    value = check_epsilon(epsilon)
    check_flags(normalize_tangents=normalize_tangents, scaling_correction=scaling_correction, has_aux=has_aux)
    check_batching(batching, chunk_size)
    return value


def _two_point(loss_fn: Callable[..., Any], has_aux: bool, epsilon: float) -> Source:
    """The zeroth-order :data:`~jaxalgo.grads._forward.Source`: ``f(theta)`` once, then
    ``(f(theta + eps v) - f(theta - eps v)) / (2 eps)`` per tangent."""
    checked = checked_loss(loss_fn, has_aux)

    def source(params: Params, batch: Batch):
        out = checked(params, batch)
        leaves, treedef = jax.tree.flatten(params)

        def loss_at(v_leaves, step):
            moved = []
            for p, v in zip(leaves, v_leaves, strict=True):
                compute = jnp.promote_types(p.dtype, jnp.float32)
                moved.append((p.astype(compute) + step * v.astype(compute)).astype(p.dtype))
            value = checked(jax.tree.unflatten(treedef, moved), batch)
            value = value[0] if has_aux else value
            return value.astype(jnp.promote_types(value.dtype, jnp.float32))

        def push(v_leaves, v_flat):
            del v_flat
            return (loss_at(v_leaves, epsilon) - loss_at(v_leaves, -epsilon)) / (2 * epsilon)

        return out, push

    return source


def zeroth_order(
    loss_fn: Callable[..., Any],
    *,
    num_tangents: int,
    aggregation: Aggregation = "mean",
    tangents: Distribution = "gaussian",
    epsilon: float = 1e-3,
    normalize_tangents: bool = False,
    scaling_correction: bool = False,
    batching: Batching = "vmap",
    chunk_size: int | None = None,
    has_aux: bool = False,
) -> Estimator:
    """Two-point zeroth-order (SPSA / MeZO) gradient estimate of ``loss_fn`` along ``k`` random tangents.

    ``d_i = (f(theta + eps v_i) - f(theta - eps v_i)) / (2 eps)`` (forward evaluations only; ``O(eps^2)`` from
    ``<grad f, v_i>``, exact on quadratics), then ``g = V^T c`` as :func:`~jaxalgo.grads.forward_gradient` combines
    its ``d``: same tangents for the same key, same aggregations, same batching strategies. See the module docstring
    for the maths, the cost (``2 k + 1`` evaluations per step) and how it differs from the reference MeZO.

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning a floating-point scalar, or ``(scalar, aux)`` with
        ``has_aux=True``. Need not be differentiable.
      num_tangents: ``k >= 1``.
      aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal_projection"``.
      tangents: ``"gaussian"`` (``N(0, I)``) or ``"rademacher"`` (``+-1``); rank-1 tangents are refused.
      epsilon: the perturbation scale ``eps > 0`` (a Python number, fixed when the estimator is built); ``1e-3`` as
        in the paper.
      normalize_tangents: use ``v_i / |v_i|`` in the estimate (the perturbation stays ``eps v_i``), as for the
        forward gradient.
      scaling_correction: multiply the estimate by the forward gradient's correction factor (see
        :mod:`jaxalgo.grads._combine`).
      batching: ``"vmap"`` (all tangents at once), ``"scan"`` (one at a time: one tangent and one perturbed
        parameter copy in memory) or ``"chunk"`` (``chunk_size`` at a time).
      chunk_size: tangents per chunk, with ``batching="chunk"`` only.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the aux returned is the one at ``theta``.

    Returns:
      A stateless :class:`~jaxalgo.grads.Estimator`. Its loss is ``f(theta)`` (one extra evaluation), not the mean
      of the perturbed losses. Its ``split`` is a :class:`~jaxalgo.grads.DirectionalSplit`:
      ``directional_derivatives(params, batch, *, key) -> (loss, d)`` with the ``k`` central differences along the
      unnormalised tangents, and ``estimate_from_directional(params, d, *, key) -> grads``, so that
      :func:`jaxalgo.parallel.data_parallel` all-reduces only ``k + 1`` numbers. The gradient pytree has the params'
      structure and dtypes.

    Raises:
      ValueError: for any bad option, naming it (also when built inside ``jax.jit``; a traced ``epsilon`` is
        refused).

    Example::

      est = jaxalgo.grads.zeroth_order(loss_fn, num_tangents=16, epsilon=1e-3)
      state = est.init(params)
      loss, grads, state = est.value_and_grad(params, state, batch, key=key)

    References:
      Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333, 2023.
    """
    check_loss_fn(loss_fn)
    eps = check_zeroth_order_options(
        num_tangents=num_tangents, aggregation=aggregation, tangents=tangents, epsilon=epsilon,
        normalize_tangents=normalize_tangents, scaling_correction=scaling_correction, batching=batching,
        chunk_size=chunk_size, has_aux=has_aux,
    )  # fmt: skip
    spec = DenseTangents(
        num_tangents, aggregation, tangents, normalize_tangents, scaling_correction, batching, chunk_size, has_aux
    )
    return dense_estimator(_two_point(loss_fn, has_aux, eps), spec)


@dataclasses.dataclass(frozen=True)
class ZeroOrderOptions:
    """Zeroth-order (SPSA / MeZO) estimates from forward evaluations only (see :func:`zeroth_order`).

    Attributes:
      num_tangents: number of random directions k (>= 1).
      aggregation: how the k estimates combine: sum, mean (unbiased) or orthogonal_projection.
      tangent_dist: gaussian or rademacher.
      epsilon: perturbation scale eps > 0 of the central difference (f(theta + eps v) - f(theta - eps v)) / (2 eps).
      normalize_tangents: divide each tangent by its norm in the estimate (sum and mean only).
      scaling_correction: multiply the estimate by the forward gradient's correction factor.
      batching: vmap (all tangents at once), scan (one at a time, memory flat in k) or chunk (chunk_size at a time).
      chunk_size: tangents per chunk, with batching=chunk only.
    """

    num_tangents: int = option(16, flag="tangents")
    aggregation: Aggregation = "mean"
    tangent_dist: Distribution = "gaussian"
    epsilon: float = option(1e-3, flag="zo_epsilon")
    normalize_tangents: bool = False
    scaling_correction: bool = False
    batching: Batching = "vmap"
    chunk_size: int | None = None

    data_parallel: ClassVar[bool] = True

    def __post_init__(self):
        check_fields(self)
        check_zeroth_order_options(
            num_tangents=self.num_tangents, aggregation=self.aggregation, tangents=self.tangent_dist,
            epsilon=self.epsilon, normalize_tangents=self.normalize_tangents,
            scaling_correction=self.scaling_correction, batching=self.batching, chunk_size=self.chunk_size,
            tangents_name="tangent_dist",
        )  # fmt: skip

    def working_bytes(self, param_bytes: int) -> int:
        """The perturbation directions' bytes (k parameter copies with vmap batching)."""
        return dense_tangent_bytes(self.num_tangents, self.batching, self.chunk_size, param_bytes)

    def build(self, problem: Problem) -> Estimator:
        return zeroth_order(
            problem.loss_fn,
            num_tangents=self.num_tangents,
            aggregation=self.aggregation,
            tangents=self.tangent_dist,
            epsilon=self.epsilon,
            normalize_tangents=self.normalize_tangents,
            scaling_correction=self.scaling_correction,
            batching=self.batching,
            chunk_size=self.chunk_size,
            has_aux=problem.has_aux,
        )


__all__ = ["ZeroOrderOptions", "zeroth_order"]
