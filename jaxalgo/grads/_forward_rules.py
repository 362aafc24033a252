"""Forward-mode rules for equations that consume a factored (rank-1) tangent.

A rule pushes ``k`` factored tangents of one input of one primitive forward without materialising them:

    rule(primals, index, tangent, params) -> jax.Array | FactoredTangent | None

``primals`` are the equation's input values, ``index`` the position of the input whose tangent is ``tangent``
(a :class:`FactoredTangent`), ``params`` the equation's parameters. It returns that input's contribution to the
output tangent, stacked ``(k, *out.shape)`` (the JVP is linear in the tangents, so contributions of several
inputs add up), or a :class:`FactoredTangent` for structural primitives (transpose, dtype conversion), or
``None`` when it does not apply, in which case the interpreter materialises the tangent for this equation, or
:data:`NO_CONTRIBUTION` when the input's tangent does not reach the output (``stop_gradient``).

Adding a layer type means writing one rule and registering it in :data:`RULES`; each rule is tested against
``jax.jvp`` with the materialised tangent.

Rules here:

- ``dot_general`` (dense, attention and einsum layers, either operand): with ``T_i = a_i (x) b_i`` the product
  ``x . T_i`` is one einsum of ``x`` with the factors, contracted in the cheap order, e.g.
  ``x dW = (x a) b^T`` for a dense kernel: a matrix-vector product and an outer product instead of a matmul.
- ``conv_general_dilated`` with the kernel factored as (out channels) x (spatial, in channels), no feature or
  batch groups: the ``k`` single-output-channel kernels ``b_i`` are stacked into one conv with ``k`` output
  channels, and output channel ``o`` of tangent ``i`` is that conv's channel ``i`` scaled by ``a_i[o]``.
- ``transpose``, ``convert_element_type``, ``copy`` and ``reshape`` that only inserts or drops axes of length 1:
  the factors follow the array symbolically. Other reshapes of a weight materialise its tangent.
- ``broadcast_in_dim`` (a position embedding ``(tokens, dim)`` added to a batch ``(n, tokens, dim)``): the
  factors follow their axes to the output, axes broadcast from length 1 repeat their factor's entries, and the new
  axes get a factor of ones, so the result is still an outer product.
- ``pvary`` (inside ``shard_map``, a weight the same on every device meeting per-device data): the factors are
  marked as varying too.
- ``stop_gradient`` (the frozen bases ``U``, ``V`` of OIALR's factorised layers): no contribution at all, so
  nothing downstream is computed for that tangent.
- ``add``, ``sub``: the output tangent is dense anyway; the (small) weight tangent is multiplied out.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxalgo.grads._rank1_tangents import FactoredTangent

Rule = Callable[[Sequence[Any], int, FactoredTangent, dict[str, Any]], "jax.Array | FactoredTangent | None"]

_LETTERS = string.ascii_letters.replace("z", "")

NO_CONTRIBUTION = object()
"""Returned by a rule whose input tangent does not reach the output (the output tangent gets nothing from it)."""


def _dot_general_rule(primals, index, tangent, params):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = params["dimension_numbers"]
    lhs, rhs = primals
    letters = iter(_LETTERS)
    lhs_sub = [next(letters) for _ in range(lhs.ndim)]
    rhs_sub = [next(letters) for _ in range(rhs.ndim)]
    for lc, rc in zip(lhs_contract, rhs_contract, strict=True):
        rhs_sub[rc] = lhs_sub[lc]
    for lb, rb in zip(lhs_batch, rhs_batch, strict=True):
        rhs_sub[rb] = lhs_sub[lb]
    lhs_free = [lhs_sub[ax] for ax in range(lhs.ndim) if ax not in lhs_contract and ax not in lhs_batch]
    rhs_free = [rhs_sub[ax] for ax in range(rhs.ndim) if ax not in rhs_contract and ax not in rhs_batch]
    out_sub = "z" + "".join([lhs_sub[ax] for ax in lhs_batch] + lhs_free + rhs_free)
    subs = lhs_sub if index == 0 else rhs_sub
    factor_subs = ["z" + "".join(subs[ax] for ax in group) for group in tangent.groups]
    other, other_sub = (rhs, rhs_sub) if index == 0 else (lhs, lhs_sub)
    spec = f"{''.join(other_sub)},{','.join(factor_subs)}->{out_sub}"
    out_dtype = params.get("preferred_element_type") or jnp.result_type(lhs.dtype, rhs.dtype)
    result = jnp.einsum(
        spec,
        other,
        *tangent.factors,
        optimize="optimal",
        precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"),
    )
    return result.astype(out_dtype)


def _conv_rule(primals, index, tangent, params):
    if index != 1 or params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    dimension_numbers = params["dimension_numbers"]
    out_axis = dimension_numbers.rhs_spec[0]
    if len(tangent.groups) != 2 or (out_axis,) not in tangent.groups:
        return None
    out_group = tangent.groups.index((out_axis,))
    scale = tangent.factors[out_group]  # (k, c_out)
    rest_group = tangent.groups[1 - out_group]
    rest = tangent.factors[1 - out_group]  # (k, *kernel dims of rest_group)
    # Kernel layout with the out-channel axis replaced by the k tangents: one conv with k output channels.
    permutation = [0 if ax == out_axis else 1 + rest_group.index(ax) for ax in range(len(tangent.shape))]
    kernels = jnp.transpose(rest, permutation)
    lhs = primals[0]
    channels = jax.lax.conv_general_dilated_p.bind(lhs, kernels, **params)
    out_channel_axis = dimension_numbers.out_spec[1]
    per_tangent = jnp.expand_dims(jnp.moveaxis(channels, out_channel_axis, 0), out_channel_axis + 1)
    scale_shape = [1] * per_tangent.ndim
    scale_shape[0], scale_shape[out_channel_axis + 1] = scale.shape
    return per_tangent * scale.reshape(scale_shape).astype(per_tangent.dtype)


def _transpose_rule(primals, index, tangent, params):
    return tangent.transpose(params["permutation"])


def _convert_rule(primals, index, tangent, params):
    dtype = params["new_dtype"]
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    return tangent.astype(dtype)


def _reshape_rule(primals, index, tangent, params):
    """Reshapes that only insert or drop axes of length 1 (broadcasting a bias, squeezing): factors follow."""
    if params.get("dimensions") is not None:
        return None
    old, new = tangent.shape, tuple(params["new_sizes"])
    old_axes = [ax for ax, size in enumerate(old) if size != 1]
    new_axes = [ax for ax, size in enumerate(new) if size != 1]
    if [old[ax] for ax in old_axes] != [new[ax] for ax in new_axes]:
        return None
    moved = dict(zip(old_axes, new_axes, strict=True))
    groups, factors = [], []
    for group, factor in zip(tangent.groups, tangent.factors, strict=True):
        kept = [i for i, ax in enumerate(group) if old[ax] != 1]
        factors.append(factor.reshape((factor.shape[0], *[factor.shape[1 + i] for i in kept])))
        groups.append([moved[group[i]] for i in kept])
    unit_axes = [ax for ax, size in enumerate(new) if size == 1]
    groups[0] += unit_axes
    factors[0] = factors[0].reshape(factors[0].shape + (1,) * len(unit_axes))
    return FactoredTangent(tuple(factors), tuple(tuple(g) for g in groups), new)


def _broadcast_rule(primals, index, tangent, params):
    """``broadcast_in_dim``: operand axis ``ax`` becomes output axis ``dims[ax]``; the other output axes are new."""
    shape, dims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
    k = tangent.num_tangents
    groups, factors = [], []
    for group, factor in zip(tangent.groups, tangent.factors, strict=True):
        groups.append(tuple(dims[ax] for ax in group))
        factors.append(jnp.broadcast_to(factor, (k, *[shape[dims[ax]] for ax in group])))
    new_axes = tuple(ax for ax in range(len(shape)) if ax not in dims)
    if new_axes:
        groups.append(new_axes)
        factors.append(jnp.ones((k, *[shape[ax] for ax in new_axes]), tangent.dtype))
    return FactoredTangent(tuple(factors), tuple(groups), shape)


def _add_rule(primals, index, tangent, params):
    """``x + W``: the output tangent is as large as the output whatever the tangent, so the factors are multiplied
    out here (``k`` times the size of ``W``, at most the size of the output tangent)."""
    shape = jnp.broadcast_shapes(*[jnp.shape(p) for p in primals])
    return jnp.broadcast_to(tangent.materialize(), (tangent.num_tangents, *shape))


def _sub_rule(primals, index, tangent, params):
    out = _add_rule(primals, index, tangent, params)
    return -out if index == 1 else out


def _stop_gradient_rule(primals, index, tangent, params):
    return NO_CONTRIBUTION


def _identity_rule(primals, index, tangent, params):
    return tangent


def _pvary_rule(primals, index, tangent, params):
    """Inside ``shard_map``, an array the same on every device used with per-device data is first marked as
    varying; its tangent's factors are marked the same way (they are the same on every device too)."""

    def mark(factor):
        missing = tuple(a for a in params["axes"] if a not in jax.typeof(factor).manual_axis_type.varying)
        return jax.lax.pcast(factor, missing, to="varying") if missing else factor

    return FactoredTangent(tuple(mark(f) for f in tangent.factors), tangent.groups, tangent.shape)


RULES: dict[str, Rule] = {
    "dot_general": _dot_general_rule,
    "conv_general_dilated": _conv_rule,
    "transpose": _transpose_rule,
    "reshape": _reshape_rule,
    "broadcast_in_dim": _broadcast_rule,
    "convert_element_type": _convert_rule,
    "add": _add_rule,
    "add_any": _add_rule,
    "sub": _sub_rule,
    "stop_gradient": _stop_gradient_rule,
    "copy": _identity_rule,
    "copy_p": _identity_rule,
    "pvary": _pvary_rule,
}
"""Rules by primitive name. Register a rule for a new layer type here."""
