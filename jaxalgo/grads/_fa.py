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

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalgo.grads._estimator import Estimator, Problem, check_float_params, check_scalar_loss
from jaxalgo.grads._f3 import FeedbackState
from jaxalgo.grads._feedback import FeedbackInit, check_feedback_init, feedback_matrices
from jaxalgo.models import ACTIVATIONS, DenseBlock, precision_policy
from jaxalgo.models._chain import BlockFns, Chain
from jaxalgo.options import check_fields, option


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


def _chain_error(chain: Any) -> TypeError:
    """Why ``chain`` is not a chain FA can use, and what to pass instead."""
    how = "fn, params = jaxalgo.models.split_chain(jaxalgo.models.mlp(...)) (or of a Chain of DenseBlocks)"
    if isinstance(chain, list | tuple) and any(isinstance(b, nnx.Module) for b in chain):
        return TypeError(
            "chain: fa takes the pure function of a Chain of the blocks: "
            "fn, params = jaxalgo.models.split_chain(jaxalgo.models.Chain(blocks))"
        )
    if isinstance(chain, BlockFns) or (isinstance(chain, list | tuple) and all(map(callable, chain))):
        return TypeError(
            "chain: feedback alignment replaces each dense layer's transposed weight, so it needs the layers of a "
            f"chain of jaxalgo.models.DenseBlock: {how}; block functions hide their layers, train them with dfa, "
            "drtp or f3 (block-wise feedback) instead"
        )
    if isinstance(chain, Chain):
        return TypeError(f"chain: fa takes the pure function of the Chain: {how}")
    what = f"a flax module ({type(chain).__name__})" if isinstance(chain, nnx.Module) else f"a {type(chain).__name__}"
    return TypeError(f"chain: feedback alignment needs the pure function of a chain of DenseBlocks, got {what}: {how}")


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
    feedback_init: FeedbackInit = "kaiming_uniform",
    key: jax.Array,
) -> Estimator:
    """Feedback alignment on an MLP chain: backprop with each ``W_l^T`` replaced by a fixed random ``B_l``.

    Args:
      chain: the pure function of an MLP (:func:`jaxalgo.models.mlp`), every block a ``DenseBlock``
        (``jaxalgo.models.split_chain(model)[0]``). Plain block functions (:func:`jaxalgo.models.chain_of`)
        hide the layers FA works on: use :func:`dfa`, :func:`drtp` or :func:`f3` for them.
      output_loss: ``output_loss(z, y) -> scalar`` (mean over the batch).
      feedback_init: one of :data:`jaxalgo.grads.FEEDBACK_INITS`; ``B_l`` has shape ``(out_l, in_l)`` and the
        Kaiming bound ``1/sqrt(in_l)``.
      key: the PRNG key of the feedback matrices.

    Returns:
      An :class:`Estimator` with state :class:`FeedbackState` (matrices for blocks ``1 .. L-1``).
    """
    if not hasattr(chain, "graphdefs"):
        raise _chain_error(chain)
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

    policy = precision_policy(chain)  # a mixed-precision chain: its casts, as MixedPrecisionChain.apply_block does

    def forward(params, feedback, x):
        modules = _dense_blocks(chain, params)
        # feedback products in the compute dtype too: they stand where backprop's W^T products are
        params, feedback, x = policy.cast_to_compute((params, feedback, x))
        for index, (module, block_params) in enumerate(zip(modules, params, strict=True)):
            if module.flatten:
                x = x.reshape(x.shape[0], -1)
            kernel, bias = block_params["linear"]["kernel"], block_params["linear"]["bias"]
            a = (x @ kernel if index == 0 else feedback_matmul(x, kernel, feedback[index - 1])) + bias
            x = ACTIVATIONS[module.activation](a)
        return policy.cast_to_output(x)

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


@dataclasses.dataclass(frozen=True)
class FAOptions:
    """Feedback alignment: backprop through an MLP with each transposed weight replaced by a fixed random matrix.

    Attributes:
      init: initialisation of the fixed feedback matrices, one of FEEDBACK_INITS.
    """

    init: FeedbackInit = option("kaiming_uniform", flag="feedback_init")

    data_parallel: ClassVar[bool] = False
    reads_dense_kernels: ClassVar[bool] = True  # works on DenseBlock kernels only (not on low-rank factors)

    def __post_init__(self):
        check_fields(self)

    def build(self, problem: Problem) -> Estimator:
        """FA on ``problem.chain`` (DenseBlocks) and ``problem.output_loss``, its feedback from ``problem.key``."""
        problem.require("chain", "output_loss", "key", by="fa")
        assert problem.output_loss is not None and problem.key is not None  # checked by require
        return fa(problem.chain, problem.output_loss, feedback_init=self.init, key=problem.key)
