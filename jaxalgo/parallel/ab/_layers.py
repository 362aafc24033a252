"""AB-training's factorised layers, seen from the parameter tree.

The layers are those :func:`jaxalgo.lowrank.find_layers` finds (OIALR's eligibility); their kernels are read and
replaced with lowrank's :func:`~jaxalgo.lowrank.layer_params` / :func:`~jaxalgo.lowrank.with_layer_params` and
viewed as matrices with :func:`~jaxalgo.lowrank.as_matrix`. An :class:`ABLayer` has the ``block`` and ``path`` of a
:class:`~jaxalgo.lowrank.LayerInfo`, which is all those helpers read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax

from jaxalgo.lowrank._layers import find_layers, layer_params, with_layer_params
from jaxalgo.lowrank._svd import as_matrix


@dataclasses.dataclass(frozen=True)
class ABLayer:
    """A factorised weight: ``params[block][path...]["kernel"]`` viewed as an ``m x n`` matrix ``W`` (inputs x
    outputs), factorised as ``A B`` of its view ``rows x cols``: ``W`` itself, or ``W^T`` when ``transposed``."""

    name: str
    block: int
    path: tuple[Any, ...]
    m: int
    n: int
    in_ndim: int
    transposed: bool = False

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)

    @property
    def rows(self) -> int:
        return self.n if self.transposed else self.m

    @property
    def cols(self) -> int:
        return self.m if self.transposed else self.n


def find_ab_layers(chain: Any, params: Any, *, min_aspect: float = 0.1, tall: bool = False) -> tuple[ABLayer, ...]:
    """The dense layers of a chain that AB-training factorises (see :func:`jaxalgo.lowrank.find_layers`).

    With ``tall``, a wide weight (``m < n``) is factorised through ``W^T``, so that ``A`` is the tall factor
    (``max(m, n) x r``) and ``B`` the short one (``r x min(m, n)``), as in the reference; ``sync_mode="only-b"``
    uses it, so the one trained factor is the cheaper to send.
    """
    out = []
    for info in find_layers(chain, params, min_aspect=min_aspect):
        shape = layer_params(params, info)["kernel"].shape
        in_ndim = next(k for k in range(1, len(shape)) if math.prod(shape[:k]) == info.m)
        out.append(ABLayer(info.name, info.block, info.path, info.m, info.n, in_ndim, tall and info.m < info.n))
    return tuple(out)


def kernel(params: Any, layer: ABLayer) -> jax.Array:
    """The layer's kernel in ``params`` (or in a gradient tree of the same structure)."""
    return layer_params(params, layer)["kernel"]


def matrix(params: Any, layer: ABLayer) -> jax.Array:
    """The layer's ``rows x cols`` view of its kernel in ``params``: ``W`` or ``W^T``.

    The transpose is AB's own (lowrank always factorises ``W`` as stored): with ``"only-b"`` every group trains and
    sends ``B``, so a wide ``W`` is factorised through ``W^T`` to make ``B`` the ``r x min(m, n)`` factor.
    """
    w = as_matrix(kernel(params, layer), layer.in_ndim)
    return w.T if layer.transposed else w


def with_kernels(params: Any, layers: Sequence[ABLayer], kernels: dict[str, jax.Array]) -> Any:
    """A copy of ``params`` with the kernels of ``layers`` replaced by ``kernels`` (each layer's ``rows x cols``
    view, see :class:`ABLayer`), in the kernels' shapes and dtypes."""
    for layer in layers:
        view, values = kernels[layer.name], layer_params(params, layer)
        old = values["kernel"]
        new = (view.T if layer.transposed else view).reshape(old.shape).astype(old.dtype)
        params = with_layer_params(params, layer, {**values, "kernel": new})
    return params


def kernel_mask(params: Any, layers: Sequence[ABLayer], value: Any, other: Any) -> Any:
    """A tree like ``params`` holding ``value`` at the factorised kernels and ``other`` elsewhere."""
    wanted = {(layer.block, *layer.path, "kernel") for layer in layers}

    def pick(path, _):
        keys = tuple(getattr(k, "idx", getattr(k, "key", None)) for k in path)
        return value if keys in wanted else other

    return jax.tree_util.tree_map_with_path(pick, params)
