"""AB-training's re-SVD: the factors of the current ``W`` cut at one agreed rank per layer, and the resize of the
stored factors and their optimizer moments.

``W`` is the same on every device when it is factorised (after the data-parallel steps), so each process computes
the SVD once, on its first device (:func:`svd_program`), proposes the cut of :func:`jaxalgo.lowrank.cutoff_rank`,
and the agreed rank is the maximum of the processes' proposals (``process_allgather``): every device installs the
same rank. (Eight simultaneous LAPACK SVDs on the simulated devices of one CPU cost minutes where one costs a
fraction of a second.) The factors are stored at the rank's bucket (:func:`jaxalgo.lowrank.bucket_size`),
zero beyond the rank, and the optimizer moments of ``A`` and ``B`` are sliced or zero-padded to it, as the
reference does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from optax import tree_utils as otu

from jaxalgo.lowrank._svd import ab_factors, bucket_size, cutoff_rank, factorize
from jaxalgo.parallel._mesh import place
from jaxalgo.parallel.ab._layers import matrix
from jaxalgo.parallel.ab._state import PER_GROUP, REPLICATED, ABTrainState, Layout, resized


def local_factors(layout: Layout, params: Any) -> tuple[dict, dict, dict]:
    """``(A, B, s)`` of every layer at full rank, from one device's (unstacked) parameters: the AB factors
    (:func:`~jaxalgo.lowrank.ab_factors`) of its ``rows x cols`` view and their singular values.

    ``ab_factors`` and ``factorize`` run the same SVD of the same matrix, which XLA computes once (common
    subexpression elimination: one LAPACK ``gesdd`` per layer in the compiled program).
    """
    full_a, full_b, singular = {}, {}, {}
    for layer in layout.layers:
        w = matrix(params, layer)
        full_a[layer.name], full_b[layer.name] = ab_factors(w)
        singular[layer.name] = jnp.diag(factorize(w).S)
    return full_a, full_b, singular


def proposed_rank(layout: Layout, singular_values: np.ndarray) -> int:
    """This process's cut: :func:`~jaxalgo.lowrank.cutoff_rank` (``#{i : s_i >= cutoff * s_0}``, at least 1), or
    the full rank without a cutoff."""
    if layout.config.cutoff is None:
        return int(singular_values.size)
    return cutoff_rank(singular_values, layout.config.cutoff)


def svd_program(layout: Layout, local_svd: Callable[[Any], Any], params: Any) -> tuple[dict, dict, dict]:
    """The SVD of one device's copy of the parameters (group slice 0 of this process's first device).

    Returns:
      ``(A, B, counts)``: the full-rank factors placed per group, and this process's proposed rank per layer
      (host ``int32``).
    """
    local = jax.tree.map(lambda x: x.addressable_data(0)[0], params)
    full_a, full_b, singular = local_svd(local)
    counts = {name: np.int32(proposed_rank(layout, np.asarray(s))) for name, s in singular.items()}
    stacked = lambda tree: place(
        jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (layout.groups, *x.shape)), tree),
        layout.mesh,
        PER_GROUP,
    )
    return stacked(full_a), stacked(full_b), counts


def agreed_ranks(layout: Layout, counts: dict, ranks: dict[str, int] | None = None) -> dict[str, int]:
    """The maximum over processes of their proposed ranks, overridden by ``ranks`` where given (validated)."""
    gathered = multihost_utils.process_allgather(counts)
    agreed = {name: int(np.max(value)) for name, value in gathered.items()}
    names = [layer.name for layer in layout.layers]
    if ranks is not None:
        unknown = set(ranks) - set(names)
        if unknown:
            raise ValueError(f"ranks: no factorised layer named {sorted(unknown)}; layers: {names}")
        agreed = {**agreed, **{k: int(v) for k, v in ranks.items()}}
    for layer in layout.layers:
        if not 1 <= agreed[layer.name] <= layer.full_rank:
            raise ValueError(
                f"ranks: layer {layer.name} needs 1 <= rank <= {layer.full_rank}, got {agreed[layer.name]}"
            )
    return agreed


def install(
    layout: Layout,
    optimizer: optax.GradientTransformation,
    state: ABTrainState,
    full_a: dict,
    full_b: dict,
    ranks: dict,
    sizes: tuple[tuple[str, int], ...],
) -> ABTrainState:
    """Factors cut to ``ranks`` and stored at ``sizes``; their moments sliced or zero-padded to ``sizes`` (jit it
    with ``sizes`` static)."""
    size_of = dict(sizes)
    factors = {}
    for layer in layout.layers:
        name, size = layer.name, size_of[layer.name]
        keep = jnp.arange(size) < ranks[name]
        a = resized(full_a[name], 2, size) * keep[None, None, :]
        b = resized(full_b[name], 1, size) * keep[None, :, None]
        factors[name] = {"A": a.astype(full_a[name].dtype), "B": b.astype(full_b[name].dtype)}
    resizers = {
        "params": jax.tree.map(lambda _: lambda x: x, state.train["params"]),
        "factors": {
            x.name: {
                "A": functools.partial(resized, axis=2, size=size_of[x.name]),
                "B": functools.partial(resized, axis=1, size=size_of[x.name]),
            }
            for x in layout.layers
        },
    }
    opt_state = otu.tree_map_params(optimizer, lambda x, fn: fn(x), state.opt_state, resizers)
    train = {"params": state.train["params"], "factors": factors}
    return state._replace(train=train, opt_state=opt_state, ranks=ranks)


def make_install_program(layout: Layout, optimizer: optax.GradientTransformation) -> Callable[..., ABTrainState]:
    """The jitted :func:`install` of this layout: ``(state, full_a, full_b, ranks, sizes) -> state``."""
    return jax.jit(functools.partial(install, layout, optimizer), static_argnames="sizes")


def factorize_state(
    layout: Layout,
    svd: Callable[[Any], tuple[dict, dict, dict]],
    install_program: Callable[..., ABTrainState],
    state: ABTrainState,
    *,
    ranks: dict[str, int] | None = None,
) -> ABTrainState:
    """Re-SVD of the state's parameters with the agreed cut (or the given ``ranks``); ``svd`` is
    :func:`svd_program` bound to the layout and its jitted :func:`local_factors`."""
    full_a, full_b, counts = svd(state.train["params"])
    agreed = agreed_ranks(layout, counts, ranks)
    sizes = tuple(
        sorted((x.name, bucket_size(agreed[x.name], x.full_rank, layout.config.bucket_ratio)) for x in layout.layers)
    )
    ranks_arrays = place({k: jnp.asarray(v, jnp.int32) for k, v in agreed.items()}, layout.mesh, REPLICATED)
    return install_program(state, full_a, full_b, ranks_arrays, sizes)


def resize_state(
    install_program: Callable[..., ABTrainState], state: ABTrainState, sizes: dict[str, int]
) -> ABTrainState:
    """The state with factors stored at ``sizes`` (a restore target for checkpoints written at those sizes)."""
    factors = state.train["factors"]
    full_a = {name: f["A"] for name, f in factors.items()}
    full_b = {name: f["B"] for name, f in factors.items()}
    return install_program(state, full_a, full_b, state.ranks, tuple(sorted(sizes.items())))
