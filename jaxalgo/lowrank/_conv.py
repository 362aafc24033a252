"""Factorised convolutions: a conv kernel ``(*window, c_in, c_out)`` as the matrix ``W = U S V^T``.

A kernel of an ``nnx.Conv`` with window ``(k_1, ..., k_d)``, ``c_in`` input and ``c_out`` output channels is viewed
as the ``(m, n)`` matrix with ``m = k_1 ... k_d c_in`` rows (one per input value under the window) and
``n = c_out`` columns: the conv is then ``y[p] = patch(x, p) W + b`` at every output position ``p``, where
``patch(x, p)`` is the flattened ``m``-vector of inputs under the window. With ``W = U S V^T``:

- ``r (m + n) < m n``: ``y = conv(x, U) (S V^T) + b``, where ``conv(x, U)`` is the same convolution (strides,
  padding, dilations) with the kernel ``U`` reshaped to ``(*window, c_in, r)``, i.e. ``r`` output channels, and
  ``(S V^T)`` an ``r x n`` matrix applied to the channel axis (a 1x1 conv): ``r (m + n)`` multiply-adds per output
  position instead of ``m n``;
- otherwise: ``y = conv(x, reshape(U S V^T)) + b``.

Both are exactly ``patch(x, p) U S V^T + b``, the dense layer's output when ``U S V^T`` is its kernel.

Eligible convolutions: ``feature_group_count == 1``, no mask, zero padding (``"SAME"``, ``"VALID"`` or explicit
pairs; circular, reflect and causal padding are left dense).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from jaxalgo.lowrank._svd import Factors, factored_is_cheaper, host_compose
from jaxalgo.lowrank._variables import FrozenFactor

Padding = str | tuple[tuple[int, int], ...]


def _as_tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * ndim
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def conv_padding(module: nnx.Conv) -> Padding | None:
    """The zero padding of ``module`` as ``"SAME"``, ``"VALID"`` or a tuple of pairs; ``None`` for other modes."""
    padding = canonicalize_padding(module.padding, len(module.kernel_size))
    if isinstance(padding, str):
        return padding if padding in ("SAME", "VALID") else None
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_view(module: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(in_shape, out_shape) = ((*window, c_in), (c_out,))`` for a convolution that can be factorised, else None."""
    if not isinstance(module, nnx.Conv) or isinstance(module, nnx.ConvTranspose):
        return None
    if module.feature_group_count != 1 or module.mask is not None or conv_padding(module) is None:
        return None
    return (*tuple(module.kernel_size), int(module.in_features)), (int(module.out_features),)


def _dimension_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
    """Channels-last input and output, kernel ``(*window, in, out)`` (nnx.Conv's layout)."""
    spatial = tuple(range(1, ndim - 1))
    lhs = (0, ndim - 1, *spatial)
    rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


class LowRankConv(nnx.Module):
    """A convolution whose kernel, viewed as the ``(prod(window) c_in, c_out)`` matrix, is ``U S V^T``.

    Args:
      factors: ``U (m, r)``, ``S (r, r)``, ``V (n, r)`` with ``m = prod(kernel_size) * in_features``,
        ``n = out_features``.
      bias: the bias ``(out_features,)`` or ``None``.
      kernel_size: the window, one size per spatial axis.
      in_features: input channels.
      strides, padding, input_dilation, kernel_dilation: as for ``nnx.Conv`` (``padding``: ``"SAME"``, ``"VALID"``
        or one ``(low, high)`` pair per spatial axis).
      precision: passed to the convolutions and products.
      freeze_bases: pass ``U`` and ``V`` through ``stop_gradient`` (OIALR) and store them as
        :class:`~jaxalgo.lowrank.FrozenFactor` (kept out of the optimizer); ``False`` lets them train (plain
        ``nnx.Param``).
    """

    def __init__(
        self,
        factors: Factors,
        bias: jax.Array | None,
        *,
        kernel_size: Sequence[int],
        in_features: int,
        strides: Sequence[int] | int = 1,
        padding: Padding = "SAME",
        input_dilation: Sequence[int] | int = 1,
        kernel_dilation: Sequence[int] | int = 1,
        precision: Any = None,
        freeze_bases: bool = True,
    ):
        u, s, v = factors
        if u.ndim != 2 or s.ndim != 2 or v.ndim != 2 or s.shape != (u.shape[1], v.shape[1]):
            raise ValueError(f"factors: need U (m, r), S (r, r), V (n, r); got {u.shape}, {s.shape}, {v.shape}")
        self.kernel_size = tuple(int(k) for k in kernel_size)
        nd = len(self.kernel_size)
        if math.prod(self.kernel_size) * in_features != u.shape[0]:
            raise ValueError(
                f"kernel_size/in_features: window {self.kernel_size} x {in_features} channels does not match "
                f"U {u.shape} (rows must be prod(kernel_size) * in_features)"
            )

        basis = FrozenFactor if freeze_bases else nnx.Param
        self.U = basis(jnp.asarray(u))
        self.S = nnx.Param(jnp.asarray(s))
        self.V = basis(jnp.asarray(v))
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else nnx.data(None)
        self.in_features = int(in_features)
        self.out_features = int(v.shape[0])
        self.strides = _as_tuple(strides, nd)
        self.padding: Padding = (
            padding if isinstance(padding, str) else tuple((int(low), int(high)) for low, high in padding)
        )
        self.input_dilation = _as_tuple(input_dilation, nd)
        self.kernel_dilation = _as_tuple(kernel_dilation, nd)
        self.precision = precision
        self.freeze_bases = freeze_bases

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (*self.kernel_size, self.in_features)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            self.strides,
            self.padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=_dimension_numbers(x.ndim),
            precision=self.precision,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        nd = len(self.kernel_size)
        if x.ndim < nd + 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: shape {x.shape}; expected (*batch, {nd} spatial axes, {self.in_features} channels)")
        batch = x.shape[: x.ndim - nd - 1]
        h = jnp.reshape(x, (-1, *x.shape[x.ndim - nd - 1 :]))
        u, s, v = self.U[...], self.S[...], self.V[...]
        if self.freeze_bases:
            u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        m, r = u.shape
        n = v.shape[0]
        dot = lambda a, b: jnp.matmul(a, b, precision=self.precision)
        if factored_is_cheaper(m, n, r):
            y = dot(self._conv(h, jnp.reshape(u, (*self.in_shape, r))), dot(s, v.T))
        else:
            y = self._conv(h, jnp.reshape(dot(dot(u, s), v.T), (*self.in_shape, n)))
        if self.bias is not None:
            y = y + self.bias[...]
        return jnp.reshape(y, (*batch, *y.shape[1:]))

    def to_dense(self) -> nnx.Conv:
        """The equivalent ``nnx.Conv`` with ``kernel = reshape(U S V^T)`` and the same bias (outside jit)."""
        kernel = host_compose(Factors(self.U[...], self.S[...], self.V[...]), (*self.in_shape, self.out_features))
        conv = nnx.Conv(
            self.in_features,
            self.out_features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation,
            use_bias=self.bias is not None,
            param_dtype=kernel.dtype,
            precision=self.precision,
            kernel_init=lambda *_: kernel,
            bias_init=nnx.initializers.zeros_init(),
            rngs=nnx.Rngs(0),
        )
        if self.bias is not None and conv.bias is not None:
            conv.bias[...] = self.bias[...]
        return conv

    @classmethod
    def from_conv(cls, conv: nnx.Conv, factors: Factors) -> LowRankConv:
        """A factorised copy of ``conv`` (same strides, padding, dilations, bias) with the given factors."""
        padding = conv_padding(conv)
        if padding is None:
            raise ValueError(f"conv: padding {conv.padding!r} is not zero padding (SAME, VALID or (low, high) pairs)")
        return cls(
            factors,
            None if conv.bias is None else conv.bias[...],
            kernel_size=conv.kernel_size,
            in_features=conv.in_features,
            strides=1 if conv.strides is None else conv.strides,  # nnx.Conv reads None as 1
            padding=padding,
            input_dilation=1 if conv.input_dilation is None else conv.input_dilation,
            kernel_dilation=1 if conv.kernel_dilation is None else conv.kernel_dilation,
            precision=conv.precision,
        )
