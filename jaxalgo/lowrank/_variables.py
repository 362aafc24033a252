"""The variable type of frozen low-rank factors (its own module: both dense and conv layers use it)."""

from __future__ import annotations

from flax import nnx


class FrozenFactor(nnx.Param):
    """An ``nnx.Param`` that :func:`~jaxalgo.lowrank.freeze_factors` and the other optimizer plumbing keep fixed.

    The ``U`` and ``V`` of :class:`LowRankDense` / :class:`~jaxalgo.lowrank.LowRankConv` with ``freeze_bases=True``
    (with ``freeze_bases=False`` they are plain ``nnx.Param`` s and train). Being a ``Param`` subclass, it is
    selected by ``nnx.split(model, nnx.Param, ...)``, ``nnx.Optimizer(..., wrt=nnx.Param)`` and ``nnx.grad``, and
    its values are checkpointed like any parameter; the leaves of ``nnx.State`` carry the type, which is how
    :func:`~jaxalgo.lowrank.trainable_mask` recognises the frozen factors of a user's own model. ``nnx.to_pure_dict``
    drops it (the chain's parameters stay plain dicts, recognised by their ``S``/``U``/``V`` keys) and
    ``nnx.merge`` restores it from the graph definition. A user's own module may use it for any parameter that
    should stay fixed (pass it through ``jax.lax.stop_gradient`` in the forward pass to skip its gradient).
    """
