"""Models as chains of blocks (flax nnx), and their pure-function view."""

from jaxalgo.models._chain import Chain, ChainFn, ChainParams, merge_chain, split_chain

__all__ = ["Chain", "ChainFn", "ChainParams", "merge_chain", "split_chain"]
