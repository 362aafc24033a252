r"""Forward gradients by activity perturbation on block-chain models, with optional local losses.

Perturbation. A chain computes ``h_l = f_l(theta_l, h_{l-1})`` (``h_0 = x``, ``y = h_L``) and the loss
``L = output_loss(y, t)``, a mean over the batch. Activity perturbation adds a perturbation to every block output,

.. math:: h_l = f_l(\theta_l, h_{l-1}) + \epsilon_l, \qquad \epsilon_l = 0,

and differentiates with respect to the ``epsilon_l`` instead of the weights. A tangent ``u = (u_1, ..., u_L)``
has, for each block, the shape of one example's block output and is shared by every example of the batch (the
activity dimension ``N = sum_l |h_l| / B`` is what is sampled, not ``B N``). One forward-mode pass carries it:
``\dot h_l = J_{f_l}\,\dot h_{l-1} + u_l`` with ``\dot h_0 = 0``, so for each example ``b``

.. math:: d_{b,i} = \langle \partial L / \partial y_b, \dot y_{b,i} \rangle
          = \sum_l \langle \delta_{l,b}, u_{l,i} \rangle, \qquad \delta_{l,b} = \partial L / \partial h_{l,b},

the directional derivative of the loss along ``u_i`` in example ``b``'s activity space (``delta`` is the
activity gradient backprop would compute; the ``1/B`` of the batch mean is inside it). ``\partial L / \partial y``
is one reverse step through the output loss only; the network itself is traversed in forward mode only, and the
primal is computed once for all ``k`` tangents.

Estimate. For each example the ``k`` numbers ``d_b`` are combined into an estimate of ``delta_b`` on the tangents
``U`` (``k x N``) by the aggregation (``jaxalgo.grads._combine``): ``sum`` ``U^T d_b``, ``mean`` ``U^T d_b / k``
(unbiased for Gaussian tangents), or ``orthogonal_projection`` (FROG) ``U^T G^{-1} d_b`` with the Gram matrix
``G = U U^T = sum_l U_l U_l^T`` shared by the whole batch (tangents over all blocks at once, "global" tangents).
With ``k >= N`` linearly independent tangents the projection returns ``delta_b`` exactly (the first ``N`` are used
when ``k > N``). Block ``l``'s weight gradient is then the block-local vector-Jacobian product

.. math:: \hat g_{\theta_l} = \sum_b (\partial f_l(\theta_l, h_{l-1,b}) / \partial \theta_l)^T \hat\delta_{l,b},

which is the exact weight gradient whenever ``\hat\delta = \delta``, and unbiased when ``\hat\delta`` is.

Local losses (Ren et al.). With ``local_losses=True`` every hidden block ``l < L`` also gets its own objective
``L_l = output_loss(flatten(h_l) R_l, t)`` through a fixed random linear readout ``R_l`` (entries
``N(0, 1 / |h_l|)``, drawn from ``jax.random.fold_in(readout_key, l)``, the same at every step), the last block
keeps the true loss, and each block learns from its own objective only: block inputs are treated as constants
(the stop-gradient between blocks of local learning), so ``u_l`` reaches only ``L_l`` and every block gets its own
directional derivatives ``d_{l,b,i} = <partial L_l / partial h_{l,b}, u_{l,i}>``, its own Gram matrix
``U_l U_l^T`` and its own estimate. The target is then ``grad_{theta_l} L_l(f_l(theta_l, sg(h_{l-1})))``, a lower-
dimensional (lower-variance) estimation problem per block; ``loss`` is still the true output loss. With
``readout_learning_rate > 0`` the readouts are learned instead (Ren et al. train their local heads): they live in the
estimator's state and every step takes a plain gradient step ``R_l <- R_l - lr * flatten(h_l)^T dL_l/dr_l`` on their
own local loss (the exact gradient of one linear map, not part of the model's gradient).

Simulated mode. ``mode="simulated"`` computes the activity gradients ``delta_l`` by backprop and then
``d_{b,i} = sum_l <delta_{l,b}, u_{l,i}>`` (the reference's default for its network runs). It needs a full backward
pass, so it is no backprop-free algorithm: a test oracle and a way to match the paper's numbers, never the default.

Relation to the reference. The FROG reference perturbs the output of every layer that has parameters (for its
MLPs: the linear layers, i.e. pre-activations); jaxalgo's blocks contain their activation, so here the perturbation
is after it. Its simulated path works as above (per-example directional derivatives, one projection over the
concatenated tangents of all blocks). Its forward-mode path is defective: it detaches each layer's input, which
in PyTorch also drops the forward tangent (documented for ``Tensor.detach``), so only the last layer's perturbation
reaches the loss, and it uses the scalar directional derivative of the batch-mean loss for every example;
jaxalgo's forward mode equals its simulated mode instead (tested).

References:
  Flügel et al., "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients", arXiv 2410.17764,
  2024 (multi-tangent forward gradients, FROG).
  Ren, Kornblith, Liao, Hinton, "Scaling Forward Gradient With Local Losses", ICLR 2023, arXiv 2210.03310
  (activity perturbation, local losses).
  Mostafa, Ramesh, Cauwenberghs, "Deep supervised learning using local errors", Frontiers in Neuroscience 2018
  (local losses through fixed random classifiers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxalgo.grads import _combine, _forward, _tangents
from jaxalgo.grads._combine import Aggregation
from jaxalgo.grads._estimator import EmptyState, Estimator, Problem, check_float_params
from jaxalgo.grads._forward import ForwardMode
from jaxalgo.grads._tangents import Distribution
from jaxalgo.options import check_fields, option

TANGENTS: tuple[Distribution, ...] = _tangents.DISTRIBUTIONS
MODES: tuple[ForwardMode, ...] = _forward.MODES


class LocalReadoutState(NamedTuple):
    """State of an activity-perturbation estimator with learned local readouts: one ``(|h_l|, C)`` matrix per hidden
    block."""

    readouts: tuple[jax.Array, ...]


def _check_options(num_tangents: Any, aggregation: Any, tangents: Any, mode: Any) -> None:
    _combine.check_num_tangents(num_tangents)
    _combine.check_aggregation(aggregation)
    if tangents not in TANGENTS:
        raise ValueError(f"tangents: unknown tangent distribution {tangents!r}; allowed: {', '.join(TANGENTS)}")
    if mode not in MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; allowed: {', '.join(MODES)}")


def sample_activity_tangents(
    key: jax.Array,
    num_tangents: int,
    shapes: Sequence[tuple[int, ...]],
    dtype: Any,
    *,
    distribution: Distribution = "gaussian",
    normalize: bool = False,
    normalize_per_block: bool = False,
) -> list[jax.Array]:
    """``k`` activity tangents, one per example-shaped block output, shared by the batch.

    Tangent ``i`` is one draw of ``N = sum_l prod(shapes[l])`` numbers from ``jax.random.fold_in(key, i)`` (standard
    Gaussian or Rademacher +-1), cut into the blocks in order. ``normalize`` divides it by its norm over all blocks
    (or, with ``normalize_per_block``, each block's part by its own norm).

    Returns:
      One array per block, shape ``(k, *shapes[l])``, in ``dtype``.
    """
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)

    def draw(index):
        sub = jax.random.fold_in(key, index)
        if distribution == "gaussian":
            return jax.random.normal(sub, (total,), dtype)
        return jax.random.rademacher(sub, (total,), dtype)

    flat = jax.vmap(draw)(jnp.arange(num_tangents))
    parts, start = [], 0
    for size in sizes:
        parts.append(flat[:, start : start + size])
        start += size
    if normalize:
        if normalize_per_block:
            parts = [p / jnp.linalg.norm(p.astype(jnp.float32), axis=1, keepdims=True).astype(dtype) for p in parts]
        else:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(p.astype(jnp.float32)), axis=1) for p in parts))
            parts = [p / norm[:, None].astype(dtype) for p in parts]
    return [p.reshape(num_tangents, *shape) for p, shape in zip(parts, shapes, strict=True)]


def _flat(a: jax.Array, lead: int) -> jax.Array:
    return a.reshape(*a.shape[:lead], -1)


def _wide(a: jax.Array) -> Any:
    """The dtype directional derivatives are formed in: ``a``'s, at least float32."""
    return jnp.promote_types(a.dtype, jnp.float32)


def _coefficients(aggregation: Aggregation, d: jax.Array, flat_tangents: Sequence[jax.Array]) -> jax.Array:
    """Coefficients ``c`` (k, B) with ``delta_b ~ U^T c_b`` from ``d`` (k, B) and the tangents (each (k, n_l))."""
    k = d.shape[0]
    gram: jax.Array | None = None
    if aggregation == "orthogonal_projection":
        dtype = jnp.promote_types(d.dtype, jnp.float32)
        gram = sum((t.astype(dtype) @ t.astype(dtype).T for t in flat_tangents), jnp.zeros((k, k), dtype))
        used = min(k, sum(t.shape[1] for t in flat_tangents))
        if used < k:  # more tangents than activity dimensions: the first N span the whole space.
            mask = jnp.arange(k) < used
            d = jnp.where(mask[:, None], d, 0)
            gram = jnp.where(mask[:, None] & mask[None, :], gram, jnp.eye(k, dtype=dtype))
    return _combine.combination_coefficients(aggregation, d, gram)


def activity_forward_gradient(
    chain: Any,
    output_loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    num_tangents: int,
    aggregation: Aggregation = "mean",
    tangents: Distribution = "gaussian",
    normalize_tangents: bool = False,
    scaling_correction: bool = False,
    mode: ForwardMode = "forward",
    local_losses: bool = False,
    readout_key: jax.Array | None = None,
    readout_learning_rate: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> Estimator:
    """Multi-tangent forward gradient by activity perturbation (FROG with ``aggregation="orthogonal_projection"``).

    Each block's output gets ``k`` tangents shared by the batch; per-example directional derivatives come from one
    forward-mode pass (the primal computed once); each example's activity gradient is estimated by the aggregation
    and turned into weight gradients by a block-local vector-Jacobian product. The maths, the local-loss variant and
    how this relates to the reference are in the module docstring of ``jaxalgo.grads._activity``.

    Args:
      chain: the model's pure function, a :class:`jaxalgo.models.ChainFn`; ``params`` are its per-block dicts.
      output_loss: ``output_loss(y_pred, y_true)``, a floating-point scalar that is a mean over the batch of
        per-example terms (every loss in ``jaxalgo.losses``).
      num_tangents: ``k >= 1``.
      aggregation: ``"sum"``, ``"mean"`` or ``"orthogonal_projection"``.
      tangents: ``"gaussian"`` (standard normal) or ``"rademacher"`` (+-1; the projection then needs the ``k``
        sign vectors to be linearly independent, which fails with non-negligible probability only for tiny ``N``).
      normalize_tangents: divide each tangent by its norm (over all blocks; per block with ``local_losses``).
      scaling_correction: multiply the estimate by the reference's correction factor
        (``jaxalgo.grads._combine.scaling_correction`` with ``n`` = the activity dimension, per block with
        ``local_losses``).
      mode: ``"forward"`` (directional derivatives by ``jax.jvp``) or ``"simulated"`` (by backprop, then ``U delta``;
        a test oracle and for parity with the paper).
      local_losses: give each hidden block its own loss through a fixed random linear readout (see above).
      readout_key: the PRNG key of the readouts (their initial value when learned); default ``jax.random.key(0)``.
      readout_learning_rate: ``0`` keeps the random readouts fixed (stateless estimator); ``> 0`` learns them by SGD
        at this rate on their local losses, in the estimator state (:class:`LocalReadoutState`).
      input_shape: the shape of one input example, without the batch axis; needed (only) by learned readouts, whose
        shapes ``init`` derives from it.

    Returns:
      An :class:`~jaxalgo.grads.Estimator` (stateless); ``value_and_grad(params, state, batch, *, key)`` takes a batch
      ``{"x": inputs, "y": targets, ...}`` and returns the output loss, the estimate and the state.

    Example::

      fn, params = jaxalgo.models.split_chain(model)
      est = jaxalgo.grads.activity_forward_gradient(
          fn, jaxalgo.losses.softmax_cross_entropy, num_tangents=16, aggregation="orthogonal_projection")
      loss, grads, state = est.value_and_grad(params, est.init(params), batch, key=key)

    References:
      Flügel et al., arXiv 2410.17764, 2024; Ren et al., arXiv 2210.03310, 2022.
    """
    if not (hasattr(chain, "apply_block") and hasattr(chain, "num_blocks")):
        raise TypeError(f"chain: expected a jaxalgo.models.ChainFn (see split_chain), got {type(chain).__name__}")
    if not callable(output_loss):
        raise TypeError(f"output_loss: expected a callable, got {type(output_loss).__name__}")
    _check_options(num_tangents, aggregation, tangents, mode)
    if isinstance(readout_learning_rate, bool) or not isinstance(readout_learning_rate, int | float):
        raise TypeError(f"readout_learning_rate: must be a number >= 0, got {readout_learning_rate!r}")
    if not readout_learning_rate >= 0:
        raise ValueError(f"readout_learning_rate: must be a number >= 0, got {readout_learning_rate!r}")
    learned = readout_learning_rate > 0
    if learned and not local_losses:
        raise ValueError("readout_learning_rate: learned readouts need local_losses=True")
    if learned and input_shape is None:
        raise ValueError("input_shape: learned readouts (readout_learning_rate > 0) need one input example's shape")
    k = num_tangents
    num_blocks = chain.num_blocks
    if readout_key is None:
        readout_key = jax.random.key(0)

    def checked_loss(y_pred, y_true):
        value = output_loss(y_pred, y_true)
        shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
        if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "output_loss: must return a floating-point scalar (a mean over the batch); "
                f"got shape {shape} and dtype {dtype}"
            )
        return value

    def check_inputs(params, batch):
        check_float_params(params)
        if not isinstance(params, (tuple, list)) or len(params) != num_blocks:
            got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
            raise ValueError(f"params: expected a sequence of {num_blocks} per-block dicts (split_chain), got {got}")
        if not hasattr(batch, "keys") or "x" not in batch or "y" not in batch:
            raise ValueError("batch: expected a mapping with keys 'x' (inputs) and 'y' (targets)")

    def readouts(outputs):
        """Random readouts R_l (|h_l|, C) for the hidden blocks (fixed, or the initial learned ones)."""
        width = outputs[-1].shape[-1]
        mats = []
        for index, h in enumerate(outputs[:-1]):
            size = math.prod(h.shape[1:])
            sub = jax.random.fold_in(readout_key, index)
            dtype = jnp.promote_types(h.dtype, jnp.float32)  # a readout is state (learned ones): never bfloat16
            mats.append(jax.random.normal(sub, (size, width), dtype) / jnp.sqrt(jnp.asarray(size, dtype)))
        return mats

    def heads(outputs, mats):
        """The function of each block output whose loss the block learns from (local losses)."""
        fns = [lambda h, r=r: _flat(h, 1) @ r for r in mats]
        return [*fns, lambda h: h][: len(outputs)]

    def primal(params, x):
        inputs, outputs, vjps = [], [], []
        h = x
        for index, block_params in enumerate(params):
            inputs.append(h)
            h, vjp = jax.vjp(lambda p, h_in=h, i=index: chain.apply_block(i, p, h_in), block_params)
            outputs.append(h)
            vjps.append(vjp)
        return inputs, outputs, vjps

    def global_tangent_output(params, inputs, us):
        """``dot y`` (k, B, ...) of the chain with ``u_l`` added at every block output."""
        shared, t = True, None  # a tangent shared by the batch is kept without its batch axis
        for index, (block_params, h_in, u) in enumerate(zip(params, inputs, us, strict=True)):
            if t is not None:
                f = lambda h, p=block_params, i=index: chain.apply_block(i, p, h)
                if shared:  # per example, so that a batch-independent tangent stays unbatched (cheaper)

                    def per_example(h, dh, f=f):
                        return jax.jvp(lambda a: f(a[None])[0], (h,), (dh,))[1]

                    t = jax.vmap(jax.vmap(per_example, in_axes=(0, None)), in_axes=(None, 0))(h_in, t)
                    shared = False
                else:
                    t = jax.vmap(lambda dh, f=f, h=h_in: jax.jvp(f, (h,), (dh,))[1])(t)
                t = t + (u if shared else u[:, None])
            else:
                t = u
        if shared:
            t = jnp.broadcast_to(t[:, None], (t.shape[0], inputs[0].shape[0], *t.shape[1:]))
        return t

    def directional_global(params, inputs, outputs, us, labels):
        y = outputs[-1]
        if mode == "forward":
            y_dot = global_tangent_output(params, inputs, us)
            g_y = jax.grad(checked_loss)(y, labels)
            return jnp.einsum("bc,kbc->kb", _flat(g_y, 1), _flat(y_dot, 2).astype(g_y.dtype))

        def loss_of_perturbations(eps):
            h = inputs[0]
            for index, block_params in enumerate(params):
                h = chain.apply_block(index, block_params, h) + eps[index]
            return checked_loss(h, labels)

        deltas = jax.grad(loss_of_perturbations)([jnp.zeros_like(h) for h in outputs])
        return sum(
            jnp.einsum("bn,kn->kb", _flat(dl, 1).astype(_wide(dl)), _flat(u, 1).astype(_wide(dl)))
            for dl, u in zip(deltas, us, strict=True)
        )

    def directional_local(outputs, us, labels, mats):
        ds = []
        for head, h, u in zip(heads(outputs, mats), outputs, us, strict=True):
            if mode == "forward":
                # Block inputs are constants here, so the tangent of h_l is u_l itself for every example, and the
                # heads are linear: the head's forward-mode derivative along u_l is one (k, C) array for the batch.
                def head_tangent(du, h=h, head=head):
                    return jax.jvp(head, (h[:1],), (du[None],))[1][0]

                head_dot = jax.vmap(head_tangent)(u)
                g_r = jax.grad(lambda z: checked_loss(z, labels))(head(h))
                ds.append(jnp.einsum("bc,kc->kb", _flat(g_r, 1), _flat(head_dot, 1).astype(g_r.dtype)))
            else:
                delta = jax.grad(lambda z, head=head: checked_loss(head(z), labels))(h)
                wide = _wide(delta)
                ds.append(jnp.einsum("bn,kn->kb", _flat(delta, 1).astype(wide), _flat(u, 1).astype(wide)))
        return ds

    def correction(size):
        if not scaling_correction:
            return 1.0
        return _combine.scaling_correction(aggregation, num_tangents=k, num_params=size)

    def value_and_grad(params, state, batch, *, key):
        check_inputs(params, batch)
        labels = batch["y"]
        inputs, outputs, vjps = primal(params, batch["x"])
        loss = checked_loss(outputs[-1], labels)
        shapes = [h.shape[1:] for h in outputs]
        us = sample_activity_tangents(
            key,
            k,
            shapes,
            outputs[-1].dtype,
            distribution=tangents,
            normalize=normalize_tangents,
            normalize_per_block=local_losses,
        )
        # each block's tangent in its output's dtype (bfloat16 activations under mixed precision: jax.jvp wants it
        # there); the Gram matrix and the combination use these same rounded tangents, in float32
        us = [u.astype(h.dtype) for u, h in zip(us, outputs, strict=True)]
        flat_us = [_flat(u, 1) for u in us]
        if local_losses:
            mats = list(state.readouts) if learned else readouts(outputs)
            ds = directional_local(outputs, us, labels, mats)
            if learned:
                state = LocalReadoutState(tuple(train_readouts(outputs[:-1], mats, labels)))
            coefficient_sets = [
                _coefficients(aggregation, d, [fu]) * correction(fu.shape[1]) for d, fu in zip(ds, flat_us, strict=True)
            ]
        else:
            d = directional_global(params, inputs, outputs, us, labels)
            c = _coefficients(aggregation, d, flat_us) * correction(sum(fu.shape[1] for fu in flat_us))
            coefficient_sets = [c] * num_blocks
        grads = []
        for c, u, h, vjp in zip(coefficient_sets, us, outputs, vjps, strict=True):
            delta_hat = jnp.einsum("kb,kn->bn", c, _flat(u, 1).astype(c.dtype)).reshape(h.shape).astype(h.dtype)
            grads.append(vjp(delta_hat)[0])
        return loss, type(params)(grads), state

    def train_readouts(hidden_outputs, mats, labels):
        """One SGD step of every readout on its own local loss (exact gradient of the linear head)."""
        new = []
        for h, r in zip(hidden_outputs, mats, strict=True):
            grad_r = jax.grad(lambda m, h=h: checked_loss(_flat(h, 1) @ m, labels))(r)
            new.append(r - readout_learning_rate * grad_r.astype(r.dtype))
        return new

    def init(params):
        check_float_params(params)
        if not learned:
            return EmptyState()
        x = jax.ShapeDtypeStruct((1, *input_shape), jax.tree.leaves(params)[0].dtype)
        shapes = jax.eval_shape(chain.block_outputs, params, x)
        return LocalReadoutState(tuple(readouts([jnp.zeros(o.shape, o.dtype) for o in shapes])))

    return Estimator(init, value_and_grad)


@dataclasses.dataclass(frozen=True)
class ActivityOptions:
    """Activity perturbation: tangents on the block outputs (see :func:`activity_forward_gradient`).

    Attributes:
      num_tangents: number of tangents k shared by the batch (>= 1).
      aggregation: how the k directional derivatives combine: sum, mean (unbiased) or orthogonal_projection (FROG).
      tangent_dist: gaussian or rademacher (rank-1 tangents are for weight perturbation: fg-rank1, frog-rank1).
      normalize_tangents: divide each tangent by its norm.
      scaling_correction: multiply the estimate by the reference's correction factor.
      mode: forward (directional derivatives by forward mode) or simulated (by backprop; a test oracle).
      local_losses: give each hidden block its own loss through a linear readout to the targets.
      readout_learning_rate: 0 keeps the random readouts fixed; > 0 learns them by SGD at this rate.
    """

    num_tangents: int = option(16, flag="tangents")
    aggregation: Aggregation = "mean"
    tangent_dist: Distribution = "gaussian"
    normalize_tangents: bool = False
    scaling_correction: bool = False
    mode: ForwardMode = option("forward", flag="forward_mode")
    local_losses: bool = False
    readout_learning_rate: float = 0.0

    data_parallel: ClassVar[bool] = True

    def __post_init__(self):
        check_fields(self)
        _combine.check_num_tangents(self.num_tangents)
        if not (math.isfinite(self.readout_learning_rate) and self.readout_learning_rate >= 0):
            raise ValueError(f"readout_learning_rate: must be a finite number >= 0, got {self.readout_learning_rate!r}")

    def build(self, problem: Problem) -> Estimator:
        problem.require("chain", "output_loss", by="activity perturbation")
        assert problem.output_loss is not None  # checked by require
        if problem.has_aux:
            raise ValueError("problem: activity perturbation takes an output loss, not a loss with aux (has_aux)")
        return activity_forward_gradient(
            problem.chain,
            problem.output_loss,
            num_tangents=self.num_tangents,
            aggregation=self.aggregation,
            tangents=self.tangent_dist,
            normalize_tangents=self.normalize_tangents,
            scaling_correction=self.scaling_correction,
            mode=self.mode,
            local_losses=self.local_losses,
            readout_key=problem.key,
            readout_learning_rate=self.readout_learning_rate,
            input_shape=problem.input_shape,
        )
