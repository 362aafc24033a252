"""Models as chains of blocks, and their pure-function view.

Every model in jaxalgo is a :class:`Chain`: an ordered list of flax nnx blocks, the output of block ``l``
being the input of block ``l + 1``. Algorithms that need structure (activity perturbation, F3 connectors,
per-block updates, low-rank conversion) work on that list and never look inside a block.

A chain becomes pure functions with :func:`split_chain`: the parameters are a tuple holding one plain
dict of arrays per block (``params[l]`` is block ``l``), and :class:`ChainFn` applies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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
