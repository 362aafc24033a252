r"""Mixed precision for chains of blocks: activations and matmuls in a low-precision compute dtype (bfloat16),
parameters, gradients and optimizer state in float32.

:func:`with_compute_dtype` wraps any chain (a :class:`~jaxalgo.models.ChainFn`, :func:`~jaxalgo.models.chain_of`
block functions, or a user's object with ``num_blocks`` and ``apply_block``) in a :class:`MixedPrecisionChain`
whose block ``l`` computes

.. math:: h_l = c\bigl(f_l(c(\theta_l),\ c(h_{l-1}))\bigr) \quad (l < L), \qquad
          z = o\bigl(f_L(c(\theta_L),\ c(h_{L-1}))\bigr),

with :math:`c` the rounding of every floating-point leaf to the compute dtype and :math:`o` the rounding of the
model output to the output dtype (float32), so the loss, its gradient with respect to the output, and everything an
estimator computes from them (directional derivatives, Gram matrices, error signals) see float32. Integer and
boolean leaves (token ids, masks, step counters) are never cast. The parameters themselves stay as they are: the
cast is part of the function, so ``jax.grad``, ``jax.jvp`` and ``jax.linearize`` with respect to the float32
parameters differentiate through it. Since :math:`\partial c(\theta) / \partial \theta` is the identity (the
cast's transpose rounds the cotangent back to the parameter's dtype),

.. math:: \frac{\partial L}{\partial \theta_l} = \mathrm{float32}\Bigl(\frac{\partial L}{\partial c(\theta_l)}\Bigr),

gradients and tangents of the parameters come back in float32 while the matrix products inside the blocks (forward,
and backward or forward-mode) run in the compute dtype. Optimizer state built from the parameters is float32, and
the update is applied to the float32 master weights, so small updates are not lost to bfloat16 rounding.

Every estimator reaches the model through a chain's ``apply`` / ``apply_block`` / ``block_outputs``, so wrapping
the chain a :class:`jaxalgo.grads.Problem` is built from puts every estimator in mixed precision; the few that read
the layers directly (feedback alignment) ask :func:`precision_policy` for the casts. Evaluation through the same
chain uses the same compute dtype as training.

Example::

  fn, params = jaxalgo.models.split_chain(jaxalgo.models.mlp((64,), 10, key=key))
  fn16 = jaxalgo.models.with_compute_dtype(fn, "bfloat16")
  logits = fn16.apply(params, x)  # float32 logits; matmuls in bfloat16, params still float32

References:
  Micikevicius et al., *Mixed Precision Training*, ICLR 2018 (arXiv 1710.03740): float32 master weights,
  low-precision activations and products.
  Kalamkar et al., *A Study of BFLOAT16 for Deep Learning Training*, arXiv 1905.12322, 2019.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalgo.models._chain import Chain, chain_of

_DTYPE_EXAMPLES = "'bfloat16', 'float16', 'float32' or 'float64'"


def _floating_dtype(name: str, value: Any) -> jnp.dtype:
    """``value`` as a floating-point ``jnp.dtype``, or a ValueError naming the argument."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: got {value!r}; allowed: a floating-point dtype such as {_DTYPE_EXAMPLES}")
    return dtype


def cast_floating(tree: Any, dtype: Any) -> Any:
    """``tree`` with every floating-point array leaf cast to ``dtype``; other leaves (integer, boolean, PRNG keys,
    Python scalars) unchanged. ``dtype=None`` returns ``tree`` itself."""
    if dtype is None:
        return tree

    def cast(leaf):
        leaf_dtype = getattr(leaf, "dtype", None)
        if leaf_dtype is None or not hasattr(leaf, "astype") or not jnp.issubdtype(leaf_dtype, jnp.floating):
            return leaf
        return leaf if leaf_dtype == dtype else leaf.astype(dtype)

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """Which dtypes a chain computes in: ``compute_dtype`` for parameters and activations inside the blocks,
    ``output_dtype`` for the model output (what the loss sees). ``None`` leaves the values as they are.

    Attributes:
      compute_dtype: floating dtype of the blocks' parameters, inputs and outputs, or None.
      output_dtype: floating dtype of the last block's output, or None.
    """

    compute_dtype: jnp.dtype | None = None
    output_dtype: jnp.dtype | None = None

    def __post_init__(self):
        for name in ("compute_dtype", "output_dtype"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _floating_dtype(name, value))

    @property
    def is_identity(self) -> bool:
        return self.compute_dtype is None and self.output_dtype is None

    def cast_to_compute(self, tree: Any) -> Any:
        """``tree``'s floating leaves in ``compute_dtype``."""
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """``tree``'s floating leaves in ``output_dtype``."""
        return cast_floating(tree, self.output_dtype)


FULL_PRECISION = PrecisionPolicy()
"""The policy of a chain that is not wrapped: no casts."""


@dataclasses.dataclass(frozen=True, eq=False)
class MixedPrecisionChain:
    """A chain whose blocks compute in ``policy.compute_dtype`` and whose output is in ``policy.output_dtype``.

    It has the interface of the chain it wraps (``num_blocks``, ``apply_block``, ``apply``, ``block_outputs``, and
    ``graphdefs`` when the wrapped chain has them), takes the same parameters and returns gradients of them in their
    own dtypes. Made by :func:`with_compute_dtype`; the maths is in :mod:`jaxalgo.models._precision`.

    Attributes:
      chain: the wrapped chain (never itself a :class:`MixedPrecisionChain`).
      policy: the dtypes.
    """

    chain: Any
    policy: PrecisionPolicy

    @property
    def num_blocks(self) -> int:
        return self.chain.num_blocks

    @property
    def graphdefs(self) -> tuple[Any, ...]:
        """The wrapped chain's flax graph definitions (a :class:`~jaxalgo.models.ChainFn`'s)."""
        if not hasattr(self.chain, "graphdefs"):
            raise AttributeError(f"graphdefs: the wrapped {type(self.chain).__name__} has no flax graph definitions")
        return self.chain.graphdefs

    def apply_block(self, index: int, block_params: Any, h: jax.Array) -> jax.Array:
        """Block ``index`` on ``h``, in the compute dtype; the last block's output in the output dtype."""
        policy = self.policy
        out = self.chain.apply_block(index, policy.cast_to_compute(block_params), policy.cast_to_compute(h))
        if index in (self.num_blocks - 1, -1):
            return policy.cast_to_output(out)
        return policy.cast_to_compute(out)

    def apply(self, params: Sequence[Any], x: jax.Array) -> jax.Array:
        """The whole chain: ``o(blocks[-1](... blocks[0](x)))``."""
        for index, block_params in enumerate(self._checked(params)):
            x = self.apply_block(index, block_params, x)
        return x

    def __call__(self, params: Sequence[Any], x: jax.Array) -> jax.Array:
        return self.apply(params, x)

    def block_outputs(self, params: Sequence[Any], x: jax.Array) -> list[jax.Array]:
        """The output of every block, first to last: the hidden ones in the compute dtype, the last in the output
        dtype."""
        outputs = []
        for index, block_params in enumerate(self._checked(params)):
            x = self.apply_block(index, block_params, x)
            outputs.append(x)
        return outputs

    def _checked(self, params: Any) -> Sequence[Any]:
        if not isinstance(params, list | tuple) or len(params) != self.num_blocks:
            got = f"{len(params)} entries" if isinstance(params, list | tuple) else f"a {type(params).__name__}"
            raise ValueError(
                f"params: expected a list or tuple with one pytree per block ({self.num_blocks}), got {got}"
            )
        return params


def _as_chain(chain: Any) -> Any:
    if isinstance(chain, Chain):
        raise TypeError(
            "chain: with_compute_dtype takes the pure function of a Chain: "
            "fn, params = jaxalgo.models.split_chain(model); fn = jaxalgo.models.with_compute_dtype(fn, 'bfloat16')"
        )
    if isinstance(chain, list | tuple):
        return chain_of(chain)
    if isinstance(chain, nnx.Module) or not (hasattr(chain, "num_blocks") and hasattr(chain, "apply_block")):
        raise TypeError(
            f"chain: expected a chain of blocks (num_blocks, apply_block), got a {type(chain).__name__}; make one "
            "with jaxalgo.models.split_chain(Chain([...]))[0] or jaxalgo.models.chain_of([block functions])"
        )
    return chain


def with_compute_dtype(chain: Any, compute_dtype: Any, *, output_dtype: Any = "float32") -> MixedPrecisionChain:
    """``chain`` computing in ``compute_dtype`` (parameters and activations) with its output in ``output_dtype``.

    Args:
      chain: a :class:`~jaxalgo.models.ChainFn` (from :func:`~jaxalgo.models.split_chain`), a
        :class:`~jaxalgo.models.BlockFns` (from :func:`~jaxalgo.models.chain_of`), a list of block functions
        ``block(params_l, h) -> h``, any object with ``num_blocks`` and ``apply_block``, or a
        :class:`MixedPrecisionChain` (its dtypes are replaced).
      compute_dtype: a floating dtype, e.g. ``"bfloat16"``: the blocks' parameters, inputs and outputs are cast to
        it (floating leaves only).
      output_dtype: a floating dtype for the model output (default float32, the dtype the loss is computed in).

    Returns:
      A :class:`MixedPrecisionChain` taking the same parameters as ``chain``.

    Raises:
      ValueError: a dtype that is not floating-point. TypeError: ``chain`` is not a chain of blocks.
    """
    compute_dtype = _floating_dtype("compute_dtype", compute_dtype)
    policy = PrecisionPolicy(compute_dtype, _floating_dtype("output_dtype", output_dtype))
    inner = chain.chain if isinstance(chain, MixedPrecisionChain) else _as_chain(chain)
    return MixedPrecisionChain(inner, policy)


def precision_policy(chain: Any) -> PrecisionPolicy:
    """The :class:`PrecisionPolicy` of ``chain``: its own for a :class:`MixedPrecisionChain`, else
    :data:`FULL_PRECISION` (no casts)."""
    return chain.policy if isinstance(chain, MixedPrecisionChain) else FULL_PRECISION


def with_precision_of(chain: Any, like: Any) -> Any:
    """``chain`` with the precision of ``like``: wrapped in ``like``'s policy if ``like`` is a
    :class:`MixedPrecisionChain`, else ``chain`` unchanged. For code that rebuilds a chain from another one's blocks
    (low-rank factorisation), so the new chain computes as the old one did."""
    policy = precision_policy(like)
    if policy.is_identity:
        return chain
    inner = chain.chain if isinstance(chain, MixedPrecisionChain) else chain
    return MixedPrecisionChain(inner, policy)
