"""The bytes AB-training's programs send, read from their compiled HLO (:func:`jaxalgo.parallel.comm_report`)."""

from __future__ import annotations

import typing
from typing import Any, Literal

import jax
from jax.sharding import PartitionSpec as P

from jaxalgo.parallel._comm import CommReport, comm_report
from jaxalgo.parallel._data_parallel import reshard
from jaxalgo.parallel.ab._config import AB_AXES
from jaxalgo.parallel.ab._schedule import Phase
from jaxalgo.parallel.ab._state import ABTrainState
from jaxalgo.parallel.ab._training import AB

Program = Literal[Phase, "sync"]
"""The AB programs whose traffic :func:`ab_comm` reports: the two step phases and the sync."""
PROGRAMS: tuple[Program, ...] = typing.get_args(Program)


def ab_comm(ab: AB, state: ABTrainState, batch: Any, run_key: jax.Array) -> dict[str, Any]:
    """Bytes per device of each AB program at the state's ranks (from the compiled HLO, see ``comm_report``),
    and the average over one steady cycle of ``steps_between_syncs`` steps.

    Two levels are reported. **All bytes** (``"bytes"``, ``"cycle_bytes"``): everything a device sends, inside its
    group or across groups. **Cross-group bytes** (``"cross_node_bytes"``, ``"cycle_cross_node_bytes"``): the
    collectives whose replica groups span the ``"group"`` axis; with one group per node (the reference's setup:
    groups of 4 GPUs) this is the network traffic, and the group phase sends none of it.

    Returns:
      ``{"ddp", "group", "sync"}``: :class:`~jaxalgo.parallel.CommReport` s; ``"bytes"`` and
      ``"cross_node_bytes"``: their totals and ``"factorize": 0`` (each process computes the SVD of its own copy
      of ``W``; the agreed cut gathers one int32 per layer and process, not counted); ``"cycle_bytes"`` and
      ``"cycle_cross_node_bytes"``: ``(D * ddp + (S - D) * group + sync + factorize) / S`` with
      ``S = steps_between_syncs``, ``D = ddp_steps_after_sync`` (bytes as requested by the program, i.e. before
      XLA:CPU widens bf16).
    """
    reports: dict[str, CommReport] = {
        program: ab_program_report(ab, program, state, batch, run_key) for program in PROGRAMS
    }
    period, ddp = ab.config.steps_between_syncs, ab.config.ddp_steps_after_sync
    out: dict[str, Any] = dict(reports)
    for level, count in (
        ("bytes", lambda r: r.total(requested=True)),
        ("cross_node_bytes", lambda r: r.requested_cross_node_bytes),
    ):
        total = {name: count(report) for name, report in reports.items()}
        total["factorize"] = 0  # the SVD runs on each process's own copy of W; only the ranks are gathered
        out[level] = total
        out[f"cycle_{level}"] = (
            ddp * total["ddp"] + (period - ddp) * total["group"] + total["sync"] + total["factorize"]
        ) / period
    return out


def ab_program_report(ab: AB, program: Program, state: ABTrainState, batch: Any, run_key: jax.Array) -> CommReport:
    """The :class:`~jaxalgo.parallel.CommReport` of one AB program at the state's factor sizes: ``"ddp"`` or
    ``"group"`` (a step, lowered as the runs call it, so the compilation is shared with them) or ``"sync"``."""
    if program not in PROGRAMS:
        raise ValueError(f"program: unknown program {program!r}; allowed: {', '.join(PROGRAMS)}")
    if program == "sync":
        return comm_report(ab.sync_program, state.train, state.opt_state, mesh=ab.mesh)
    batch = reshard(batch, ab.mesh, P(AB_AXES))
    return comm_report(ab.steps[program], state, batch, run_key, 1.0, mesh=ab.mesh)
