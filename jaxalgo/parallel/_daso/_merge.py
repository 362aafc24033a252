"""DASO's cross-node communication: the global average of the parameters (:func:`global_mean`: the nodes' changes
since the last global average, sent in ``comm_dtype`` and optionally Horovod-style sharded), the stale merge
:func:`merge_stale`, and what each phase does with them (:func:`synchronise`).

Wire precision. The reference sends the parameters themselves in bf16, so every blocking average replaces float32
weights by bf16-rounded ones: an error of up to ``2^-8 |theta|`` per average (about ``1e-3`` for weights of order
``0.3``), larger than an Adam update at small learning rates, and it does not shrink as training converges. Here
every node sends its *change since the last global average*, ``delta_n = theta_n - theta_avg``, in the wire dtype,
and the average of the changes is added to a float32 copy of the last average (kept in the state):

.. math::
  \\theta_{avg} \\leftarrow \\theta_{avg} + \\frac{1}{P} \\sum_{n=1}^{P} \\operatorname{wire}(\\theta_n -
  \\theta_{avg}),

which equals :math:`\\frac{1}{P} \\sum_n \\theta_n` exactly in real arithmetic, and whose rounding error is relative
to the change (``2^-8 |delta|`` per rounding in bf16), not to the weights. The bytes on the wire are those of
``comm_dtype``, as before. Every node holds the same float32 ``theta_avg`` (the state's ``inflight`` field: after a
send it is also the average in flight), so the nodes agree on the result bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxalgo.parallel._collectives import mean_over, sharded_mean_over
from jaxalgo.parallel._daso._config import Phase
from jaxalgo.parallel._daso._state import DasoState, Layout


def merge_stale(local: Any, average: Any, *, batches_to_wait: Any, num_nodes: int, weight: float) -> Any:
    """``(w S theta_local + P theta_avg) / (w S + P)``; with ``S = 0`` this is the plain average ``theta_avg``."""
    s = jnp.asarray(batches_to_wait, jnp.float32) * weight

    def merge(x, avg):
        return ((s * x.astype(jnp.float32) + num_nodes * avg.astype(jnp.float32)) / (s + num_nodes)).astype(x.dtype)

    return jax.tree.map(merge, local, average)


def global_mean(layout: Layout, params: Any, last_average: Any) -> Any:
    """The average of ``params`` over the nodes, ``last_average + mean_n(wire(params_n - last_average))``, in the
    dtypes of ``last_average`` (float32); the changes are sent in ``comm_dtype`` (sharded over the local devices with
    ``config.sharded``). Inside ``shard_map``; ``last_average`` is replicated."""
    wire = jnp.dtype(layout.config.comm_dtype)
    changes = jax.tree.map(lambda x, avg: x.astype(avg.dtype) - avg, params, last_average)
    if layout.config.sharded:
        mean_change = sharded_mean_over(changes, layout.node_axis, layout.local_axis, dtype=wire)
    else:
        mean_change = mean_over(changes, layout.node_axis, dtype=wire)
    return jax.tree.map(jnp.add, last_average, mean_change)


def synchronise(layout: Layout, phase: Phase, params: Any, daso_state: DasoState) -> tuple[Any, Any]:
    """``(params, average)`` after ``phase``'s global step, ``average`` being the last global average (float32):
    ``"blocking"`` computes a new one and replaces the parameters by it, ``"send"`` computes one and keeps it in
    flight, ``"merge"`` merges the one in flight into the parameters, ``"local"`` leaves both as they are."""
    average = daso_state.inflight
    if phase in ("blocking", "send"):
        average = global_mean(layout, params, average)
    if phase == "blocking":
        params = jax.tree.map(lambda x, avg: avg.astype(x.dtype), params, average)
    elif phase == "merge":
        params = merge_inflight(layout, params, average, daso_state)
    return params, average


def merge_inflight(layout: Layout, params: Any, average: Any, daso_state: DasoState) -> Any:
    """:func:`merge_stale` of the average in flight, with the state's ``S`` and the layout's nodes and weight."""
    return merge_stale(
        params,
        average,
        batches_to_wait=daso_state.schedule.batches_to_wait,
        num_nodes=layout.num_nodes,
        weight=layout.config.merge_weight,
    )
