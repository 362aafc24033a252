r"""The GPipe baseline: backprop as a pipeline, with a forward wave, a backward wave and a flush every step.

The same stages and mesh as :mod:`._feedback`. One call of :meth:`GPipe.run` is one optimizer step on ``M``
microbatches of size ``b``:

1. **forward wave** (``M + S - 1`` ticks): in tick :math:`\tau` stage ``s`` applies its blocks to microbatch
   :math:`m = \tau - s` and sends the output to stage ``s + 1``; it keeps its *input* :math:`h^{(s)}_m` for the
   backward (GPipe's re-materialisation: only the stage-boundary activations of all ``M`` microbatches are kept,
   the activations inside a stage are recomputed); the last stage computes the microbatch's loss :math:`L_m`;
2. **backward wave** (``M + S - 1`` ticks, microbatches in reverse order): in tick :math:`\tau` stage ``s``
   works on :math:`m = M - 1 - (\tau - (S - 1 - s))`: it recomputes its forward from :math:`h^{(s)}_m`, takes
   the ``jax.vjp`` with the cotangent that stage ``s + 1`` sent (the last stage: the gradient of
   :math:`L_m / M`), accumulates its parameter gradient and sends the input cotangent to stage ``s - 1``;
3. each stage applies its optimizer once to :math:`\sum_m \nabla_{\theta_s} L_m / M`, the gradient of the
   step's mean loss, and the pipeline is empty again (the flush).

The result is single-device backprop on the ``M b`` examples of the step (gradient accumulation over the
microbatches). Idle stage-ticks: :math:`S (S - 1)` of the :math:`S (M + S - 1)` of each wave, every step.

References:
  Huang et al., *GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism*, NeurIPS 2019
  (arXiv 1811.06965).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import Problem
from jaxalgo.grads import _f3 as f3_maths
from jaxalgo.parallel._mesh import place, replicate
from jaxalgo.parallel.pipeline._layout import STAGE_AXIS, StageLayout, pack_rows, split_stages, unpack_rows
from jaxalgo.parallel.pipeline._stages import (
    check_batch_rows,
    check_positive_int,
    local,
    num_stages_of,
    stage_specs,
    to_global,
    varying,
)


class GPipeState(NamedTuple):
    """The state of a GPipe pipeline; ``params`` and ``opt_state`` have a leading stage axis over ``"stage"``.

    Attributes:
      step: optimizer steps done (replicated).
      params: ``[S, P_max]`` each stage's blocks' parameters, packed.
      opt_state: each stage's optimizer state of its parameter vector.
    """

    step: jax.Array
    params: jax.Array
    opt_state: Any


class GPipeOutput(NamedTuple):
    """What a GPipe step reports per stage and tick (``[S, T]``, ``T = M + S - 1``, sharded over ``"stage"``).

    Attributes:
      loss: the last stage's row holds each microbatch's loss at the forward tick that finished it (others 0).
      busy: whether the stage worked at that tick of the forward wave.
      backward_busy: the same for the backward wave.
    """

    loss: jax.Array
    busy: jax.Array
    backward_busy: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class GPipe:
    """Backprop as a GPipe pipeline over a ``("stage",)`` mesh; see the module docstring. Built by :func:`gpipe`.

    Attributes:
      layout: the stages (:class:`StageLayout`; ``layout.split`` is the cut).
      mesh: the ``("stage",)`` mesh.
      num_microbatches: ``M``, microbatches per step.
      microbatch_size: ``b``.
    """

    layout: StageLayout
    mesh: Mesh
    num_microbatches: int
    microbatch_size: int
    output_loss: Callable[[jax.Array, jax.Array], jax.Array]
    optimizer: optax.GradientTransformation
    target_shape: tuple[int, ...]
    target_dtype: Any

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    @property
    def split(self):
        return self.layout.split

    @property
    def batch_size(self) -> int:
        return self.num_microbatches * self.microbatch_size

    def ticks(self) -> int:
        """Ticks of each wave: ``M + S - 1``."""
        return self.num_microbatches + self.num_stages - 1

    def init(self, params: Sequence[Any]) -> GPipeState:
        """The placed state at ``params`` (one pytree per block)."""
        packed = self.layout.pack_params(params)
        opt_state = jax.vmap(self.optimizer.init)(packed)
        packed, opt_state = place((packed, opt_state), self.mesh, P(STAGE_AXIS))
        return GPipeState(replicate(jnp.zeros((), jnp.int32), self.mesh), packed, opt_state)

    def block_params(self, state: GPipeState) -> tuple[Any, ...]:
        """The model's per-block parameters (host arrays), as :func:`jaxalgo.models.split_chain` gives them."""
        return jax.tree.map(np.asarray, self.layout.unpack_params(np.asarray(state.params)))

    # -- the stages' work ----------------------------------------------------------------------------------------

    def _apply(self, stage: int, vec: jax.Array, h: jax.Array) -> jax.Array:
        """Stage ``stage``'s blocks applied to ``h``, at the parameters packed in ``vec``."""
        chain = self.layout.chain
        blocks = self.layout.packings[stage].unpack(vec)
        for k, index in enumerate(self.layout.blocks(stage)):
            h = chain.apply_block(index, blocks[k], h)
        return h

    def _stage_input(self, stage: int, x: jax.Array, act: jax.Array) -> jax.Array:
        return x if stage == 0 else unpack_rows(act, self.layout.input_shapes[stage])

    def _forward(self, stage: int):
        last = stage == self.num_stages - 1

        def run(ops):
            vec, x, act, y = ops
            h = self._apply(stage, vec, self._stage_input(stage, x, act))
            if last:
                return act * 0, self.output_loss(h, y).astype(vec.dtype)
            return pack_rows(h, self.layout.width).astype(self.layout.dtype), jnp.zeros((), vec.dtype)

        return run

    def _backward(self, stage: int):
        S, M = self.num_stages, self.num_microbatches
        last = stage == S - 1

        def run(ops):
            vec, x, act, cot, y = ops
            h = self._stage_input(stage, x, act)
            if last:  # the seed: the gradient of L_m / M
                objective = lambda q, h_in: self.output_loss(self._apply(stage, q, h_in), y) / M
                if stage == 0:
                    return jax.grad(objective)(vec, h), cot * 0
                g_vec, g_h = jax.grad(objective, argnums=(0, 1))(vec, h)
            elif stage == 0:
                _, pullback = jax.vjp(lambda q: self._apply(stage, q, h), vec)
                (g_vec,) = pullback(unpack_rows(cot, self.layout.output_shapes[stage]))
                return g_vec, cot * 0
            else:
                _, pullback = jax.vjp(lambda q, h_in: self._apply(stage, q, h_in), vec, h)
                g_vec, g_h = pullback(unpack_rows(cot, self.layout.output_shapes[stage]))
            return g_vec, pack_rows(g_h, self.layout.width).astype(self.layout.dtype)

        return run

    @staticmethod
    def _idle_forward(ops):
        vec, _, act, _ = ops
        return act * 0, jnp.zeros((), vec.dtype)

    @staticmethod
    def _idle_backward(ops):
        vec, _, _, cot, _ = ops
        return jnp.zeros_like(vec), cot * 0

    # -- the program ---------------------------------------------------------------------------------------------

    def program(self):
        """The jitted step ``(state, batch) -> (state, GPipeOutput)``; the state is donated."""
        return self._program

    @functools.cached_property
    def _program(self):
        S, M, b = self.num_stages, self.num_microbatches, self.microbatch_size
        ticks = self.ticks()
        forward_branches = [varying(self._forward(s)) for s in range(S)] + [varying(self._idle_forward)]
        backward_branches = [varying(self._backward(s)) for s in range(S)] + [varying(self._idle_backward)]
        down = [(s, s + 1) for s in range(S - 1)]
        up = [(s + 1, s) for s in range(S - 1)]
        width, act_dtype = self.layout.width, self.layout.dtype

        def body(params, opt_state, x, y):
            stage = jax.lax.axis_index(STAGE_AXIS)
            vec, opt_state = local((params, opt_state))
            zeros_act = jnp.zeros((b, width), act_dtype)
            stash = jnp.zeros((M, b, width), act_dtype)

            def forward_tick(carry, t):
                reg, stash = carry
                m = t - stage
                active = (m >= 0) & (m < M)
                j = jnp.clip(m, 0, M - 1)
                x_m, y_m = (jax.lax.dynamic_slice_in_dim(a, j * b, b) for a in (x, y))
                kept = jax.lax.dynamic_index_in_dim(stash, j, keepdims=False)
                stash = jax.lax.dynamic_update_index_in_dim(stash, jnp.where(active, reg, kept), j, 0)
                which = jnp.where(active, stage, S)
                out, loss = jax.lax.switch(which, forward_branches, (vec, x_m, reg, y_m))
                if S > 1:
                    reg = jax.lax.ppermute(out, STAGE_AXIS, down)
                return (reg, stash), (loss, active)

            carry = varying(lambda ops: ops)((zeros_act, stash))
            (_, stash), (losses, busy) = jax.lax.scan(forward_tick, carry, jnp.arange(ticks))

            def backward_tick(carry, t):
                cot, acc = carry
                m = M - 1 - (t - (S - 1 - stage))
                active = (m >= 0) & (m < M)
                j = jnp.clip(m, 0, M - 1)
                x_m, y_m = (jax.lax.dynamic_slice_in_dim(a, j * b, b) for a in (x, y))
                h_m = jax.lax.dynamic_index_in_dim(stash, j, keepdims=False)
                which = jnp.where(active, stage, S)
                g_vec, cot_out = jax.lax.switch(which, backward_branches, (vec, x_m, h_m, cot, y_m))
                acc = acc + g_vec
                if S > 1:
                    cot = jax.lax.ppermute(cot_out, STAGE_AXIS, up)
                return (cot, acc), active

            carry = varying(lambda ops: ops)((zeros_act, jnp.zeros_like(vec)))
            (_, grads), backward_busy = jax.lax.scan(backward_tick, carry, jnp.arange(ticks))
            updates, opt_state = self.optimizer.update(grads, opt_state, vec)
            vec = optax.apply_updates(vec, updates)
            output = GPipeOutput(losses[None], busy[None], backward_busy[None])
            return to_global((vec, opt_state)), output

        def run(state: GPipeState, batch: dict[str, Any]):
            x = batch["x"]  # microbatch j is rows j b : (j + 1) b, sliced at its tick (no copy of the batch)
            y = batch["y"].astype(self.target_dtype)
            staged = (state.params, state.opt_state)
            specs = stage_specs(staged)
            out_specs = (specs, P(STAGE_AXIS))  # every leaf of the GPipeOutput: one row per stage
            sharded = jax.shard_map(body, mesh=self.mesh, in_specs=(*specs, P(), P()), out_specs=out_specs)
            (params, opt_state), output = sharded(*staged, x, y)
            return GPipeState(state.step + 1, params, opt_state), output

        return jax.jit(run, donate_argnums=0)

    def check_batch(self, batch: Any) -> None:
        """Raises ValueError unless ``batch`` is a dict with ``x`` and ``y`` of ``M * b`` examples."""
        check_batch_rows(batch, self.num_microbatches, self.microbatch_size, keys="'x' and 'y'")

    def place_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch replicated on the stages (stage 0 reads ``x``, the last stage ``y``)."""
        return replicate({k: jnp.asarray(v) for k, v in batch.items() if k in ("x", "y")}, self.mesh)

    def run(self, state: GPipeState, batch: dict[str, Any]) -> tuple[GPipeState, GPipeOutput]:
        """One optimizer step on the ``M`` microbatches of ``batch`` (rows ``j b : (j + 1) b`` are microbatch
        ``j``): forward wave, backward wave, update, flush."""
        self.check_batch(batch)
        return self._program(state, self.place_batch(batch))


def gpipe(
    problem: Problem,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    params: Sequence[Any],
    num_microbatches: int,
    microbatch_size: int,
    bounds: Sequence[Sequence[int]] | None = None,
) -> GPipe:
    """Backprop as a GPipe pipeline over the stages of ``mesh``; see the module docstring.

    Args:
      problem: the task: ``chain``, ``output_loss``, ``input_shape`` and ``train_targets`` (the targets' shape).
      optimizer: an optax optimizer that acts elementwise (sgd, momentum, adam, adamw, L2 decay), applied by each
        stage to its own parameter vector once per step.
      mesh: a ``("stage",)`` mesh (:func:`stage_mesh`).
      params: the model's per-block parameters.
      num_microbatches: ``M``, microbatches per step.
      microbatch_size: ``b``.
      bounds: an explicit cut (default: balanced by parameter count).

    Returns:
      A :class:`GPipe`: ``state = pipe.init(params)``, ``state, output = pipe.run(state, batch)``.
    """
    problem.require("chain", "output_loss", "input_shape", "train_targets", by="the GPipe pipeline")
    assert problem.output_loss is not None and problem.input_shape is not None  # checked by require
    num_stages = num_stages_of(mesh)
    num_microbatches = check_positive_int("num_microbatches", num_microbatches)
    microbatch_size = check_positive_int("microbatch_size", microbatch_size)
    chain = f3_maths.as_chain(problem.chain, by="the GPipe pipeline")
    params = tuple(params)
    f3_maths._check_params(chain, params)
    split = split_stages(params, num_stages, bounds=bounds)
    layout = StageLayout.build(chain, params, split, problem.input_shape)
    targets = jnp.asarray(np.asarray(problem.train_targets)[:1])
    return GPipe(
        layout=layout,
        mesh=mesh,
        num_microbatches=num_microbatches,
        microbatch_size=microbatch_size,
        output_loss=problem.output_loss,
        optimizer=optimizer,
        target_shape=tuple(targets.shape[1:]),
        target_dtype=targets.dtype,
    )


__all__ = ["GPipe", "GPipeOutput", "GPipeState", "gpipe"]
