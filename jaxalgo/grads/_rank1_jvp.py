"""A forward-mode interpreter over a jaxpr that carries ``k`` tangents per value, some of them in factored form.

``jax.jvp`` only accepts tangents shaped like the primals, so a rank-1 tangent ``a b^T`` of a weight would have to
be materialised, and ``x (a b^T)`` would cost a full matmul again. This module instead traces the function to a
jaxpr and pushes ``(primal, tangents)`` through it equation by equation:

- an equation none of whose inputs carries a tangent is evaluated as is;
- tangents that are dense stacked arrays ``(k, *shape)`` are pushed with ``jax.vmap`` (over the ``k`` tangents,
  primal unbatched, so the primal is computed once) of ``jax.jvp`` of the primitive: every primitive JAX can
  differentiate in forward mode is supported, custom JVP rules included;
- a :class:`~jaxalgo.grads._rank1_tangents.FactoredTangent` input goes through the rule registered for the
  primitive in :data:`jaxalgo.grads._forward_rules.RULES`; since the JVP is linear in the tangents, its
  contribution is added to that of the dense tangents;
- a factored tangent that reaches ``jit`` / ``closed_call`` / ``remat`` is followed into the sub-jaxpr;
- anywhere else (an equation without a rule, a ``reshape`` of a weight, a weight entering ``scan``, ``cond`` or a
  ``custom_jvp`` function) the tangent is materialised for that equation only, which is exact but costs
  ``k`` times the weight's size; :func:`jvp_stacked` reports each such equation in ``fallbacks``.

``custom_vjp`` functions, which ``jax.jvp`` rejects, are differentiated through their primal implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxalgo.grads._forward_rules import NO_CONTRIBUTION, RULES
from jaxalgo.grads._rank1_tangents import FactoredTangent

Tangent = FactoredTangent | jax.Array | None

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_REMATS = {"checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr"}
_INLINE_ALWAYS = {"custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _bind(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _sub_jaxpr(eqn: jcore.JaxprEqn, table: dict[str, str]) -> tuple[jcore.Jaxpr, list[Any]] | None:
    name = table.get(eqn.primitive.name)
    if name is None or name not in eqn.params:
        return None
    sub = eqn.params[name]
    if isinstance(sub, jcore.ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    if isinstance(sub, jcore.Jaxpr):
        return sub, []
    return None


def _jvp_dense(eqn: jcore.JaxprEqn, primals: list[Any], positions: list[int], tangents: list[jax.Array]):
    """Primal outputs and the stacked output tangents from the dense tangents at ``positions``."""
    float_outs = [_is_float(v.aval) for v in eqn.outvars]

    def f(*varying):
        ins = list(primals)
        for p, v in zip(positions, varying, strict=True):
            ins[p] = v
        outs = _bind(eqn, ins)
        return [o for o, is_f in zip(outs, float_outs, strict=True) if is_f], [
            o for o, is_f in zip(outs, float_outs, strict=True) if not is_f
        ]

    def one(*t):
        (float_p, other_p), (float_t, _) = jax.jvp(f, [primals[p] for p in positions], list(t))
        return float_p, other_p, float_t

    float_p, other_p, float_t = jax.vmap(one, out_axes=(None, None, 0))(*tangents)
    outs, out_t = [], []
    fi, oi = iter(zip(float_p, float_t, strict=True)), iter(other_p)
    for is_f in float_outs:
        if is_f:
            p, t = next(fi)
            outs.append(p)
            out_t.append(t)
        else:
            outs.append(next(oi))
            out_t.append(None)
    return outs, out_t


def _add(a: Tangent, b: Tangent) -> Tangent:
    if a is None:
        return b
    if b is None:
        return a
    a = a.materialize() if isinstance(a, FactoredTangent) else a
    b = b.materialize() if isinstance(b, FactoredTangent) else b
    return a + b


def _push(eqn: jcore.JaxprEqn, primals: list[Any], tangents: list[Tangent], fallbacks: list[str] | None):
    """One equation: primal outputs and their stacked tangents."""
    dense = [i for i, t in enumerate(tangents) if isinstance(t, jax.Array)]
    factored = [(i, t) for i, t in enumerate(tangents) if isinstance(t, FactoredTangent)]
    out_t: list[Tangent]
    if dense:
        outs, out_t = _jvp_dense(eqn, primals, dense, [t for t in tangents if isinstance(t, jax.Array)])
    else:
        outs, out_t = _bind(eqn, primals), [None] * len(eqn.outvars)
    rule = RULES.get(eqn.primitive.name)
    for i, tangent in factored:
        contribution = None
        if rule is not None and not eqn.primitive.multiple_results:
            contribution = rule(primals, i, tangent, dict(eqn.params))
            if contribution is NO_CONTRIBUTION:
                continue
            if isinstance(contribution, FactoredTangent) and len(dense) + len(factored) > 1:
                contribution = contribution.materialize()
        if contribution is None:
            if fallbacks is not None:
                fallbacks.append(f"{eqn.primitive.name}: input {i} of shape {tuple(tangent.shape)}")
            _, contributions = _jvp_dense(eqn, primals, [i], [tangent.materialize()])
        else:
            contributions = [contribution]
        out_t = [_add(t, c) for t, c in zip(out_t, contributions, strict=True)]
    return outs, out_t


def _eval(
    jaxpr: jcore.Jaxpr,
    consts: Sequence[Any],
    primals: Sequence[Any],
    tangents: Sequence[Tangent],
    fallbacks: list[str] | None,
) -> tuple[list[Any], list[Tangent]]:
    env: dict[Any, tuple[Any, Tangent]] = {}

    def read(v):
        if isinstance(v, jcore.Literal):
            return v.val, None
        return env[v]

    def write(v, value, tangent):
        if not isinstance(v, jcore.DropVar):
            env[v] = (value, tangent)

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        write(v, c, None)
    for v, p, t in zip(jaxpr.invars, primals, tangents, strict=True):
        write(v, p, t)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        in_p = [p for p, _ in ins]
        in_t = [t for _, t in ins]
        has_factored = any(isinstance(t, FactoredTangent) for t in in_t)
        out_t: list[Tangent]
        if all(t is None for t in in_t):
            outs, out_t = _bind(eqn, in_p), [None] * len(eqn.outvars)
        elif (sub := _sub_jaxpr(eqn, _INLINE_ALWAYS)) is not None or (
            has_factored and (sub := _sub_jaxpr(eqn, {**_CALLS, **_REMATS})) is not None
        ):
            sub_jaxpr, sub_consts = sub
            outs, out_t = _eval(sub_jaxpr, sub_consts, in_p, in_t, fallbacks)
        else:
            outs, out_t = _push(eqn, in_p, in_t, fallbacks)
        for v, o, t in zip(eqn.outvars, outs, out_t, strict=True):
            write(v, o, t)
    results = [read(v) for v in jaxpr.outvars]
    return [p for p, _ in results], [t for _, t in results]


def jvp_stacked(
    fun: Any,
    args: Sequence[Any],
    tangents: Sequence[Tangent],
    *,
    fallbacks: list[str] | None = None,
) -> tuple[Any, list[Tangent]]:
    """Forward mode of ``fun(*args)`` with ``k`` stacked tangents per input leaf, some of them factored.

    Args:
      fun: a function of the pytrees ``args``.
      args: the primal arguments.
      tangents: one entry per leaf of ``args`` (in ``jax.tree.leaves`` order): ``None`` (no tangent), a dense
        array ``(k, *leaf.shape)`` or a :class:`FactoredTangent`.
      fallbacks: if a list, receives one line per equation where a factored tangent had to be materialised.

    Returns:
      ``(out, out_tangents)``: ``fun(*args)`` and, per output leaf, its stacked tangents (``None`` when it does
      not depend on a tangent; a :class:`FactoredTangent` when it is a factored input passed through).
    """
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    leaves = jax.tree.leaves(args)
    if len(leaves) != len(tangents):
        raise ValueError(f"tangents: got {len(tangents)} entries for {len(leaves)} input leaves")
    outs, out_t = _eval(closed.jaxpr, closed.consts, leaves, list(tangents), fallbacks)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), out_t
