"""AB-training: independent low-rank groups with periodic synchronisation.

Devices form a ``("group", "dp")`` mesh: ``G`` groups of ``D`` devices (contiguous device ids per group). Every
eligible dense weight ``W`` (``m x n`` matrix view, see :func:`jaxalgo.lowrank.find_layers`) is factorised by SVD as

.. math::
  W = U \\Sigma V^T \\approx A B, \\qquad A = U_{:, :r} \\Sigma_r^{1/2} \\; (m \\times r), \\qquad
  B = \\Sigma_r^{1/2} V_{:, :r}^T \\; (r \\times n),

cut at ``r = #{i : s_i >= cutoff * s_0}``, one rank per layer agreed by every process (see
:mod:`jaxalgo.parallel.ab._factorize`).

Training then cycles, after ``warmup_steps`` full-rank data-parallel
steps, with period ``steps_between_syncs``:

1. **sync** (from the second cycle on): the groups' models are merged into one full-rank model, by ``sync_mode``

   - ``"full"``: ``W = mean_g(A_g B_g)``;
   - ``"with-stale"``: ``W = mean_g(A_g) mean_g(B_g)`` (the stale factor of each group counts too);
   - ``"only-learned"``: ``W = mean_{A-groups}(A_g) mean_{B-groups}(B_g)`` (each factor only from the groups
     that trained it, i.e. averaged there and broadcast);
   - ``"only-b"``: every group trains ``B`` only and ``W = A mean_g(B_g)``;

   every other parameter (biases, norms, weights too small to factorise: "shared") is averaged over all devices;
2. ``ddp_steps_after_sync`` full-rank data-parallel steps (gradients all-reduced over every device);
3. **re-SVD** of ``W`` with the cut (the optimizer moments of ``A`` and ``B`` are sliced or zero-padded to the new
   rank, as the reference does);
4. **group phase** for the rest of the period: groups ``0 .. G/2 - 1`` train ``A`` (``B`` frozen), groups
   ``G/2 .. G - 1`` train ``B``; the shared parameters train everywhere; gradients are reduced inside the group only.

After every transition (end of warm-up, sync, re-SVD) the learning rate drops to ``lr_rebound_floor`` and ramps
back linearly over ``lr_rebound_steps`` steps (applied as a factor on the optimizer's update, which for adam(w),
sgd and momentum is the same as changing its learning rate).

**Reducing differently shaped A and B in one SPMD program.** An A-group must all-reduce ``sum_l m_l r_l`` numbers,
a B-group ``sum_l r_l n_l``; one program has one collective of one shape for all devices. Chosen approach: each
device packs its group's trained-factor gradients into one flat buffer of length ``max(sum_l m_l r_l,
sum_l r_l n_l)`` (A-gradients in A-groups, B-gradients in B-groups, zero tail for the shorter), followed by the
shared gradients, and runs **one** all-reduce over ``"dp"``. The waste is only the difference of the two sums
(zero for square layers), where padding every layer would cost ``sum_l max(m_l, n_l) r_l`` and separate
sub-mesh programs could not run the syncs (which need all devices) without a third program and its dispatch.
The gradients of ``A`` and ``B`` come from the gradient of the composed weight ``g_W`` by the chain rule,
``g_A = g_W B^T`` and ``g_B = A^T g_W``, so any estimator (not only backprop) drives AB-training.

**Orientation.** In the modes with A- and B-groups, ``A B`` factorises ``W`` as stored (inputs x outputs): the A
side and the B side of a model then tend to balance (an expanding layer's large ``B`` against a contracting
layer's large ``A``), which keeps the packed buffer short. With ``"only-b"``, every group sends ``B``, so a wide
``W`` (``m < n``) is factorised through ``W^T``, as the reference does for every layer: ``B`` is then the
``r x min(m, n)`` factor.

Parameters and optimizer state are stored stacked per group (leading axis ``G``, sharded over ``"group"``); the
train tree holds both the full-rank parameters (used in the data-parallel steps) and the factors (group phase),
and the optimizer update of a phase touches only the leaves that phase trains (masked update: frozen leaves keep
their values and moments). After a sync the moments of the shared parameters are averaged over the groups too, so
the data-parallel steps start from one optimizer state.

Differences from the reference (stated on purpose): every re-SVD cuts (the reference does not cut at the first
conversion after warm-up); the cycles are aligned to the end of warm-up; the rank is stored in zero-padded buckets
(``bucket_ratio``) so that rank changes rarely re-compile; the learning-rate ramp reaches the full rate after
``lr_rebound_steps``; only ``"only-b"`` factorises wide weights through ``W^T`` (see *Orientation*); non-eligible
matrices are treated like 1-D parameters (trained and reduced in every group,
averaged at the sync).

The pieces, each in its own module: the options and the mesh (``_config``: :class:`ABConfig`, :func:`ab_mesh`),
the host-side schedule (``_schedule``: :func:`ab_schedule`, :func:`lr_factor`), the factorised layers seen from
the parameter tree (``_layers``: :class:`ABLayer`, :func:`find_ab_layers`), the state and its layout on the mesh
(``_state``: :class:`ABTrainState`, :func:`place_ab_state`), the step program of each phase (``_steps``), the sync
of each mode and the consensus model (``_sync``), the re-SVD and resize (``_factorize``), their assembly
(``_training``: :func:`ab_training`, :class:`AB`) and the bytes they send (``_comm``: :func:`ab_comm`,
:func:`ab_program_report`).

References:
  Coquelin, Flügel, Weiel et al., "AB-training: a communication-efficient approach for distributed low-rank
  learning", arXiv 2405.01067.
"""

from jaxalgo.parallel.ab._comm import ab_comm, ab_program_report
from jaxalgo.parallel.ab._config import AB_AXES, DP_AXIS, GROUP_AXIS, SYNC_MODES, ABConfig, ab_mesh, check_ab_mesh
from jaxalgo.parallel.ab._layers import ABLayer, find_ab_layers
from jaxalgo.parallel.ab._schedule import ab_schedule, lr_factor
from jaxalgo.parallel.ab._state import ABTrainState, place_ab_state
from jaxalgo.parallel.ab._training import AB, ab_training

__all__ = [
    "AB",
    "AB_AXES",
    "DP_AXIS",
    "GROUP_AXIS",
    "SYNC_MODES",
    "ABConfig",
    "ABLayer",
    "ABTrainState",
    "ab_comm",
    "ab_mesh",
    "ab_program_report",
    "ab_schedule",
    "ab_training",
    "check_ab_mesh",
    "find_ab_layers",
    "lr_factor",
    "place_ab_state",
]
