r"""How a chain of blocks is cut into pipeline stages, and how each stage's pieces are laid out on its device.

**The split.** A chain of ``L`` blocks with parameter counts :math:`p_0, \dots, p_{L-1}` is cut into ``S``
contiguous stages :math:`[c_s, c_{s+1})`, :math:`0 = c_0 < c_1 < \dots < c_S = L`. :func:`balanced_split` picks
the cut that minimises the largest stage, :math:`\max_s \sum_{l \in [c_s, c_{s+1})} p_l` (the stage every tick
waits for, if time follows parameters as it does for dense blocks), and among the cuts with that largest stage the
one with the smallest :math:`\sum_s P_s^2` (the most even), by dynamic programming over cut points.

**The layout.** ``jax.shard_map`` runs one program on every device of the ``"stage"`` axis, and an array that
enters it has the same shape on every device. Stages differ (a ViT's patch embedding, its Transformer blocks and
its head), so each stage's pieces are packed into flat vectors padded to the longest stage's: the parameters of
stage ``s`` are one vector of length :math:`P_{\max} = \max_s P_s` (row ``s`` of an ``[S, P_max]`` array sharded
over ``"stage"``), its fixed feedback matrices likewise, and the activations a stage sends are ``[b, A_max]``
rows (``A_max`` the widest flattened boundary). The padding is zero and stays zero under any elementwise
optimizer (its gradient is zero).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

STAGE_AXIS = "stage"


class StageSplit(NamedTuple):
    """A chain cut into contiguous stages.

    Attributes:
      bounds: ``(start, stop)`` block indices of each stage (``stop`` exclusive).
      params: the number of parameters of each stage.
    """

    bounds: tuple[tuple[int, int], ...]
    params: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    @property
    def num_blocks(self) -> int:
        return self.bounds[-1][1]

    @property
    def imbalance(self) -> float:
        """The largest stage over the mean stage (1.0: perfectly balanced)."""
        return max(self.params) * len(self.params) / max(1, sum(self.params))

    def stage_of(self, block: int) -> int:
        """The stage that holds block ``block``."""
        return next(s for s, (start, stop) in enumerate(self.bounds) if start <= block < stop)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": [list(b) for b in self.bounds], "params": list(self.params), "imbalance": self.imbalance}

    def __str__(self) -> str:
        def blocks(start: int, stop: int) -> str:
            return f"block {start}" if stop - start == 1 else f"blocks {start}-{stop - 1}"

        pairs = enumerate(zip(self.bounds, self.params, strict=True))
        parts = [f"stage {s}: {blocks(*b)} ({p:,} params)" for s, (b, p) in pairs]
        return "; ".join(parts)


def _check_count(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")
    if high is not None and value > high:
        raise ValueError(f"{name}: got {value!r}; allowed: an integer in [{low}, {high}]")
    return int(value)


def balanced_split(sizes: Sequence[int], num_stages: int) -> tuple[tuple[int, int], ...]:
    """The contiguous cut of blocks with sizes ``sizes`` into ``num_stages`` stages with the smallest largest stage
    (ties: the smallest sum of squared stage sizes). See the module docstring.

    Args:
      sizes: the size of each block (parameter count), non-negative integers.
      num_stages: the number of stages, in ``[1, len(sizes)]``.

    Returns:
      ``(start, stop)`` per stage.
    """
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"sizes: expected one or more non-negative block sizes, got {sizes}")
    count = len(sizes)
    num_stages = _check_count("num_stages", num_stages, 1, count)
    prefix = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    cost = lambda i, j: prefix[j] - prefix[i]

    def best(limit: float | None) -> tuple[float, list[int]]:
        """Smallest (max stage if limit is None, else sum of squares with every stage <= limit) and its cuts."""
        inf = float("inf")
        table = [[inf] * (count + 1) for _ in range(num_stages + 1)]
        back = [[0] * (count + 1) for _ in range(num_stages + 1)]
        table[0][0] = 0.0
        for k in range(1, num_stages + 1):
            for j in range(k, count - (num_stages - k) + 1):
                for i in range(k - 1, j):
                    if table[k - 1][i] == inf:
                        continue
                    c = cost(i, j)
                    if limit is None:
                        value = max(table[k - 1][i], c)
                    elif c > limit:
                        continue
                    else:
                        value = table[k - 1][i] + c * c
                    if value < table[k][j]:
                        table[k][j], back[k][j] = value, i
        cuts, j = [count], count
        for k in range(num_stages, 0, -1):
            j = back[k][j]
            cuts.append(j)
        return table[num_stages][count], cuts[::-1]

    largest, _ = best(None)
    _, cuts = best(largest)
    return tuple((cuts[s], cuts[s + 1]) for s in range(num_stages))


def _size(tree: Any) -> int:
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def split_stages(
    params: Sequence[Any], num_stages: int, *, bounds: Sequence[Sequence[int]] | None = None
) -> StageSplit:
    """The stages of a chain with per-block parameters ``params``: balanced by parameter count, or ``bounds``.

    Args:
      params: one pytree per block (:func:`jaxalgo.models.split_chain`'s parameters).
      num_stages: the number of stages, in ``[1, number of blocks]``.
      bounds: an explicit cut, ``(start, stop)`` per stage, contiguous from block 0 to the last block.

    Returns:
      A :class:`StageSplit`.
    """
    if not isinstance(params, list | tuple) or not params:
        raise TypeError(f"params: expected a non-empty list or tuple with one pytree per block, got {type(params)}")
    count = len(params)
    if isinstance(num_stages, int) and not isinstance(num_stages, bool) and num_stages > count:
        raise ValueError(
            f"num_stages: got {num_stages}, but the chain has only {count} blocks; allowed: 1 to {count} "
            "(each stage holds at least one whole block)"
        )
    num_stages = _check_count("num_stages", num_stages, 1, count)
    sizes = [_size(p) for p in params]
    if bounds is None:
        cut = balanced_split(sizes, num_stages)
    else:
        cut = tuple((int(a), int(b)) for a, b in bounds)
        contiguous = all(cut[s][1] == cut[s + 1][0] for s in range(len(cut) - 1))
        if len(cut) != num_stages or cut[0][0] != 0 or cut[-1][1] != count or not contiguous:
            raise ValueError(
                f"bounds: got {list(cut)}; allowed: {num_stages} contiguous (start, stop) pairs from 0 to {count}"
            )
        if any(b <= a for a, b in cut):
            raise ValueError(f"bounds: got {list(cut)}; every stage needs at least one block")
    return StageSplit(cut, tuple(sum(sizes[a:b]) for a, b in cut))


@dataclasses.dataclass(frozen=True, eq=False)
class Packing:
    """Packs one pytree of a fixed structure into a flat vector of ``length`` (zero padding) and back."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    dtype: Any
    length: int

    @classmethod
    def of(cls, tree: Any, length: int | None = None, dtype: Any = None) -> Packing:
        leaves, treedef = jax.tree.flatten(tree)
        shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
        dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
        common = jnp.result_type(*dtypes) if dtype is None and dtypes else (dtype or jnp.float32)
        size = sum(math.prod(s) for s in shapes)
        return cls(treedef, shapes, dtypes, jnp.dtype(common), max(1, size if length is None else length))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def pack(self, tree: Any) -> jax.Array:
        """The leaves written one after the other into a zero vector of ``length`` (``dynamic_update_slice``: XLA:CPU
        runs a many-operand ``concatenate`` of this size as a slow single-threaded loop)."""
        flat, start = jnp.zeros((self.length,), self.dtype), 0
        for leaf in jax.tree.leaves(tree):
            piece = jnp.ravel(leaf).astype(self.dtype)
            flat = jax.lax.dynamic_update_slice(flat, piece, (start,))
            start += piece.shape[0]
        return flat

    def unpack(self, flat: jax.Array) -> Any:
        out, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            count = math.prod(shape)
            out.append(flat[start : start + count].reshape(shape).astype(dtype))
            start += count
        return jax.tree.unflatten(self.treedef, out)

    def with_length(self, length: int) -> Packing:
        return dataclasses.replace(self, length=max(1, length))


def pack_rows(h: jax.Array, width: int) -> jax.Array:
    """``h`` (batch first) flattened to ``[b, n]`` and zero-padded to ``[b, width]``."""
    flat = h.reshape(h.shape[0], -1)
    return jnp.pad(flat, ((0, 0), (0, width - flat.shape[1])))


def unpack_rows(rows: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The first ``prod(shape)`` columns of ``rows`` as ``[b, *shape]``."""
    count = math.prod(shape)
    return rows[:, :count].reshape(rows.shape[0], *shape)


@dataclasses.dataclass(frozen=True, eq=False)
class StageLayout:
    """Where every piece of a chain lives on the stages, and the shapes that travel between them.

    Attributes:
      chain: the chain of blocks (``num_blocks``, ``apply_block``).
      split: the :class:`StageSplit`.
      packings: one :class:`Packing` per stage for its blocks' parameters (a tuple of block pytrees), all padded to
        the longest stage's vector.
      input_shapes: the per-example input shape of each stage (stage 0: the data's).
      output_shapes: the per-example output shape of each stage (the last: the model output ``(C,)``).
      width: ``A_max``, the widest flattened activation sent between two stages (at least 1).
      dtype: the dtype of the activations sent between the stages.
    """

    chain: Any
    split: StageSplit
    packings: tuple[Packing, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    width: int
    dtype: Any

    @classmethod
    def build(cls, chain: Any, params: Sequence[Any], split: StageSplit, input_shape: Sequence[int]) -> StageLayout:
        if split.num_blocks != chain.num_blocks or len(params) != chain.num_blocks:
            raise ValueError(
                f"split: covers {split.num_blocks} blocks, the chain has {chain.num_blocks} and params "
                f"{len(params)}; split the same chain"
            )
        x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jax.tree.leaves(params)[0].dtype)
        outputs = jax.eval_shape(chain.block_outputs, tuple(params), x)
        blocks = [tuple(params[a:b]) for a, b in split.bounds]
        longest = max(Packing.of(b).size for b in blocks)
        packings = tuple(Packing.of(b, longest) for b in blocks)
        output_shapes = tuple(tuple(outputs[b - 1].shape[1:]) for _, b in split.bounds)
        input_shapes = (tuple(input_shape), *output_shapes[:-1])
        width = max([1, *(math.prod(s) for s in output_shapes[:-1])])
        return cls(chain, split, packings, input_shapes, output_shapes, width, outputs[-1].dtype)

    @property
    def num_stages(self) -> int:
        return self.split.num_stages

    @property
    def param_length(self) -> int:
        return self.packings[0].length

    @property
    def num_outputs(self) -> int:
        return math.prod(self.output_shapes[-1])

    def blocks(self, stage: int) -> range:
        return range(*self.split.bounds[stage])

    def pack_params(self, params: Sequence[Any]) -> jax.Array:
        """``[S, P_max]``: row ``s`` holds stage ``s``'s blocks' parameters."""
        params = tuple(params)
        if len(params) != self.chain.num_blocks:
            raise ValueError(f"params: got {len(params)} blocks, the chain has {self.chain.num_blocks}")
        rows = [p.pack(tuple(params[a:b])) for p, (a, b) in zip(self.packings, self.split.bounds, strict=True)]
        return jnp.stack(rows)

    def unpack_params(self, packed: Any) -> tuple[Any, ...]:
        """The per-block parameters (a tuple, as :func:`jaxalgo.models.split_chain` gives them) of ``[S, P_max]``."""
        blocks: list[Any] = []
        for stage, packing in enumerate(self.packings):
            blocks.extend(packing.unpack(jnp.asarray(packed[stage])))
        return tuple(blocks)


__all__ = [
    "STAGE_AXIS",
    "Packing",
    "StageLayout",
    "StageSplit",
    "balanced_split",
    "pack_rows",
    "split_stages",
    "unpack_rows",
]
