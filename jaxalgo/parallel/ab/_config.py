"""AB-training's options (:class:`ABConfig`), its sync modes and its ``("group", "dp")`` mesh."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Literal

import jax
from jax.sharding import Mesh

from jaxalgo.lowrank._svd import check_cutoff
from jaxalgo.options import check_fields
from jaxalgo.parallel._mesh import make_mesh

GROUP_AXIS, DP_AXIS = "group", "dp"
AB_AXES: tuple[str, str] = (GROUP_AXIS, DP_AXIS)

SyncMode = Literal["full", "with-stale", "only-learned", "only-b"]
"""How AB-training merges the groups' models at a sync (see :class:`ABConfig`'s ``sync_mode``)."""
SYNC_MODES: tuple[SyncMode, ...] = typing.get_args(SyncMode)


def check_sync_mode(sync_mode: SyncMode) -> SyncMode:
    """Returns ``sync_mode`` if it is one of :data:`SYNC_MODES`, else raises a ValueError naming the choices."""
    if not isinstance(sync_mode, str) or sync_mode not in SYNC_MODES:
        raise ValueError(f"sync_mode: unknown mode {sync_mode!r}; allowed: {', '.join(SYNC_MODES)}")
    return sync_mode


@dataclasses.dataclass(frozen=True)
class ABConfig:
    """AB-training's schedule and options.

    The schedule's defaults are those of the published figures (README, "AB-training"): a warm-up of 50 steps, a
    sync every 20 steps followed by one data-parallel step, a learning-rate ramp of 5 steps.

    Attributes:
      warmup_steps: full-rank data-parallel steps before the first group phase (>= 0).
      steps_between_syncs: period of the cycle sync / data-parallel steps / re-SVD / group phase (>= 1).
      ddp_steps_after_sync: data-parallel steps opening each cycle (<= steps_between_syncs; equal: no group phase).
      sync_mode: the merge: full (mean A B), with-stale (mean A mean B), only-learned (trained factors), only-b.
      cutoff: keep singular values s_i >= cutoff * s_0, in (0, 1); None keeps the full rank.
      lr_rebound_steps: steps of the linear learning-rate ramp after each transition (0: no rebound).
      lr_rebound_floor: the learning rate right after a transition (the reference: 1e-5).
      bucket_ratio: ratio of the zero-padded rank buckets (1: exact shapes, a re-compilation per rank change).
      min_aspect: eligibility of a weight for factorisation: min(m, n) > min_aspect * max(m, n).
    """

    warmup_steps: int = 50
    steps_between_syncs: int = 20
    ddp_steps_after_sync: int = 1
    sync_mode: SyncMode = "full"
    cutoff: float | None = 0.15
    lr_rebound_steps: int = 5
    lr_rebound_floor: float = 1e-5
    bucket_ratio: float = 1.25
    min_aspect: float = 0.1

    def __post_init__(self):
        # The mode first, so that an unknown one is reported as such (check_fields would word it generically).
        check_sync_mode(self.sync_mode)
        check_fields(self)
        lows = {"warmup_steps": 0, "steps_between_syncs": 1, "ddp_steps_after_sync": 0, "lr_rebound_steps": 0}
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.ddp_steps_after_sync > self.steps_between_syncs:
            raise ValueError(
                f"ddp_steps_after_sync: {self.ddp_steps_after_sync} must be <= steps_between_syncs = "
                f"{self.steps_between_syncs} (the data-parallel steps are part of the cycle)"
            )
        if self.cutoff is not None:
            check_cutoff(self.cutoff)
        if not self.lr_rebound_floor > 0:
            raise ValueError(f"lr_rebound_floor: must be a number > 0, got {self.lr_rebound_floor!r}")
        if not self.bucket_ratio >= 1:
            raise ValueError(f"bucket_ratio: must be a number >= 1 (1 = exact shapes), got {self.bucket_ratio!r}")
        if not 0 <= self.min_aspect < 1:
            raise ValueError(f"min_aspect: must be a number in [0, 1), got {self.min_aspect!r}")


def ab_mesh(group_size: int, *, devices: Sequence[jax.Device] | None = None, sync_mode: SyncMode = "full") -> Mesh:
    """The ``("group", "dp")`` mesh of ``len(devices) / group_size`` groups of ``group_size`` contiguous devices.

    Raises:
      ValueError: ``group_size`` does not divide the device count, or the number of groups is odd (A and B groups
        come in equal halves; only ``sync_mode="only-b"`` accepts any number), or ``sync_mode`` is unknown.
    """
    check_sync_mode(sync_mode)
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: must be an integer >= 1, got {group_size!r}")
    if len(devices) % group_size:
        raise ValueError(
            f"group_size: {group_size} does not divide the {len(devices)} devices; choose a divisor of {len(devices)}"
        )
    mesh = make_mesh((len(devices) // group_size, group_size), AB_AXES, devices=devices)
    check_ab_mesh(mesh, sync_mode)
    return mesh


def check_ab_mesh(mesh: Mesh, sync_mode: SyncMode = "full") -> None:
    """Raises ValueError unless ``sync_mode`` is one of :data:`SYNC_MODES` and ``mesh`` has the axes
    ``("group", "dp")`` and (except for ``only-b``) an even number of groups."""
    check_sync_mode(sync_mode)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != AB_AXES:
        raise ValueError(f"mesh: AB-training needs the axes {AB_AXES}, got {tuple(mesh.axis_names)}")
    groups = mesh.shape[GROUP_AXIS]
    if sync_mode != "only-b" and groups % 2:
        raise ValueError(
            f"mesh: {groups} groups is an odd number; half of the groups train A and half B, so use an even number "
            "of groups (or sync_mode 'only-b')"
        )
