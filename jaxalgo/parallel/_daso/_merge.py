"""DASO's cross-node communication: the global average of the parameters (sent in ``comm_dtype``, optionally
Horovod-style sharded), the stale merge :func:`merge_stale`, and what each phase does with them
(:func:`synchronise`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxalgo.parallel._collectives import mean_over, sharded_mean_over
from jaxalgo.parallel._daso._state import DasoState, Layout


def merge_stale(local: Any, average: Any, *, batches_to_wait: Any, num_nodes: int, weight: float) -> Any:
    """``(w S theta_local + P theta_avg) / (w S + P)``; with ``S = 0`` this is the plain average ``theta_avg``."""
    s = jnp.asarray(batches_to_wait, jnp.float32) * weight

    def merge(x, avg):
        return ((s * x.astype(jnp.float32) + num_nodes * avg.astype(jnp.float32)) / (s + num_nodes)).astype(x.dtype)

    return jax.tree.map(merge, local, average)


def global_mean(layout: Layout, params: Any) -> Any:
    """The average of ``params`` over the nodes, sent in ``comm_dtype`` (sharded over the local devices with
    ``config.sharded``); inside ``shard_map``."""
    wire = jnp.dtype(layout.config.comm_dtype)
    if layout.config.sharded:
        return sharded_mean_over(params, layout.node_axis, layout.local_axis, dtype=wire)
    return mean_over(params, layout.node_axis, dtype=wire)


def synchronise(layout: Layout, phase: str, params: Any, daso_state: DasoState) -> tuple[Any, Any]:
    """``(params, inflight)`` after ``phase``'s global step: ``"blocking"`` replaces the parameters by the global
    average, ``"send"`` puts it in flight, ``"merge"`` merges the in-flight one into the parameters, ``"local"``
    leaves both as they are."""
    inflight = daso_state.inflight
    if phase == "blocking":
        params = global_mean(layout, params)
    elif phase == "send":
        inflight = global_mean(layout, params)
    elif phase == "merge":
        params = merge_stale(
            params,
            inflight,
            batches_to_wait=daso_state.schedule.batches_to_wait,
            num_nodes=layout.num_nodes,
            weight=layout.config.merge_weight,
        )
    return params, inflight
