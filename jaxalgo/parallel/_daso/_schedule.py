"""DASO's schedule, decided on the host: the adaptive part (:class:`DasoSchedule`, :func:`initial_schedule`,
:func:`update_schedule` at the end of each epoch), the phase of each step (:func:`daso_phase`) and the windows from
a send to its merge (:func:`daso_window`)."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalgo.parallel._daso._config import DasoConfig, Phase


class DasoSchedule(NamedTuple):
    """The adaptive part of DASO's schedule (scalar arrays, saved in checkpoints)."""

    global_skip: jax.Array
    batches_to_wait: jax.Array
    best_loss: jax.Array
    bad_epochs: jax.Array


def initial_schedule(config: DasoConfig) -> DasoSchedule:
    return DasoSchedule(
        global_skip=jnp.asarray(config.global_skip, jnp.int32),
        batches_to_wait=jnp.asarray(config.batches_to_wait, jnp.int32),
        best_loss=jnp.asarray(jnp.inf, jnp.float32),
        bad_epochs=jnp.asarray(0, jnp.int32),
    )


def in_warmup_or_cooldown(epoch: int, total_epochs: int, config: DasoConfig) -> bool:
    return epoch < config.warmup_epochs or epoch >= total_epochs - config.cooldown_epochs


def daso_phase(
    step: int, *, steps_per_epoch: int, total_epochs: int, global_skip: int, batches_to_wait: int, config: DasoConfig
) -> Phase:
    """The phase of global step ``step``: ``"blocking"``, ``"send"``, ``"merge"`` or ``"local"``.

    Blocking during warm-up and cool-down, with ``S = 0``, and on the last batch of each epoch. Otherwise a send on
    batches ``i`` with ``(i + 1) % global_skip == 0`` and its merge ``S`` batches later; a send whose merge would
    fall on or after the epoch's last batch is superseded by that batch's blocking average.
    """
    epoch, i = divmod(int(step), int(steps_per_epoch))
    last = steps_per_epoch - 1
    if in_warmup_or_cooldown(epoch, total_epochs, config) or batches_to_wait == 0 or i == last:
        return "blocking"
    if (i + 1) % global_skip == 0:
        return "send"
    sent = i - batches_to_wait
    if sent >= 0 and (sent + 1) % global_skip == 0:
        return "merge"
    return "local"


def daso_window(
    step: int, *, steps_per_epoch: int, total_epochs: int, global_skip: int, batches_to_wait: int, config: DasoConfig
) -> int:
    """``S + 1`` if global step ``step`` is a send whose merge follows ``S = batches_to_wait`` steps later in the same
    epoch (the steps between them are local), else 1: the length of the window program from a send to its merge.

    A send that the epoch's last (blocking) batch supersedes has no merge, so it gets no window.
    """
    phase = functools.partial(
        daso_phase,
        steps_per_epoch=steps_per_epoch,
        total_epochs=total_epochs,
        global_skip=global_skip,
        batches_to_wait=batches_to_wait,
        config=config,
    )
    s = int(batches_to_wait)
    offset = int(step) % int(steps_per_epoch)
    if s < 1 or offset + s >= steps_per_epoch or phase(step) != "send" or phase(int(step) + s) != "merge":
        return 1
    return s + 1


def update_schedule(
    schedule: DasoSchedule, *, epoch: int, train_loss: float, total_epochs: int, config: DasoConfig
) -> DasoSchedule:
    """The schedule for the epoch after ``epoch`` (0-based), given its mean training loss; runs on the host.

    Plateaus are only detected between warm-up and cool-down, and only with ``config.adaptive``.
    """
    if not config.adaptive or in_warmup_or_cooldown(epoch, total_epochs, config):
        return schedule
    skip, wait = int(schedule.global_skip), int(schedule.batches_to_wait)
    best, bad = float(schedule.best_loss), int(schedule.bad_epochs)
    if train_loss < best * (1.0 - config.plateau_threshold) or not math.isfinite(best):
        best, bad = float(train_loss), 0
    else:
        bad += 1
    if bad >= config.plateau_patience:
        bad = 0
        skip, wait = after_plateau(skip, wait, config)
    return DasoSchedule(
        global_skip=jnp.asarray(skip, jnp.int32),
        batches_to_wait=jnp.asarray(wait, jnp.int32),
        best_loss=jnp.asarray(best, jnp.float32),
        bad_epochs=jnp.asarray(bad, jnp.int32),
    )


def after_plateau(skip: int, wait: int, config: DasoConfig) -> tuple[int, int]:
    """``(global_skip, S)`` after a plateau: ``global_skip`` halved and ``S`` lowered by one (floor 1), or at
    ``global_skip = 1`` reset to ``max_global_skip`` with ``S = max_global_skip // 4``; ``S < global_skip`` always."""
    if skip > 1:
        skip, wait = skip // 2, max(wait - 1, 1)
    else:
        skip, wait = config.max_global_skip, max(config.max_global_skip // 4, 1)
    return skip, min(wait, skip - 1)
