r"""F3, DRTP and last-layer-only as a pipeline: every stage updates its own blocks as soon as its forward is done.

The chain's blocks are cut into ``S`` contiguous stages (:mod:`._layout`), stage ``s`` on device ``s`` of the mesh
axis ``"stage"``. Time runs in clock ticks; in tick :math:`\tau` stage ``s`` works on microbatch
:math:`m = \tau - s` (of size ``b``):

1. stage 0 takes microbatch :math:`m = \tau` from the data and reads its error signal :math:`e_m` (``b x C``):
   F3's stored rows :math:`r_i` of the delayed-error buffer (which lives on stage 0), DRTP's one-hot target
   :math:`t`, or zero (last layer only) -- all known before the microbatch's forward pass;
2. every stage applies its blocks to its input and updates each hidden block ``l`` from its own input, output and
   the feedback signal, :math:`\Delta\theta_l = (\partial h_l / \partial \theta_l)^\top s\, e_m B_l` (one
   ``jax.vjp`` right after the block's forward, exactly :func:`jaxalgo.grads.f3`'s ``per_block`` mode; the
   matrices :math:`B_l` of the stage's blocks live on the stage), and applies its own optimizer step;
3. the last stage computes the loss, the true gradient of the head (its input held fixed) and the row each sample
   stores, :math:`t_i - y_i` for ``delayed_error``;
4. one ``ppermute`` moves every stage's output activations, :math:`e_m` and the targets to the next stage (one
   collective: the pieces travel as one byte vector); a second one (F3 only) brings the last stage's new error rows
   back to stage 0, which writes them into the buffer.

No stage waits for a backward wave, so there is no flush between steps: one call of :meth:`FeedbackPipeline.run`
runs ``M`` ticks and feeds ``M`` microbatches, and the microbatches still in flight stay in the state for the next
call. The pipeline fills once and drains once per epoch: ``run(..., drain=True)`` adds the ``S - 1`` ticks that
empty it. Over an epoch of ``K`` calls that is :math:`S (KM + S - 1)` stage-ticks of which :math:`S (S - 1)` are
idle.

**Exactness.** Microbatch ``m`` meets every stage at the parameters that stage reached after microbatches
``0..m-1`` (stage ``s`` updated on them in ticks before :math:`m + s`), so with an elementwise optimizer (sgd,
momentum, adam, adamw: each stage updates its parameter vector on its own) the pipeline computes exactly the
single-device ``per_block`` run with batch size ``b`` and the same batch order -- except possibly for the error
rows. Microbatch :math:`m'`'s rows reach the buffer at the end of tick :math:`m' + S - 1` and microbatch
:math:`m` reads its rows at the start of tick :math:`m`, so a sample visited at :math:`m'` and again at :math:`m`
reads its new row iff :math:`m - m' \ge S`. A sample is visited once per epoch, so this can fail only across an
epoch boundary, for a sample among the last :math:`S - 1` microbatches of one epoch that comes back among the
first microbatches of the next (it would read the row of its visit before, or its target). Draining at the end of
every epoch lands every write before the next epoch starts: the pipelined run is then exact.
``drain=False`` across an epoch boundary keeps the pipeline full instead; :func:`stale_reads` counts the rows it
reads early, and it equals the single-device run whose buffer writes land :math:`S - 1` microbatches late.

References:
  Flügel, Coquelin, Weiel, Debus, Streit, Götz, *Feed-Forward Optimization With Delayed Feedback for Neural
  Networks*, ICONIP 2024 (arXiv 2304.13372).
  Frenkel, Lefebvre, Bol, *Learning Without Feedback*, Frontiers in Neuroscience 2021.
  Huang et al., *GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism*, NeurIPS 2019
  (arXiv 1811.06965): the clock-tick schedule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxalgo.grads import FeedbackOptions, Problem
from jaxalgo.grads import _f3 as f3_maths
from jaxalgo.grads._f3 import F3Variant
from jaxalgo.parallel._mesh import place, replicate
from jaxalgo.parallel.pipeline._layout import STAGE_AXIS, Packing, StageLayout, pack_rows, split_stages, unpack_rows
from jaxalgo.parallel.pipeline._stages import (
    check_batch_rows,
    check_positive_int,
    local,
    num_stages_of,
    send,
    stage_specs,
    to_global,
    varying,
)

SIGNAL_BEFORE_FORWARD: tuple[F3Variant, ...] = (
    *f3_maths.DELAYED_VARIANTS,
    f3_maths.FEEDBACK_PRESETS["drtp"]["variant"],
    f3_maths.FEEDBACK_PRESETS["llo"]["variant"],
)
"""The feedback variants whose error signal is known when a microbatch enters the pipeline (F3's stored rows, DRTP's
target, last-layer-only's zero): the ones a stage can update from without waiting for later stages."""


class InFlight(NamedTuple):
    """What each stage received from the stage before at the last tick: the microbatch it works on next.

    Attributes:
      act: ``[b, A_max]`` the previous stage's output activations, flattened and zero-padded.
      signal: ``[b, C]`` the microbatch's error signal ``e`` (read by stage 0 when it entered).
      y: ``[b, ...]`` its targets (the last stage's loss needs them).
      idx: ``[b]`` its samples' indices (where the last stage's error rows are written back).
      valid: whether a microbatch arrived (False while the pipeline fills or drains).
    """

    act: jax.Array
    signal: jax.Array
    y: jax.Array
    idx: jax.Array
    valid: jax.Array


class FeedbackPipelineState(NamedTuple):
    """The state of a feedback pipeline; every leaf but ``step`` has a leading stage axis sharded over ``"stage"``.

    Attributes:
      step: calls of :meth:`FeedbackPipeline.run` done (replicated).
      params: ``[S, P_max]`` each stage's blocks' parameters, packed (:meth:`FeedbackPipeline.block_params`).
      opt_state: each stage's optimizer state of its parameter vector.
      feedback: ``[S, F_max]`` each stage's fixed feedback matrices, packed (never trained).
      errors: ``[S, N, C]``: F3's delayed-error buffer is row 0 (stage 0, which reads it); the rows of the other
        stages are unused zeros (an array has one shape on every device). None without a buffer (DRTP, LLO).
      inflight: what each stage holds for its next tick (:class:`InFlight`).
    """

    step: jax.Array
    params: jax.Array
    opt_state: Any
    feedback: jax.Array
    errors: jax.Array | None
    inflight: InFlight


class PipelineOutput(NamedTuple):
    """What a pipeline call reports per stage and tick (``[S, T]``, sharded over ``"stage"``).

    Attributes:
      loss: the loss of the microbatch the stage finished at that tick: only the last stage finishes microbatches
        (its row), the other rows are 0.
      busy: whether the stage worked on a microbatch at that tick (the schedule that ran).
    """

    loss: jax.Array
    busy: jax.Array


def finished_losses(output: PipelineOutput) -> np.ndarray:
    """The losses of the microbatches the call finished, in the order they finished (host array)."""
    loss, busy = np.asarray(output.loss)[-1], np.asarray(output.busy)[-1]
    return loss[busy]


def mean_loss(output: PipelineOutput) -> float:
    """The mean loss of the microbatches the call finished (NaN if it finished none)."""
    done = finished_losses(output)
    return float(np.mean(done)) if done.size else float("nan")


def refuse_update_locked(variant: F3Variant) -> None:
    """Raises ValueError for a feedback variant whose signal needs the current output (DFA): update locking."""
    if variant not in SIGNAL_BEFORE_FORWARD:
        raise ValueError(
            f"estimator: variant {variant!r} ({f3_maths.method_name(variant)}) feeds back the current output's error, "
            "so no stage can update before the microbatch has passed the last stage (update locking, the pipeline "
            "would stall); use f3 (the stored error of the previous visit), drtp (the target) or llo on the "
            "pipeline, or backprop for the GPipe baseline"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class FeedbackPipeline:
    """F3 / DRTP / last-layer-only training as a pipeline over a ``("stage",)`` mesh; see the module docstring.

    Built by :func:`feedback_pipeline`. ``state = pipe.init(params)``, then ``state, output = pipe.run(state,
    batch)`` per step of ``M`` microbatches (``drain=True`` for the epoch's last step), ``pipe.block_params(state)``
    for the model.

    Attributes:
      layout: the stages (:class:`StageLayout`; ``layout.split`` is the cut).
      mesh: the ``("stage",)`` mesh.
      num_microbatches: ``M``, microbatches per call.
      microbatch_size: ``b``.
      variant: the feedback variant (one of :data:`SIGNAL_BEFORE_FORWARD`).
      dtype: the dtype of the error signal and the buffer (the head's parameters').
    """

    layout: StageLayout
    mesh: Mesh
    num_microbatches: int
    microbatch_size: int
    variant: F3Variant
    spec: Any
    estimator: Any
    optimizer: optax.GradientTransformation
    target_shape: tuple[int, ...]
    target_dtype: Any
    num_train: int
    dtype: Any

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    @property
    def split(self):
        return self.layout.split

    @property
    def delayed(self) -> bool:
        return self.spec.delayed

    @property
    def batch_size(self) -> int:
        return self.num_microbatches * self.microbatch_size

    def ticks(self, *, drain: bool) -> int:
        """Ticks of one call: ``M``, plus ``S - 1`` when it drains."""
        return self.num_microbatches + (self.num_stages - 1 if drain else 0)

    # -- state ---------------------------------------------------------------------------------------------------

    def _stage_feedback(self, feedback: Sequence[jax.Array], stage: int) -> tuple[jax.Array, ...]:
        """The matrices of stage ``stage``'s hidden blocks (the head has none)."""
        last = self.layout.chain.num_blocks - 1
        return tuple(feedback[index] for index in self.layout.blocks(stage) if index < last)

    def _feedback_packings(self, feedback: Sequence[jax.Array]) -> tuple[Packing, ...]:
        per_stage = [self._stage_feedback(feedback, s) for s in range(self.num_stages)]
        longest = max(Packing.of(m).size for m in per_stage)
        dtype = self.layout.packings[0].dtype
        return tuple(Packing.of(m, longest, dtype) for m in per_stage)

    @functools.cached_property
    def _abstract_feedback(self) -> tuple[Packing, ...]:
        params = self.layout.unpack_params(jnp.zeros((self.num_stages, self.layout.param_length), self._dtype))
        state = jax.eval_shape(self.estimator.init, params)
        return self._feedback_packings(state.feedback)

    @property
    def _dtype(self):
        return self.dtype

    def init(self, params: Sequence[Any], estimator_state: Any = None) -> FeedbackPipelineState:
        """The placed state at ``params`` (one pytree per block) with the feedback matrices (and F3's buffer) of
        ``estimator_state`` (default: the single-device estimator's ``init(params)``, so both draw the same)."""
        params = tuple(params)
        packed = self.layout.pack_params(params)  # checks the number of blocks first
        if estimator_state is None:
            estimator_state = self.estimator.init(params)
        f3_maths._check_state(self.spec, estimator_state)
        fb_packings = self._feedback_packings(estimator_state.feedback)
        feedback = jnp.stack(
            [p.pack(self._stage_feedback(estimator_state.feedback, s)) for s, p in enumerate(fb_packings)]
        )
        S, b, C = self.num_stages, self.microbatch_size, self.layout.num_outputs
        errors = None
        if self.delayed:
            buffer = jnp.asarray(estimator_state.errors)
            errors = jnp.concatenate([buffer[None], jnp.zeros((S - 1, *buffer.shape), buffer.dtype)])
        inflight = InFlight(
            act=jnp.zeros((S, b, self.layout.width), self.layout.dtype),
            signal=jnp.zeros((S, b, C), self._dtype),
            y=jnp.zeros((S, b, *self.target_shape), self.target_dtype),
            idx=jnp.zeros((S, b), jnp.int32),
            valid=jnp.zeros((S,), bool),
        )
        opt_state = jax.vmap(self.optimizer.init)(packed)
        staged = (packed, opt_state, feedback, errors, inflight)
        packed, opt_state, feedback, errors, inflight = place(staged, self.mesh, P(STAGE_AXIS))
        step = replicate(jnp.zeros((), jnp.int32), self.mesh)
        return FeedbackPipelineState(step, packed, opt_state, feedback, errors, inflight)

    def block_params(self, state: FeedbackPipelineState) -> tuple[Any, ...]:
        """The model's per-block parameters (host arrays), as :func:`jaxalgo.models.split_chain` gives them."""
        return jax.tree.map(np.asarray, self.layout.unpack_params(np.asarray(state.params)))

    def error_buffer(self, state: FeedbackPipelineState) -> np.ndarray | None:
        """F3's delayed-error buffer ``[N, C]`` (host), or None without one."""
        return None if state.errors is None else np.asarray(state.errors)[0]

    # -- the program ---------------------------------------------------------------------------------------------

    def _branch(self, stage: int, fb_packing: Packing):
        """The work of stage ``stage`` on one microbatch: its forward and every block's update (the gradient-shaped
        vector its optimizer consumes), its output, the last stage's error rows and loss."""
        layout, spec, chain = self.layout, self.spec, self.layout.chain
        last = chain.num_blocks - 1
        blocks = layout.blocks(stage)
        packing = layout.packings[stage]
        C, b = layout.num_outputs, self.microbatch_size

        def run(ops):
            vec, fb_vec, x, act, signal, y = ops
            block_params = list(packing.unpack(vec))
            matrices = fb_packing.unpack(fb_vec)
            h = x if stage == 0 else unpack_rows(act, layout.input_shapes[stage])
            grads, loss, rows = [], jnp.zeros((), self._dtype), jnp.zeros((b, C), self._dtype)
            for k, index in enumerate(blocks):
                if index < last:  # a hidden block: e B_l as the incoming gradient, its vjp right after its forward
                    out, block_vjp = jax.vjp(lambda q, i=index, h_in=h: chain.apply_block(i, q, h_in), block_params[k])
                    (g,) = block_vjp(f3_maths._hidden_cotangent(spec, signal, matrices[k], out))
                    grads.append(g)
                    h = out
                    if k + 1 < len(blocks):
                        block_params[k + 1], signal = f3_maths._after(g, (block_params[k + 1], signal))
                else:  # the head: the true gradient of the loss, its input held fixed
                    head = lambda q, h_in=h: f3_maths._head_loss(spec, q, h_in, y)
                    (loss, z), g = jax.value_and_grad(head, has_aux=True)(block_params[k])
                    grads.append(g)
                    if spec.delayed:
                        t = f3_maths.encode_targets(y, C, self._dtype)
                        rows = f3_maths._stored_signal(spec, z, y, t).astype(self._dtype)
            act_out = pack_rows(h, layout.width).astype(layout.dtype) if stage < layout.num_stages - 1 else act * 0
            return packing.pack(tuple(grads)), act_out, rows, loss.astype(self._dtype)

        return run

    def _idle(self, ops):
        vec, _, _, act, signal, _ = ops
        return jnp.zeros_like(vec), act * 0, jnp.zeros_like(signal), jnp.zeros((), self._dtype)

    def program(self, *, drain: bool):
        """The jitted call ``(state, batch) -> (state, PipelineOutput)`` of ``M`` ticks (``M + S - 1`` with
        ``drain``); the state is donated. For compiling and inspecting (memory, HLO); :meth:`run` checks first. With
        one stage there is nothing to drain: both are the same program."""
        return self._programs[bool(drain) and self.num_stages > 1]

    @functools.cached_property
    def _programs(self) -> dict[bool, Any]:
        return {drain: self._build(drain) for drain in (False, True)}

    def _build(self, drain: bool):
        S, M, b = self.num_stages, self.num_microbatches, self.microbatch_size
        N, C = self.num_train, self.layout.num_outputs
        ticks = self.ticks(drain=drain)
        fb_packings = self._abstract_feedback
        branches = [varying(self._branch(s, fb_packings[s])) for s in range(S)] + [varying(self._idle)]
        spec, dtype = self.spec, self._dtype
        forward = [(s, s + 1) for s in range(S - 1)]
        back = [(S - 1, 0)]

        def body(params, opt_state, feedback, errors, inflight, x, y, idx):
            stage = jax.lax.axis_index(STAGE_AXIS)
            params, opt_state, feedback, errors, inflight = local((params, opt_state, feedback, errors, inflight))
            first = stage == 0

            def tick(carry, t):
                params, opt_state, errors, reg = carry
                j = jnp.minimum(t, M - 1)
                x_t, y_t, idx_t = (jax.lax.dynamic_slice_in_dim(a, j * b, b) for a in (x, y, idx))
                target = f3_maths.encode_targets(y_t, C, dtype)
                rows_in = None
                if spec.delayed:  # stage 0 reads the stored rows of the microbatch entering now
                    safe, _ = f3_maths._buffer_index(idx_t, N)
                    rows_in = f3_maths._read_buffer(errors, safe)
                entering = f3_maths._error_before_forward(spec, rows_in, target)
                signal = jnp.where(first, entering.astype(dtype), reg.signal)
                y_cur = jnp.where(first, y_t, reg.y)
                idx_cur = jnp.where(first, idx_t, reg.idx)
                valid = jnp.where(first, t < M, reg.valid)
                which = jnp.where(valid, stage, S)
                ops = (params, feedback, x_t, reg.act, signal, y_cur)
                grads, act_out, rows_out, loss = jax.lax.switch(which, branches, ops)
                # the stage's optimizer step on its parameter vector, kept only when it worked on a microbatch (an
                # idle stage computes it on a zero gradient and drops it: the branches only return the gradient)
                updates, new_opt = self.optimizer.update(grads, opt_state, params)
                keep = lambda new, old: jnp.where(valid, new, old)
                params = keep(optax.apply_updates(params, updates), params)
                opt_state = jax.tree.map(keep, new_opt, opt_state)
                if spec.delayed:
                    _, in_range = f3_maths._buffer_index(idx_cur, N)
                    loss = f3_maths._nan_unless(in_range, loss)
                if S > 1:
                    sent = InFlight(act_out, signal, y_cur, idx_cur, valid & (stage < S - 1))
                    reg = send(sent, forward)
                if spec.delayed:  # the last stage's new rows go back to stage 0, which writes them
                    if S > 1:
                        back_rows, back_idx, back_valid = send((rows_out, idx_cur, valid & (stage == S - 1)), back)
                    else:
                        back_rows, back_idx, back_valid = rows_out, idx_cur, valid
                    safe, _ = f3_maths._buffer_index(back_idx, N)
                    errors = f3_maths._write_buffer(errors, jnp.where(back_valid, safe, N), back_rows)
                return (params, opt_state, errors, reg), (loss, valid)

            carry = (params, opt_state, errors, inflight)
            (params, opt_state, errors, inflight), (losses, busy) = jax.lax.scan(tick, carry, jnp.arange(ticks))
            state = to_global((params, opt_state, feedback, errors, inflight))
            return state, PipelineOutput(losses[None], busy[None])

        def run(state: FeedbackPipelineState, batch: dict[str, Any]):
            x = batch["x"]  # microbatch j is rows j b : (j + 1) b, sliced at its tick (no copy of the batch)
            y = batch["y"].astype(self.target_dtype)
            idx = batch["idx"] if "idx" in batch else jnp.zeros((M * b,), jnp.int32)
            idx = idx.astype(jnp.int32)
            staged = (state.params, state.opt_state, state.feedback, state.errors, state.inflight)
            specs = stage_specs(staged)
            sharded = jax.shard_map(
                body,
                mesh=self.mesh,
                in_specs=(*specs, P(), P(), P()),
                out_specs=(specs, P(STAGE_AXIS)),  # every leaf of the PipelineOutput: one row per stage
            )
            (params, opt_state, feedback, errors, inflight), output = sharded(*staged, x, y, idx)
            new = FeedbackPipelineState(state.step + 1, params, opt_state, feedback, errors, inflight)
            return new, output

        return jax.jit(run, donate_argnums=0)

    def check_batch(self, batch: Any) -> None:
        """Raises ValueError unless ``batch`` holds ``M * b`` examples (and ``idx`` for F3)."""
        keys = "'x' and 'y' (and 'idx' for F3's delayed error)"
        check_batch_rows(batch, self.num_microbatches, self.microbatch_size, keys=keys)
        if self.delayed:
            f3_maths._check_batch(batch, num_train=self.num_train)

    def place_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch replicated on the stages (stage 0 reads ``x``; each microbatch's targets travel with it)."""
        return replicate({k: jnp.asarray(v) for k, v in batch.items() if k in ("x", "y", "idx")}, self.mesh)

    def run(
        self, state: FeedbackPipelineState, batch: dict[str, Any], *, drain: bool = False
    ) -> tuple[FeedbackPipelineState, PipelineOutput]:
        """Feeds the ``M`` microbatches of ``batch`` (rows ``j b : (j + 1) b`` are microbatch ``j``), one per tick,
        and returns the new state and what each stage did; with ``drain`` the ``S - 1`` extra ticks empty the
        pipeline (every microbatch fed so far has then updated every stage and written its error rows)."""
        self.check_batch(batch)
        return self.program(drain=drain)(state, self.place_batch(batch))


def feedback_pipeline(
    problem: Problem,
    options: FeedbackOptions,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    params: Sequence[Any],
    num_microbatches: int,
    microbatch_size: int,
    bounds: Sequence[Sequence[int]] | None = None,
) -> FeedbackPipeline:
    """F3, DRTP or last-layer-only as a pipeline over the stages of ``mesh``; see the module docstring.

    Args:
      problem: the task (:class:`jaxalgo.grads.Problem`): ``chain``, ``output_loss``, ``loss_name``,
        ``input_shape``, ``train_targets`` (the buffer's initial rows and the shape of the targets that travel)
        and ``key`` (the feedback matrices, drawn as the single-device estimator draws them).
      options: the feedback estimator's options (:class:`jaxalgo.grads.FeedbackOptions`, the presets ``f3``,
        ``drtp``, ``llo``); DFA's ``current_error`` is refused (update locking). Both of its modes compute the same
        updates; the pipeline always runs each block's update right after its forward.
      optimizer: an optax optimizer that acts elementwise (sgd, momentum, adam, adamw, L2 decay), applied by each
        stage to its own parameter vector.
      mesh: a ``("stage",)`` mesh (:func:`stage_mesh`); its size is the number of stages ``S``.
      params: the model's per-block parameters (shapes and the balanced cut are read from them).
      num_microbatches: ``M``, microbatches fed per call of ``run`` (>= 1).
      microbatch_size: ``b``, examples per microbatch (each stage's update uses one microbatch).
      bounds: an explicit cut, ``(start, stop)`` block indices per stage (default: balanced by parameter count).

    Returns:
      A :class:`FeedbackPipeline`.

    Example::

      problem = Problem.from_chain(fn, jaxalgo.losses.softmax_cross_entropy, loss_name="cross_entropy",
                                   input_shape=ds.x_train.shape[1:], num_outputs=ds.num_outputs,
                                   train_targets=ds.y_train, key=key)
      mesh = jaxalgo.parallel.pipeline.stage_mesh(2)
      pipe = feedback_pipeline(problem, FeedbackOptions(), optax.adam(1e-3), mesh, params=params,
                               num_microbatches=4, microbatch_size=8)
      state = pipe.init(params)
      state, out = pipe.run(state, batch)  # a batch of 4 * 8 examples: the first 4 - (S - 1) finish
      state, out = pipe.run(state, batch, drain=True)  # the epoch's last call empties the pipeline
      print(pipe.split, mean_loss(out))
    """
    if not isinstance(options, FeedbackOptions):
        raise TypeError(f"options: expected jaxalgo.grads.FeedbackOptions, got {type(options).__name__}")
    refuse_update_locked(options.variant)
    problem.require("chain", "output_loss", "input_shape", "train_targets", "key", by="the feedback pipeline")
    assert problem.input_shape is not None  # checked by require
    num_stages = num_stages_of(mesh)
    num_microbatches = check_positive_int("num_microbatches", num_microbatches)
    microbatch_size = check_positive_int("microbatch_size", microbatch_size)
    chain = f3_maths.as_chain(problem.chain, by="the feedback pipeline")
    params = tuple(params)
    f3_maths._check_params(chain, params)
    estimator = options.build(problem)
    spec = f3_maths._make_spec(
        chain,
        problem.output_loss,
        variant=options.variant,
        output_activation=f3_maths.loss_activation(problem.loss_name),
        train_targets=problem.train_targets,
        mode="per_block",
        hidden_reduction=options.reduction,
    )
    split = split_stages(params, num_stages, bounds=bounds)
    layout = StageLayout.build(chain, params, split, problem.input_shape)
    targets = jnp.asarray(np.asarray(problem.train_targets)[:1])
    return FeedbackPipeline(
        layout=layout,
        mesh=mesh,
        num_microbatches=num_microbatches,
        microbatch_size=microbatch_size,
        variant=options.variant,
        spec=spec,
        estimator=estimator,
        optimizer=optimizer,
        target_shape=tuple(targets.shape[1:]),
        target_dtype=targets.dtype,
        num_train=len(problem.train_targets),
        dtype=f3_maths._dtype(params),
    )


def stale_reads(orders: Sequence[Sequence[int]], microbatch_size: int, num_stages: int) -> int:
    """How many error rows a pipeline that never drains between epochs reads before the sample's previous write
    has landed (see the module docstring): the samples visited at microbatches ``m' < m`` with ``m - m' < S``.

    Args:
      orders: the sample indices of each epoch in visit order (``len`` a multiple of ``microbatch_size``).
      microbatch_size: ``b``.
      num_stages: ``S``.

    Returns:
      The number of stale reads over the run (0 when every epoch drains, or with one stage).
    """
    last_visit: dict[int, int] = {}
    stale, m = 0, 0
    for order in orders:
        visits = np.asarray(order)
        for start in range(0, len(visits) - microbatch_size + 1, microbatch_size):
            for i in visits[start : start + microbatch_size].tolist():
                if i in last_visit and m - last_visit[i] < num_stages:
                    stale += 1
                last_visit[i] = m
            m += 1
    return stale


__all__ = [
    "SIGNAL_BEFORE_FORWARD",
    "FeedbackPipeline",
    "FeedbackPipelineState",
    "InFlight",
    "PipelineOutput",
    "feedback_pipeline",
    "finished_losses",
    "mean_loss",
    "refuse_update_locked",
    "stale_reads",
]
