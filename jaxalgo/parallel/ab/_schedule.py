"""AB-training's schedule, on the host: a pure function of the step index, so a resumed run does what an
uninterrupted one does."""

from __future__ import annotations

import typing
from typing import Literal

from jaxalgo.parallel.ab._config import ABConfig

Phase = Literal["ddp", "group"]
"""What an AB-training step trains: the full-rank model on every device, or each group its factor (A or B)."""
PHASES: tuple[Phase, ...] = typing.get_args(Phase)
Event = Literal["sync", "factorize"]
"""A transition run before a step: merge the groups' models, or re-factorise (re-SVD) the kernels."""


def ab_schedule(step: int, config: ABConfig) -> tuple[tuple[Event, ...], Phase]:
    """``(events, phase)`` of step ``step`` (0-based): the transitions run before it, and its phase.

    Events: ``"sync"`` (merge the groups' models; starts every cycle but the first) and ``"factorize"`` (re-SVD
    after the cycle's data-parallel steps). Phase: ``"ddp"`` (warm-up and the first ``ddp_steps_after_sync`` steps
    of each cycle) or ``"group"``.
    """
    warm, period, ddp = config.warmup_steps, config.steps_between_syncs, config.ddp_steps_after_sync
    if step < warm:
        return (), "ddp"
    u = step - warm
    cycle, offset = divmod(u, period)
    sync = cycle > 0 and offset == 0
    factorize = u >= ddp and (u - ddp) % period == 0
    order: tuple[Event, Event] = ("factorize", "sync") if ddp == period else ("sync", "factorize")
    wanted = {"sync": sync, "factorize": factorize}
    events = tuple(e for e in order if wanted[e])
    return events, "ddp" if offset < ddp else "group"


def lr_factor(step: int, config: ABConfig, lr: float) -> float:
    """The learning-rate multiplier of step ``step``: ``floor / lr`` right after a transition, rising linearly to 1
    over ``lr_rebound_steps`` steps; 1 during warm-up and without rebound."""
    rebound = config.lr_rebound_steps
    if rebound == 0 or step < config.warmup_steps:
        return 1.0
    last = step
    while last >= config.warmup_steps and not ab_schedule(last, config)[0]:
        last -= 1
    since = step - last
    if last < config.warmup_steps:  # no transition yet (cycle 0 starts with data-parallel steps)
        return 1.0
    if since >= rebound:
        return 1.0
    floor = min(config.lr_rebound_floor / lr, 1.0)
    return floor + (1.0 - floor) * since / rebound
