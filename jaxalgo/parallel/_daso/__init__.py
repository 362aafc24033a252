"""DASO: hierarchical data parallelism with node-local synchronous and delayed, selective global averaging.

On a ``("node", "local")`` mesh with ``P`` nodes:

- **every step**, the gradients are averaged inside each node (fast links) and each node takes its own optimizer
  step, so parameters and optimizer state differ between nodes (they are stored stacked, one slice per node);
- **every** ``global_skip`` **steps** the parameters are averaged across nodes (each node sends its change since the
  last global average in ``comm_dtype``, bf16, see below); the average is applied ``S = batches_to_wait`` steps
  later, merged with the parameters the node has reached by then:

  .. math::
    \\theta \\leftarrow \\frac{w S\\, \\theta_{local} + \\sum_{n=1}^{P} \\theta_{n, stale}}{w S + P},
    \\qquad w = 2 \\text{ by default};

  with ``S = 0``, and on the last batch of every epoch, the average is blocking and replaces the parameters;
- warm-up (first ``warmup_epochs``) and cool-down (last ``cooldown_epochs``) average globally at every step;
- between them, a plateau of the epoch training loss (no improvement below ``best * (1 - plateau_threshold)`` for
  ``plateau_patience`` epochs) halves ``global_skip`` and lowers ``S`` by one (floor 1); at ``global_skip = 1`` a
  plateau resets to ``max_global_skip`` with ``S = max_global_skip // 4``.
- ``sharded=True`` uses the Horovod-style hierarchical average: each local device averages ``1 / N_local`` of the
  parameters across nodes and the pieces are all-gathered inside the node, dividing cross-node bytes by ``N_local``.

The step is compiled once per **phase** (``"local"``, ``"send"``, ``"merge"``, ``"blocking"``); the host picks the
phase of each step with :func:`daso_phase` from the step index and the schedule, so every compiled program has a
fixed set of collectives (which :func:`jaxalgo.parallel.comm_report` can account for). The schedule and the last
global average live in :class:`DasoState`, part of the train state, so checkpoints hold them.

Asynchrony. A step program that sends has to wait for the cross-node all-reduce before it returns, so the average
cannot travel while the next steps compute. The **window** program (``config.program = "window"``, the default) runs
the ``S + 1`` steps from a send to its merge as one compiled program: the cross-node average is issued after the
send step's update and consumed only by the merge, with the ``S`` steps between them independent of it, so XLA's
latency-hiding scheduler (GPU, TPU) can overlap the all-reduce with ``S`` steps of compute, which is the paper's
non-blocking send. It computes exactly what the step programs compute (the same trajectory, bit for bit on
XLA:CPU) and sends the same bytes; the runner uses it whenever the send's merge lies in the same epoch
(:func:`daso_window`) and runs the step programs otherwise. It is the default because it costs nothing in
accuracy or bytes and is the algorithm as published; its price is one more compilation per value of ``S``, and a
checkpoint can only be taken at the end of a window (``program = "step"`` can checkpoint with an average in flight
and compiles only the four phases).

Wire precision. Each node sends ``theta_n - theta_avg``, its change since the last global average, in
``comm_dtype``, and the average of the changes is added to the float32 copy of ``theta_avg`` that the state keeps
(:mod:`jaxalgo.parallel._daso._merge`): the rounding error is relative to the change, not to the weights
(a bf16 average of the weights themselves is off by up to ``2^-8 |theta|``), for the same bytes on the wire.

Differences from the reference (Heat's ``DASO`` optimizer), stated here on purpose: the in-flight average is a
collective inside the compiled window program (overlapped by XLA's scheduler) rather than a background MPI
request; the wire carries the changes since the last global average rather than the parameters; ``S`` is kept
below ``global_skip`` so that at most one average is in flight (the reference allows ``S = global_skip = 1``; here
``global_skip = 1`` runs with ``S = 0``, i.e. blocking); the estimator's own state (e.g. F3's per-sample buffer) is
merged across all devices every step, so per-sample state stays exact whichever node a sample lands on.

Forward gradients. For an estimator with a directional split (weight-perturbation forward gradients, see
:mod:`jaxalgo.parallel._forward_dp`) the node-local average is of the ``k`` directional derivatives and the loss
(``k + 1`` numbers instead of ``n``), and every device of the node rebuilds the same estimate. The global averages
stay averages of *parameters*: after local steps the nodes' parameters differ, and no ``k`` numbers describe that
difference. For these estimators plain data parallelism (:func:`jaxalgo.parallel.data_parallel`, ``--parallel
ddp``) supersedes DASO: it averages the ``k`` directional derivatives across *all* devices every step, so every
step is globally synchronous (no stale merges, exactly the full-batch estimate) and costs ``4 (k + 1)`` cross-node
bytes, while DASO's cheapest phase cycle still sends ``n`` bf16 parameters every ``global_skip`` steps (about
``2 n / global_skip`` bytes per step; for ``n = 2.9M``, ``k = 16``, ``global_skip = 4`` that is 21 000 x more).
``--parallel daso`` with such an estimator runs DASO as specified, with the cheaper node-local average.

The pieces, each in its own module: the options (``_config``: :class:`DasoConfig`, :data:`COMM_DTYPES`,
:data:`PHASES`, :data:`PROGRAMS`), the host-side schedule (``_schedule``: :class:`DasoSchedule`,
:func:`initial_schedule`, :func:`update_schedule`, :func:`daso_phase`, :func:`daso_window`), the state and its
layout on the mesh (``_state``: :class:`DasoState`, :class:`DasoTrainState`, :func:`place_daso_state`), the global
average and the stale merge (``_merge``: :func:`merge_stale`), the step program of each phase and the window
program (``_steps``: :func:`window_comm_report`) and their assembly (``_training``: :func:`daso`, :class:`Daso`).

References:
  Coquelin, Debus, Götz, von der Lehr, Kahn, Siggel, Streit, "Accelerating neural network training with
  distributed asynchronous and selective optimization (DASO)", Journal of Big Data 9, 2022 (arXiv 2104.05588).
"""

from jaxalgo.parallel._daso._config import COMM_DTYPES, PHASES, PROGRAMS, DasoConfig
from jaxalgo.parallel._daso._merge import merge_stale
from jaxalgo.parallel._daso._schedule import DasoSchedule, daso_phase, daso_window, initial_schedule, update_schedule
from jaxalgo.parallel._daso._state import DasoState, DasoTrainState, place_daso_state
from jaxalgo.parallel._daso._steps import window_comm_report
from jaxalgo.parallel._daso._training import Daso, daso

__all__ = [
    "COMM_DTYPES",
    "PHASES",
    "PROGRAMS",
    "Daso",
    "DasoConfig",
    "DasoSchedule",
    "DasoState",
    "DasoTrainState",
    "daso",
    "daso_phase",
    "daso_window",
    "initial_schedule",
    "merge_stale",
    "place_daso_state",
    "update_schedule",
    "window_comm_report",
]
