"""Models as chains of blocks, and their pure-function view.

Every model in jaxalgo is a :class:`Chain`: an ordered list of flax nnx blocks, the output of block ``l``
being the input of block ``l + 1``. Algorithms that need structure (activity perturbation, F3 connectors,
per-block updates, low-rank conversion) work on that list and never look inside a block.

A chain becomes pure functions with :func:`split_chain`: the parameters are a tuple holding one plain
dict of arrays per block (``params[l]`` is block ``l``), and :class:`ChainFn` applies them.

A model that is not a :class:`Chain` gets the same pure interface from its plain block functions
``block(params_l, h) -> h`` with :func:`chain_of` (a :class:`BlockFns`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

BlockParams = dict[str, Any]
ChainParams = tuple[BlockParams, ...]


class Chain(nnx.Module):
    """A model as an ordered sequence of blocks: ``y = blocks[-1](... blocks[0](x))``.

    Args:
      blocks: the blocks, each an ``nnx.Module`` mapping one array to one array, without mutable
        state other than ``nnx.Param`` (no BatchNorm statistics, no dropout RNG), so that the chain is a
        deterministic function of its parameters.
    """

    def __init__(self, blocks: Sequence[nnx.Module]):
        if len(blocks) == 0:
            raise ValueError("blocks: got an empty sequence; a Chain needs at least one block")
        self.blocks = nnx.List(list(blocks))

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


@dataclasses.dataclass(frozen=True, eq=False)
class ChainFn:
    """The pure-function view of a :class:`Chain`.

    ``params`` is a tuple with one plain dict of arrays per block, as returned by :func:`split_chain`.
    All methods are pure and can be jitted, vmapped, differentiated and shard_mapped.
    """

    graphdefs: tuple[Any, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.graphdefs)

    def apply_block(self, index: int, block_params: BlockParams, h: jax.Array) -> jax.Array:
        """Block ``index`` applied to its input ``h``."""
        module = nnx.merge(self.graphdefs[index], nnx.State(block_params))
        return module(h)

    def apply(self, params: ChainParams, x: jax.Array) -> jax.Array:
        """The whole chain: ``blocks[-1](... blocks[0](x))``."""
        for index, block_params in enumerate(params):
            x = self.apply_block(index, block_params, x)
        return x

    def __call__(self, params: ChainParams, x: jax.Array) -> jax.Array:
        return self.apply(params, x)

    def block_outputs(self, params: ChainParams, x: jax.Array) -> list[jax.Array]:
        """The output of every block, first to last (the last one is the model output)."""
        outputs = []
        for index, block_params in enumerate(params):
            x = self.apply_block(index, block_params, x)
            outputs.append(x)
        return outputs


def split_chain(chain: Chain) -> tuple[ChainFn, ChainParams]:
    """Splits a chain into its pure function and its parameters (one plain dict per block)."""
    if not isinstance(chain, Chain):
        raise TypeError(f"chain: expected a jaxalgo.models.Chain, got {type(chain).__name__}")
    graphdefs, params = [], []
    for block in chain.blocks:
        graphdef, state = nnx.split(block)
        graphdefs.append(graphdef)
        params.append(nnx.to_pure_dict(state))
    return ChainFn(tuple(graphdefs)), tuple(params)


def merge_chain(fn: ChainFn, params: ChainParams) -> Chain:
    """Rebuilds a :class:`Chain` module from its pure function and parameters."""
    if len(params) != fn.num_blocks:
        raise ValueError(f"params: got {len(params)} blocks, the chain has {fn.num_blocks}")
    blocks = [nnx.merge(g, nnx.State(p)) for g, p in zip(fn.graphdefs, params, strict=True)]
    return Chain(blocks)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockFns:
    """A chain of plain block functions ``block(params_l, h) -> h``: the interface of :class:`ChainFn` without
    flax (``num_blocks``, ``apply_block``, ``apply``, ``block_outputs``). Made by :func:`chain_of`.

    ``params`` is a list or tuple with one pytree per block (``params[l]`` is block ``l``'s, any structure the
    block function reads). All methods are pure.
    """

    blocks: tuple[Callable[[Any, jax.Array], jax.Array], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def apply_block(self, index: int, block_params: Any, h: jax.Array) -> jax.Array:
        """Block ``index`` applied to its input ``h``."""
        return self.blocks[index](block_params, h)

    def apply(self, params: Sequence[Any], x: jax.Array) -> jax.Array:
        """The whole chain: ``blocks[-1](params[-1], ... blocks[0](params[0], x))``."""
        self._check_params(params)
        for index, block_params in enumerate(params):
            x = self.apply_block(index, block_params, x)
        return x

    def __call__(self, params: Sequence[Any], x: jax.Array) -> jax.Array:
        return self.apply(params, x)

    def block_outputs(self, params: Sequence[Any], x: jax.Array) -> list[jax.Array]:
        """The output of every block, first to last (the last one is the model output)."""
        self._check_params(params)
        outputs = []
        for index, block_params in enumerate(params):
            x = self.apply_block(index, block_params, x)
            outputs.append(x)
        return outputs

    def _check_params(self, params: Any) -> None:
        if not isinstance(params, list | tuple) or len(params) != self.num_blocks:
            got = f"{len(params)} entries" if isinstance(params, list | tuple) else f"a {type(params).__name__}"
            raise ValueError(
                f"params: expected a list or tuple with one pytree per block ({self.num_blocks}), got {got}"
            )


def chain_of(blocks: Sequence[Callable[[Any, jax.Array], jax.Array]]) -> BlockFns:
    """A chain from plain block functions, for the block-wise estimators (F3, DFA, DRTP, last-layer-only) on
    models that are not a jaxalgo :class:`Chain`.

    Args:
      blocks: a non-empty list or tuple of pure functions ``block(params_l, h) -> h``; block ``l``'s output is
        block ``l + 1``'s input and the last block outputs the model output ``(B, C)``.

    Returns:
      A :class:`BlockFns`; its parameters are a list or tuple with one pytree per block.

    Example::

      dense = lambda p, h: jnp.tanh(h @ p["w"] + p["b"])
      head = lambda p, h: h @ p["w"] + p["b"]
      fn = jaxalgo.models.chain_of([dense, dense, head])
      est = jaxalgo.grads.dfa(fn, jaxalgo.losses.sigmoid_bce, input_shape=(64,), key=key)
    """
    if isinstance(blocks, nnx.Module) or not isinstance(blocks, list | tuple):
        raise TypeError(
            f"blocks: expected a list or tuple of block functions block(params_l, h) -> h, got "
            f"{type(blocks).__name__}; for flax modules use jaxalgo.models.split_chain(Chain([...]))"
        )
    if len(blocks) == 0:
        raise ValueError("blocks: got an empty sequence; a chain needs at least one block")
    for index, block in enumerate(blocks):
        if isinstance(block, nnx.Module):
            raise TypeError(
                f"blocks[{index}]: a {type(block).__name__} module holds its own parameters; for flax modules use "
                "jaxalgo.models.split_chain(Chain([...])), for chain_of pass functions block(params_l, h) -> h"
            )
        if not callable(block):
            raise TypeError(f"blocks[{index}]: expected a function block(params_l, h) -> h, got {type(block).__name__}")
    return BlockFns(tuple(blocks))
