r"""Feedback alignment (Lillicrap et al. 2016): backprop with fixed random matrices in place of the transposed
forward weights, layer by layer.

For dense layers :math:`a_l = h_{l-1} W_l + b_l`, :math:`h_l = f(a_l)` and the error at the output
:math:`\delta_L = \partial L / \partial a_L`, feedback alignment sends

.. math:: \delta_{l-1} = (\delta_l B_l) \odot f'(a_{l-1}), \qquad \Delta W_l = h_{l-1}^\top \delta_l,

with :math:`B_l` a fixed random matrix of the shape of :math:`W_l^\top` (``(out, in)``) where backprop has
:math:`W_l^\top`. Implemented as a matrix product with a ``custom_vjp`` (forward ``x W``, backward
``g B`` for the input and ``x^T g`` for the weight) inside an otherwise ordinary autodiff pass, so the
derivatives of the activations are taken at the true pre-activations. The first layer's input needs no
gradient, so it has no feedback matrix. Works on chains of :class:`jaxalgo.models.DenseBlock` (the MLP).

References:
  Lillicrap, Cownden, Tweed, Akerman, *Random synaptic feedback weights support error backpropagation for deep
  learning*, Nature Communications 7, 13276 (2016).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalgo.grads._estimator import Estimator, check_float_params, check_scalar_loss
from jaxalgo.grads._f3 import FeedbackState
from jaxalgo.grads._feedback import check_feedback_init, feedback_matrices
from jaxalgo.models import ACTIVATIONS, DenseBlock


@jax.custom_vjp
def feedback_matmul(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w`` whose input cotangent is ``g @ b`` (``b`` of shape ``w.T.shape``) instead of ``g @ w.T``."""
    return x @ w


def _feedback_matmul_fwd(x, w, b):
    return x @ w, (x, b)


def _feedback_matmul_bwd(residuals, g):
    x, b = residuals
    return g @ b, x.T @ g, jnp.zeros_like(b)


feedback_matmul.defvjp(_feedback_matmul_fwd, _feedback_matmul_bwd)


def _not_dense_message(index: int, name: str) -> str:
    return (
        f"chain: feedback alignment works layer by layer on chains of DenseBlock (the mlp); block {index} is a "
        f"{name}. Use dfa, drtp or f3 (block-wise feedback) for this model"
    )


def _dense_blocks(chain: Any, params: Any) -> list[Any]:
    """The chain's blocks as modules, checked to be DenseBlocks (the structure FA needs)."""
    modules = []
    for index, (graphdef, block_params) in enumerate(zip(chain.graphdefs, params, strict=True)):
        module = nnx.merge(graphdef, nnx.State(block_params))
        if not isinstance(module, DenseBlock):
            raise ValueError(_not_dense_message(index, type(module).__name__))
        modules.append(module)
    return modules


def fa(
    chain: Any,
    output_loss: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    feedback_init: str = "kaiming_uniform",
    key: jax.Array,
) -> Estimator:
    """Feedback alignment on an MLP chain: backprop with each ``W_l^T`` replaced by a fixed random ``B_l``.

    Args:
      chain: the pure function of an MLP (:func:`jaxalgo.models.mlp`), every block a ``DenseBlock``.
      output_loss: ``output_loss(z, y) -> scalar`` (mean over the batch).
      feedback_init: one of :data:`jaxalgo.grads.FEEDBACK_INITS`; ``B_l`` has shape ``(out_l, in_l)`` and the
        Kaiming bound ``1/sqrt(in_l)``.
      key: the PRNG key of the feedback matrices.

    Returns:
      An :class:`Estimator` with state :class:`FeedbackState` (matrices for blocks ``1 .. L-1``).
    """
    if not hasattr(chain, "graphdefs"):
        raise TypeError(f"chain: expected a jaxalgo.models.ChainFn, got {type(chain).__name__}")
    if not callable(output_loss):
        raise TypeError(f"output_loss: expected a callable, got {type(output_loss).__name__}")
    feedback_init = check_feedback_init(feedback_init)
    for index, graphdef in enumerate(chain.graphdefs):  # fail early where the graph definition names its type
        block_type = getattr((getattr(graphdef, "nodes", None) or [None])[0], "type", None)
        if isinstance(block_type, type) and not issubclass(block_type, DenseBlock):
            raise ValueError(_not_dense_message(index, block_type.__name__))

    def init(params):
        check_float_params(params)
        modules = _dense_blocks(chain, params)
        shapes: Sequence[tuple[int, int]] = [tuple(m.linear.kernel.shape[::-1]) for m in modules[1:]]
        dtype = params[0]["linear"]["kernel"].dtype
        return FeedbackState(feedback_matrices(key, shapes, feedback_init, dtype))

    def forward(params, feedback, x):
        modules = _dense_blocks(chain, params)
        for index, (module, block_params) in enumerate(zip(modules, params, strict=True)):
            if module.flatten:
                x = x.reshape(x.shape[0], -1)
            kernel, bias = block_params["linear"]["kernel"], block_params["linear"]["bias"]
            a = (x @ kernel if index == 0 else feedback_matmul(x, kernel, feedback[index - 1])) + bias
            x = ACTIVATIONS[module.activation](a)
        return x

    def value_and_grad(params, state, batch, *, key=None):
        del key
        check_float_params(params)
        if not isinstance(state, FeedbackState) or len(state.feedback) != len(params) - 1:
            raise TypeError("state: expected the FeedbackState returned by this estimator's init")

        def loss_fn(p):
            loss = output_loss(forward(p, state.feedback, batch["x"]), batch["y"])
            check_scalar_loss(loss, has_aux=False)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, grads, state

    return Estimator(init, value_and_grad)
