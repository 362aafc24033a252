"""Factorised dense and conv layers and the conversion of a chain's layers to and from them.

Design choice: a converted layer is a different nnx module. :func:`factorize_chain` merges each block, replaces
its eligible ``nnx.Linear`` / ``nnx.LinearGeneral`` sub-modules (attention projections included) by a
:class:`LowRankDense`, and its eligible ``nnx.Conv`` (kernel viewed as ``(prod(window) c_in, c_out)``) by a
:class:`~jaxalgo.lowrank.LowRankConv` (see :mod:`jaxalgo.lowrank._conv`), each holding ``U (m, r)``, ``S (r, r)``,
``V (n, r)`` and the bias, and splits the chain again. The result is an ordinary :class:`~jaxalgo.models.ChainFn`
with ordinary parameters, so every estimator, optimizer and checkpointer works on it unchanged, and the forward pass
is computed in factored form by the module itself:

- ``r (m + n) < m n``: ``y = (x U) (S V^T) + b`` -- ``S V^T`` is formed once per call, each example costs
  ``r (m + n)`` multiply-adds instead of ``m n`` (the reference implementation rebuilds ``W`` every step and saves
  nothing);
- otherwise: ``y = x (U S V^T) + b``, the dense product being cheaper.

``U`` and ``V`` pass through ``jax.lax.stop_gradient`` (OIALR freezes them; backprop then never computes their
gradients), are stored as :class:`FrozenFactor` (an ``nnx.Param`` subclass, so ``nnx.State`` says which leaves are
frozen) and :func:`jaxalgo.lowrank.freeze_factors` keeps them out of the optimizer; ``S`` and the bias train.

A weight of an ``nnx.LinearGeneral`` with input features ``in_shape`` (contracted over the trailing axes, no batch
axes) and output features ``out_shape`` is viewed as the ``(prod(in_shape), prod(out_shape))`` matrix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalgo.lowrank._conv import LowRankConv, conv_view
from jaxalgo.lowrank._svd import Factors, factored_is_cheaper, host_compose, host_factorize
from jaxalgo.lowrank._variables import FrozenFactor
from jaxalgo.models import ChainFn, ChainParams, with_precision_of

U_NAME, S_NAME, V_NAME = "U", "S", "V"
FROZEN_NAMES = frozenset({U_NAME, V_NAME})

DenseKind = Literal["linear", "linear_general"]
"""The dense flax layer a :class:`LowRankDense` replaced (``nnx.Linear`` or ``nnx.LinearGeneral``)."""
DENSE_KINDS: tuple[DenseKind, ...] = typing.get_args(DenseKind)


class LowRankDense(nnx.Module):
    """``y = x W + b`` with ``W = U S V^T`` kept in factored form.

    Args:
      factors: ``U (m, r)``, ``S (r, r)``, ``V (n, r)``.
      bias: the bias (shape ``out_shape``) or ``None``.
      in_shape: the input feature shape, contracted over the trailing ``len(in_shape)`` axes of ``x``
        (``prod(in_shape) == m``).
      out_shape: the output feature shape (``prod(out_shape) == n``).
      kind: ``"linear"`` or ``"linear_general"``, the module it replaced (used by :func:`densify_chain`).
      precision: passed to the matrix products.
      freeze_bases: pass ``U`` and ``V`` through ``stop_gradient`` (OIALR) and store them as :class:`FrozenFactor`
        (kept out of the optimizer); ``False`` lets them train (plain ``nnx.Param``).
    """

    def __init__(
        self,
        factors: Factors,
        bias: jax.Array | None,
        *,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        kind: DenseKind = "linear",
        precision: Any = None,
        freeze_bases: bool = True,
    ):
        if kind not in DENSE_KINDS:
            raise ValueError(f"kind: unknown layer kind {kind!r}; allowed: {', '.join(DENSE_KINDS)}")
        u, s, v = factors
        if u.ndim != 2 or s.ndim != 2 or v.ndim != 2 or s.shape != (u.shape[1], v.shape[1]):
            raise ValueError(f"factors: need U (m, r), S (r, r), V (n, r); got {u.shape}, {s.shape}, {v.shape}")
        if math.prod(in_shape) != u.shape[0] or math.prod(out_shape) != v.shape[0]:
            raise ValueError(
                f"in_shape/out_shape: {tuple(in_shape)} and {tuple(out_shape)} do not match U {u.shape}, V {v.shape}"
            )
        basis = FrozenFactor if freeze_bases else nnx.Param
        self.U = basis(jnp.asarray(u))
        self.S = nnx.Param(jnp.asarray(s))
        self.V = basis(jnp.asarray(v))
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else nnx.data(None)
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_shape = tuple(int(d) for d in out_shape)
        self.kind = kind
        self.precision = precision
        self.freeze_bases = freeze_bases

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        del out_sharding  # accepted for drop-in use inside nnx.MultiHeadAttention
        k = len(self.in_shape)
        if tuple(x.shape[x.ndim - k :]) != self.in_shape:
            raise ValueError(f"x: trailing axes {x.shape[x.ndim - k :]} do not match the layer's input {self.in_shape}")
        batch = x.shape[: x.ndim - k]
        u, s, v = self.U[...], self.S[...], self.V[...]
        if self.freeze_bases:
            u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        m, r = u.shape
        n = v.shape[0]
        h = jnp.reshape(x, (*batch, m))
        dot = lambda a, b: jnp.matmul(a, b, precision=self.precision)
        if factored_is_cheaper(m, n, r):
            y = dot(dot(h, u), dot(s, v.T))
        else:
            y = dot(h, dot(dot(u, s), v.T))
        y = jnp.reshape(y, (*batch, *self.out_shape))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Where a factorised layer lives and its matrix shape.

    Attributes:
      block: index of the block in the chain.
      path: the module path inside the block (``()`` when the block itself is the layer); the layer's
        parameters are ``params[block][path[0]]...[path[-1]]``.
      m: rows of the matrix view (input features).
      n: columns (output features).
      bias_size: number of bias entries (0 without bias).
    """

    block: int
    path: tuple[Any, ...]
    m: int
    n: int
    bias_size: int

    @property
    def name(self) -> str:
        return "/".join([str(self.block), *(str(p) for p in self.path)])

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)


_FACTORABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)
"""The flax layers OIALR factorises (a convolution only when :func:`~jaxalgo.lowrank._conv.conv_view` accepts it)."""


def _layer_view(module: nnx.Module) -> tuple[Literal[DenseKind, "conv"], tuple[int, ...], tuple[int, ...]] | None:
    """``(kind, in_shape, out_shape)`` of a module that can be factorised, or ``None``.

    ``kind`` is ``"linear"``, ``"linear_general"`` or ``"conv"`` (``in_shape = (*window, c_in)``).
    """
    conv = conv_view(module)
    if conv is not None:
        return "conv", *conv
    if isinstance(module, nnx.Linear):
        return "linear", (module.in_features,), (module.out_features,)
    if isinstance(module, nnx.LinearGeneral):
        in_shape, out_shape = tuple(module.in_features), tuple(module.out_features)
        k = len(in_shape)
        axis = tuple(module.axis) if isinstance(module.axis, Sequence) else (module.axis,)
        trailing = axis == tuple(range(-k, 0))  # contracts the trailing input axes, in order
        if module.batch_axis or not trailing:
            return None
        return "linear_general", in_shape, out_shape
    return None


def is_eligible(m: int, n: int, min_aspect: float = 0.1) -> bool:
    """OIALR's eligibility: ``min(m, n) > min_aspect * max(m, n)`` (the paper: ``min > max / 10``)."""
    return min(m, n) > min_aspect * max(m, n)


def _get(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def _merge_block(fn: ChainFn, index: int, block_params: dict) -> nnx.Module:
    if not hasattr(fn, "graphdefs"):  # a ChainFn, or a wrapper of one (with_compute_dtype)
        raise TypeError(
            f"fn: low-rank training factorises the nnx.Linear, nnx.LinearGeneral and nnx.Conv layers of a chain of "
            f"flax nnx modules (a jaxalgo.models.ChainFn: split_chain(Chain(your modules))); got "
            f"{type(fn).__name__}, whose layers jaxalgo cannot see (plain functions or another library's modules). "
            f"Write the blocks as nnx modules, or factorise your own matrices with "
            f"jaxalgo.lowrank.factorize and compose"
        )
    return nnx.merge(fn.graphdefs[index], nnx.State(block_params))


def _split_blocks(modules: Sequence[nnx.Module]) -> tuple[ChainFn, ChainParams]:
    graphdefs, params = [], []
    for module in modules:
        graphdef, state = nnx.split(module)
        graphdefs.append(graphdef)
        params.append(nnx.to_pure_dict(state))
    return ChainFn(tuple(graphdefs)), tuple(params)


def _replace(module: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> nnx.Module:
    if not path:
        return new
    parent = module
    for key in path[:-1]:
        parent = _get(parent, key)
    _set(parent, path[-1], new)
    return module


def find_layers(fn: ChainFn, params: ChainParams, *, min_aspect: float = 0.1) -> tuple[LayerInfo, ...]:
    """The layers :func:`factorize_chain` would convert, input end first (blocks in order, nnx graph order inside).

    Eligible: ``nnx.Linear``, ``nnx.LinearGeneral`` (contracting trailing axes, no batch axes) and ``nnx.Conv``
    (no feature groups, no mask, zero padding; matrix view ``(prod(window) c_in, c_out)``) whose matrix view
    ``(m, n)`` has ``min(m, n) > min_aspect * max(m, n)``.
    """
    found = []
    for index, block_params in enumerate(params):
        module = _merge_block(fn, index, block_params)
        for path, node in nnx.iter_graph(module):
            if not isinstance(node, nnx.Module) or isinstance(node, LowRankDense | LowRankConv):
                continue
            view = _layer_view(node)
            if view is None:
                continue
            _, in_shape, out_shape = view
            m, n = math.prod(in_shape), math.prod(out_shape)
            if isinstance(node, _FACTORABLE) and is_eligible(m, n, min_aspect):
                bias_size = 0 if node.bias is None else int(np.prod(node.bias.shape))
                found.append(LayerInfo(index, tuple(path), m, n, bias_size))
    return tuple(found)


def _padded(factors: Factors, rank: int, size: int) -> Factors:
    """The leading ``rank`` triplets stored in arrays of size ``size >= rank``, zero-padded."""
    u, s, v = factors
    u = jnp.zeros((u.shape[0], size), u.dtype).at[:, :rank].set(u[:, :rank])
    v = jnp.zeros((v.shape[0], size), v.dtype).at[:, :rank].set(v[:, :rank])
    s = jnp.zeros((size, size), s.dtype).at[:rank, :rank].set(s[:rank, :rank])
    return Factors(u, s, v)


def factorize_chain(
    fn: ChainFn,
    params: ChainParams,
    *,
    min_aspect: float = 0.1,
    ranks: dict[str, tuple[int, int]] | None = None,
    select: Callable[[LayerInfo], bool] | None = None,
) -> tuple[ChainFn, ChainParams, tuple[LayerInfo, ...]]:
    """Converts the eligible dense and conv layers of a chain to :class:`LowRankDense` / :class:`LowRankConv`
    (``W = U S V^T`` by SVD of the matrix view).

    Args:
      fn: the chain's function.
      params: its parameters.
      min_aspect: eligibility threshold (see ``is_eligible``).
      ranks: optional ``{layer name: (rank, size)}``: keep the leading ``rank`` singular triplets, stored in arrays
        of ``size >= rank`` (zero-padded, see :func:`jaxalgo.lowrank.rank_buckets`). Layers not named keep full
        rank, which makes the conversion exact.
      select: optional predicate on :class:`LayerInfo` restricting which eligible layers are converted.

    Returns:
      ``(fn, params, layers)``: the new chain function and parameters, and the converted layers (input end first).
    """
    ranks = dict(ranks or {})
    layers = [info for info in find_layers(fn, params, min_aspect=min_aspect) if select is None or select(info)]
    unknown = set(ranks) - {info.name for info in layers}
    if unknown:
        raise ValueError(f"ranks: no eligible layer named {sorted(unknown)}; layers: {[i.name for i in layers]}")
    modules = [_merge_block(fn, i, p) for i, p in enumerate(params)]
    for info in layers:
        module = modules[info.block]
        node = module
        for key in info.path:
            node = _get(node, key)
        view = _layer_view(node)
        if view is None or not isinstance(node, _FACTORABLE):
            raise ValueError(f"ranks: layer {info.name} is not a dense or convolutional layer of the chain")
        kind, in_shape, out_shape = view
        factors = host_factorize(node.kernel[...], len(in_shape))
        rank, size = ranks.get(info.name, (info.full_rank, info.full_rank))
        if not (isinstance(rank, int) and 1 <= rank <= size <= info.full_rank):
            raise ValueError(
                f"ranks: layer {info.name} ({info.m}x{info.n}) needs 1 <= rank <= size <= {info.full_rank}, "
                f"got rank {rank!r}, size {size!r}"
            )
        if (rank, size) != (info.full_rank, info.full_rank):
            factors = _padded(factors, rank, size)
        if kind == "conv":
            assert isinstance(node, nnx.Conv)  # conv_view accepts convolutions only
            modules[info.block] = _replace(module, info.path, LowRankConv.from_conv(node, factors))
            continue
        bias = None if node.bias is None else node.bias[...]
        new = LowRankDense(
            factors, bias, in_shape=in_shape, out_shape=out_shape, kind=kind, precision=getattr(node, "precision", None)
        )
        modules[info.block] = _replace(module, info.path, new)
    new_fn, new_params = _split_blocks(modules)
    return with_precision_of(new_fn, fn), new_params, tuple(layers)  # a mixed-precision chain stays one


def densify_chain(fn: ChainFn, params: ChainParams) -> tuple[ChainFn, ChainParams]:
    """The inverse of :func:`factorize_chain`: every :class:`LowRankDense` / :class:`LowRankConv` becomes a dense
    layer (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``) with ``kernel = U S V^T`` (reshaped to its feature
    shapes) and the same bias."""
    modules = [_merge_block(fn, i, p) for i, p in enumerate(params)]
    for index, module in enumerate(modules):
        targets = [(tuple(p), n) for p, n in nnx.iter_graph(module) if isinstance(n, LowRankDense | LowRankConv)]
        for path, node in targets:
            if isinstance(node, LowRankConv):
                modules[index] = _replace(module, path, node.to_dense())
                module = modules[index]
                continue
            u, s, v = node.U[...], node.S[...], node.V[...]
            kernel = host_compose(Factors(u, s, v), (*node.in_shape, *node.out_shape))
            use_bias = node.bias is not None
            rngs = nnx.Rngs(0)
            kernel_init = lambda _key, shape, _dtype, kernel=kernel: kernel.reshape(shape)
            bias_init = nnx.initializers.zeros_init()
            dense: nnx.Linear | nnx.LinearGeneral
            if node.kind == "linear":
                dense = nnx.Linear(
                    node.in_shape[0], node.out_shape[0], use_bias=use_bias, param_dtype=u.dtype, rngs=rngs,
                    kernel_init=kernel_init, bias_init=bias_init,
                )  # fmt: skip
            else:
                k = len(node.in_shape)
                dense = nnx.LinearGeneral(
                    node.in_shape,
                    node.out_shape,
                    axis=tuple(range(-k, 0)),
                    use_bias=use_bias,
                    param_dtype=u.dtype,
                    rngs=rngs,
                    kernel_init=kernel_init,
                    bias_init=bias_init,
                )
            dense.precision = node.precision
            if node.bias is not None and dense.bias is not None:
                dense.bias[...] = node.bias[...]
            modules[index] = _replace(module, path, dense)
            module = modules[index]
    new_fn, new_params = _split_blocks(modules)
    return with_precision_of(new_fn, fn), new_params


class _Located(Protocol):
    """Where a layer's parameters are in a chain's parameters: ``params[block][path...]`` (a :class:`LayerInfo`,
    or AB-training's ``ABLayer``)."""

    @property
    def block(self) -> int: ...

    @property
    def path(self) -> tuple[Any, ...]: ...


def layer_params(params: ChainParams, info: _Located) -> dict[str, jax.Array]:
    """The parameter dict (``U``, ``S``, ``V``, maybe ``bias``) of a factorised layer."""
    node = params[info.block]
    for key in info.path:
        node = node[key]
    return node


def with_layer_params(params: ChainParams, info: _Located, values: dict[str, jax.Array]) -> ChainParams:
    """A copy of ``params`` with the layer's dict replaced by ``values`` (other arrays shared, not copied)."""

    def rebuild(node: dict, path: tuple[Any, ...]) -> dict:
        if not path:
            return dict(values)
        return {**node, path[0]: rebuild(node[path[0]], path[1:])}

    blocks = list(params)
    blocks[info.block] = rebuild(params[info.block], info.path)
    return tuple(blocks)
