"""Optimizer plumbing for factorised layers: frozen bases, kept step counts, sliced (and rotated) moments.

- :func:`trainable_mask` says which leaves of a parameter tree train (``True``) and which are frozen factors
  (``False``): by variable type where the tree carries ``nnx.Variable`` s (:class:`~jaxalgo.lowrank.FrozenFactor`
  is frozen), else by the ``S``/``U``/``V`` dict convention of the chain's parameters (the ``U`` and ``V`` of a
  mapping that also holds ``S``). Trees with neither (equinox modules, dicts with other names) need an explicit
  ``mask``, which every function below accepts.
- :func:`freeze_factors` wraps any optax optimizer so that it sees only the trainable leaves: the frozen leaves are
  removed from the tree it is given (no moments, no weight decay for them) and receive zero updates. On a model
  without frozen leaves it behaves exactly like the optimizer it wraps, with the same state structure.
- :func:`on_trainable_part` builds a weight-perturbation (forward-gradient) estimator whose tangents cover only the
  trainable leaves.
- :func:`trainable_part` / :func:`fill_frozen` / :func:`with_frozen`: the split and its two inverses.
- :func:`keep_count` carries the step counts of an old optimizer state into a freshly initialised one
  (``optax.tree_utils.tree_get_all_with_path`` / ``tree_set``): OIALR zeroes the moments at conversion but keeps
  the step count, so bias corrections and schedules continue.
- :func:`map_param_moments` applies a per-parameter function to every parameter-shaped tree inside an optimizer
  state (``optax.tree_utils.tree_map_params``): this is how moments are sliced when a rank is cut.

Masks have ``optax.masked``'s form and meaning: a pytree of Python bools with the structure of the parameters or a
prefix of it (one bool may stand for a whole subtree, e.g. for an ``nnx.Variable``), ``True`` where the leaf
trains, or a callable ``params -> mask`` (a function; a callable pytree such as an equinox module of bools is a
mask itself). ``nnx.Variable`` s inside a mask are read as their values, so a mask
made from an ``nnx.State`` with Variables (e.g. :func:`trainable_mask` of ``nnx.state(model, nnx.Param)``) also
fits the pure-array ``nnx.State`` that ``nnx.Optimizer.update`` passes to the optimizer. The mask must be known when
tracing (bools, not arrays computed from the parameter values).

The trainable part of a tree: entries of plain dicts and of ``nnx.State`` whose leaves are all frozen are removed
(a factorised layer's ``{"U", "S", "V", "bias"}`` becomes ``{"S", "bias"}``, as the optimizer state has always
been); any other node (tuple, list, equinox module, ...) keeps its place and a frozen subtree in it becomes
``optax.MaskedNode()``, an empty pytree, as in ``optax.masked``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax import tree_utils as otu

from jaxalgo.grads import Estimator
from jaxalgo.lowrank._layers import FROZEN_NAMES, S_NAME, FrozenFactor

Mask = Any  # a pytree of bools (a prefix of the parameters' structure), or a callable params -> such a pytree

_DROP = object()  # a subtree all of whose leaves are frozen


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """The immediate children of a pytree node with their key entries, and the node's one-level treedef."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(path[0] if path else None, child) for path, child in pairs], treedef


def _is_leaf(treedef: Any) -> bool:
    return treedef.num_leaves == 1 and jax.tree_util.treedef_is_leaf(treedef)


def _dict_key(entry: Any) -> Any:
    return entry.key if isinstance(entry, jax.tree_util.DictKey) else None


def _convention_flags(node: Any, out: list[bool]) -> None:
    """Appends, leaf by leaf, ``False`` for the ``U``/``V`` of every mapping that holds ``S``, ``U`` and ``V``."""
    children, treedef = _children(node)
    if _is_leaf(treedef):
        out.append(True)
        return
    factored = isinstance(node, Mapping) and S_NAME in node and FROZEN_NAMES <= set(node)
    for entry, child in children:
        if factored and _dict_key(entry) in FROZEN_NAMES:
            out.extend([False] * len(jax.tree.leaves(child)))
        else:
            _convention_flags(child, out)


def trainable_mask(params: Any) -> Any:
    """Which leaves of ``params`` train (``True``) and which are frozen factors (``False``), as a mask.

    - A tree holding ``nnx.Variable`` s (an ``nnx.State`` from ``nnx.split(model)`` or
      ``nnx.split(model, nnx.Param, ...)``, gradients from ``nnx.grad``): by type, a
      :class:`~jaxalgo.lowrank.FrozenFactor` is frozen, everything else trains. The mask has a bool in place of
      each Variable.
    - Otherwise (plain dicts such as the chain's parameters or linen's ``{"params": ...}``, pure-array
      ``nnx.State``): the ``U`` and ``V`` of every mapping that also holds ``S`` are frozen. The mask has the
      structure of ``params``.
    - A tree with neither (an equinox partition, dicts with other names) gets all ``True``: pass ``mask=`` to
      the functions of this module to freeze anything there.
    """
    if any(_is_variable(x) for x in jax.tree.leaves(params, is_leaf=_is_variable)):
        return jax.tree.map(
            lambda x: not isinstance(x, FrozenFactor) if _is_variable(x) else True, params, is_leaf=_is_variable
        )
    flags: list[bool] = []
    _convention_flags(params, flags)
    return jax.tree.unflatten(jax.tree.structure(params), flags)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray | jax.Array) and value.shape == () and value.dtype == np.bool_:
        try:
            return bool(value)
        except jax.errors.ConcretizationTypeError:
            raise ValueError("mask: leaves must be known when tracing (Python bools), got a traced array") from None
    raise ValueError(f"mask: leaves must be bools (True = trainable), got {type(value).__name__} {value!r}")


def _leaf_flags(tree: Any, mask: Mask) -> list[bool]:
    """One bool per leaf of ``tree`` (``jax.tree.leaves`` order), ``True`` where it trains."""
    if mask is None:
        mask = trainable_mask(tree)
    elif callable(mask) and _is_leaf(jax.tree.structure(mask)):  # a function, not a callable pytree (eqx.Module)
        mask = mask(tree)
    mask = jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, mask, is_leaf=_is_variable)
    pairs: list[tuple[Any, int]] = []
    try:
        jax.tree.map(lambda m, sub: pairs.append((m, len(jax.tree.leaves(sub)))), mask, tree)
    except ValueError as error:
        raise ValueError(
            "mask: needs the structure of the parameters (or a prefix of it), with one bool per leaf or subtree; "
            f"{error}"
        ) from error
    return [flag for m, n in pairs for flag in [_as_bool(m)] * n]


def _prune(tree: Any, flags: list[bool]) -> Any:
    flag = iter(flags)

    def walk(node: Any) -> Any:
        children, treedef = _children(node)
        if treedef.num_leaves == 0:
            return node
        if _is_leaf(treedef):
            return node if next(flag) else _DROP
        values = [(entry, walk(child)) for entry, child in children]
        dropped = [v is _DROP for _, v in values]
        if any(dropped) and all(d or not jax.tree.leaves(v) for d, (_, v) in zip(dropped, values, strict=True)):
            return _DROP
        if type(node) in (dict, collections.OrderedDict) or isinstance(node, nnx.State):
            kept = {_dict_key(entry): v for entry, v in values if v is not _DROP}
            return type(node)({k: kept[k] for k in node if k in kept})
        return treedef.unflatten([optax.MaskedNode() if v is _DROP else v for _, v in values])

    pruned = walk(tree)
    return optax.MaskedNode() if pruned is _DROP else pruned


def trainable_part(tree: Any, mask: Mask = None) -> Any:
    """``tree`` (parameters, gradients or updates) without its frozen leaves.

    Args:
      tree: any pytree.
      mask: ``True`` where a leaf trains (see the module docstring); default :func:`trainable_mask` of ``tree``.

    Returns:
      ``tree`` itself when nothing is frozen; else the tree with the entries of plain dicts and ``nnx.State``
      whose leaves are all frozen removed and other frozen subtrees replaced by ``optax.MaskedNode()``. Its leaves
      are the trainable leaves of ``tree``, in order.
    """
    flags = _leaf_flags(tree, mask)
    return tree if all(flags) else _prune(tree, flags)


def _restore(partial: Any, like: Any, mask: Mask, frozen: Callable[[Any], Any], name: str) -> Any:
    flags = _leaf_flags(like, mask)
    if all(flags):
        return partial
    expected = jax.tree.structure(_prune(like, flags))
    if jax.tree.structure(partial) != expected:  # type: ignore[operator]  # mypy cannot resolve jaxlib's PyTreeDef
        raise ValueError(
            f"{name}: partial does not have the structure of trainable_part(like, mask): "
            f"{jax.tree.structure(partial)} vs {expected}"
        )
    leaves, treedef = jax.tree.flatten(like)
    trained = iter(jax.tree.leaves(partial))
    return jax.tree.unflatten(treedef, [next(trained) if f else frozen(x) for x, f in zip(leaves, flags, strict=True)])


def fill_frozen(partial: Any, like: Any, mask: Mask = None) -> Any:
    """The inverse of :func:`trainable_part` for updates: ``partial`` on the trainable leaves of ``like``, zeros
    on its frozen leaves (``mask`` as for :func:`trainable_part`, applied to ``like``)."""
    return _restore(partial, like, mask, jnp.zeros_like, "fill_frozen")


def with_frozen(partial: Any, like: Any, mask: Mask = None) -> Any:
    """The inverse of :func:`trainable_part` for parameters: ``partial`` on the trainable leaves of ``like``, the
    frozen leaves of ``like`` as they are (``mask`` as for :func:`trainable_part`, applied to ``like``)."""
    return _restore(partial, like, mask, lambda x: x, "with_frozen")


def on_trainable_part(
    build: Callable[[Callable[..., Any]], Estimator], loss_fn: Callable[..., Any], mask: Mask = None
) -> Estimator:
    """A weight-perturbation estimator whose tangents cover only the trainable leaves.

    ``build(loss)`` makes the estimator (e.g. ``lambda f: forward_gradient(f, num_tangents=16)``). It is given
    ``loss(trainable, (batch, params)) = loss_fn(with_frozen(trainable, params, mask), batch)``: the frozen leaves
    enter as data. Without this, every tangent would also have components on ``U`` and ``V``; their directional
    derivatives are zero (``stop_gradient``), but they take ``(m + n) r`` of the tangents' ``(m + n + r) r``
    coordinates of a factorised layer, and FROG's Gram matrix counts them, so its projection would no longer be
    the orthogonal projection onto the tangents' span within the trainable parameters (with ``k`` equal to the
    trainable count it would not return the exact gradient).

    Args:
      build: makes the inner estimator from a loss on the trainable part.
      loss_fn: ``loss_fn(params, batch)`` on the whole parameter tree.
      mask: ``True`` where a leaf trains (see the module docstring); default :func:`trainable_mask` of the
        parameters, which finds the frozen factors of an ``nnx.State`` by type and of plain dicts by the
        ``S``/``U``/``V`` keys. Needed for trees with neither (e.g. an equinox partition).

    Returns:
      An :class:`~jaxalgo.grads.Estimator` on the whole parameter tree whose gradients are exactly zero at the
      frozen leaves (no ``split``: OIALR runs on one device).
    """
    inner = build(lambda trainable, data: loss_fn(with_frozen(trainable, data[1], mask), data[0]))

    def init(params):
        return inner.init(trainable_part(params, mask))

    def value_and_grad(params, state, batch, *, key):
        loss, grads, state = inner.value_and_grad(trainable_part(params, mask), state, (batch, params), key=key)
        return loss, fill_frozen(grads, params, mask), state

    return Estimator(init, value_and_grad)


def freeze_factors(tx: optax.GradientTransformation, mask: Mask = None) -> optax.GradientTransformationExtraArgs:
    """``tx`` applied to the trainable leaves only; the frozen leaves get zero updates.

    The state is ``tx``'s state on :func:`trainable_part` of the parameters, so :func:`map_param_moments` and
    ``optax.tree_utils`` work on it with ``tx`` itself (OIALR slices the moments this way). This is why it is not
    ``optax.masked`` or ``optax.multi_transform``: ``optax.masked(tx, mask)`` passes the masked-out updates through
    unchanged (the frozen leaves would still get the raw gradient), zeroing them needs a second transformation
    (``multi_transform`` with ``optax.set_to_zero()``), and either wraps ``tx``'s state (``MaskedState``,
    ``MultiTransformState``, ``MaskedNode`` placeholders in place of the removed entries). ``mask`` has
    ``optax.masked``'s meaning: ``True`` where ``tx`` applies.

    Args:
      tx: any optax gradient transformation.
      mask: ``True`` where a leaf trains, or a callable ``params -> mask`` (called on the parameters in ``init``,
        on the updates and the parameters in ``update``); see the module docstring. Default
        :func:`trainable_mask`: the :class:`~jaxalgo.lowrank.FrozenFactor` leaves of an ``nnx.State`` and the
        ``U``/``V`` of plain dicts holding ``S``, ``U``, ``V``. A tree in which nothing is recognised (an equinox
        partition without ``mask``) is passed to ``tx`` whole: the wrapper then behaves exactly like ``tx``.

    Returns:
      A gradient transformation (with extra-args support).

    Example (a user's nnx model containing :class:`~jaxalgo.lowrank.LowRankDense` layers)::

      graphdef, params = nnx.split(model, nnx.Param)
      tx = jaxalgo.lowrank.freeze_factors(optax.adamw(1e-3, weight_decay=0.1))
      opt_state = tx.init(params)   # no moments for U and V
      # or: nnx.Optimizer(model, tx, wrt=nnx.Param)

    ``nnx.Optimizer.update`` hands ``tx`` pure arrays (no Variable types), where the default mask falls back to the
    ``S``/``U``/``V`` keys; that agrees with the types for the layers of this package with frozen bases. For a
    model whose ``S``/``U``/``V``-named parameters train (``freeze_bases=False``, a user's own layer), fix the mask
    from the typed state: ``freeze_factors(tx, mask=trainable_mask(nnx.state(model, nnx.Param)))``.
    """
    inner = optax.with_extra_args_support(tx)

    def init(params):
        return inner.init(trainable_part(params, mask))

    def update(updates, state, params=None, **extra_args):
        partial, state = inner.update(
            trainable_part(updates, mask), state, None if params is None else trainable_part(params, mask), **extra_args
        )
        return fill_frozen(partial, updates, mask), state

    return optax.GradientTransformationExtraArgs(init, update)


def keep_count(old_state: Any, new_state: Any) -> Any:
    """``new_state`` with every ``count`` field set to the value at the same path in ``old_state``.

    Counts whose path does not exist in ``old_state`` are left as they are.
    """
    old = {tuple(path): value for path, value in otu.tree_get_all_with_path(old_state, "count")}
    for path, _ in otu.tree_get_all_with_path(new_state, "count"):
        path = tuple(path)
        if path in old:
            new_state = otu.tree_set(new_state, lambda p, _v, path=path: tuple(p) == path, count=old[path])
    return new_state


def map_param_moments(
    tx: optax.GradientTransformation, fn: Callable[[jax.Array, Any], jax.Array], opt_state: Any, per_param: Any
) -> Any:
    """``fn(leaf, per_param_leaf)`` applied to every parameter-shaped leaf of ``opt_state``.

    Args:
      tx: the transformation that produced ``opt_state`` (for :func:`freeze_factors` states: the wrapped ``tx``).
      fn: called with a state leaf and the matching leaf of ``per_param``.
      opt_state: the optimizer state.
      per_param: a tree with the structure of the parameters ``tx`` was initialised with (leaves may be any
        objects, e.g. the slicing function of each parameter).

    Returns:
      The mapped state; non-parameter fields (counts, schedules) are unchanged.
    """
    return otu.tree_map_params(tx, fn, opt_state, per_param, transform_non_params=lambda x: x)
