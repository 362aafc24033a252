"""DASO's options (:class:`DasoConfig`), the wire dtypes of the global average (:data:`COMM_DTYPES`), the phases a
step is compiled for (:data:`PHASES`) and the ways of compiling a send and its merge (:data:`PROGRAMS`)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

Phase = Literal["local", "send", "merge", "blocking"]
"""What a DASO step does globally: nothing, send a global average, merge the one in flight, or average blocking."""
PHASES: tuple[Phase, ...] = typing.get_args(Phase)
CommDtype = Literal["bfloat16", "float16", "float32"]
"""The wire dtypes of DASO's global average (:class:`DasoConfig`'s ``comm_dtype``)."""
COMM_DTYPES: tuple[CommDtype, ...] = typing.get_args(CommDtype)
Program = Literal["window", "step"]
"""How DASO compiles a send and its merge (:class:`DasoConfig`'s ``program``)."""
PROGRAMS: tuple[Program, ...] = typing.get_args(Program)


@dataclasses.dataclass(frozen=True)
class DasoConfig:
    """DASO's options (defaults from the paper).

    Attributes:
      global_skip: steps between global averages after the warm-up (>= 1).
      batches_to_wait: ``S``, steps between sending a global average and merging it (``0 <= S < global_skip``).
      warmup_epochs: leading epochs with a blocking global average every step (>= 0).
      cooldown_epochs: trailing epochs with a blocking global average every step (>= 0).
      merge_weight: ``w`` of the merge ``(w S theta_local + sum theta_stale) / (w S + P)`` (> 0).
      max_global_skip: ``global_skip`` after a plateau at ``global_skip = 1`` (>= 1).
      comm_dtype: wire dtype of the global average (it sends each node's change since the last global average,
        added to a float32 copy of that average): ``"bfloat16"``, ``"float16"`` or ``"float32"``.
      sharded: Horovod-style sharded global average (cross-node bytes / ``N_local``).
      adaptive: adapt ``global_skip`` and ``S`` on plateaus of the epoch loss.
      plateau_threshold: relative improvement that counts as progress (>= 0).
      plateau_patience: epochs without progress that make a plateau (>= 1).
      program: how a send and its merge run: window (one compiled program from the send to the merge, the global
        average overlapping the S steps between them) or step (one program per step; same trajectory).
    """

    global_skip: int = 4
    batches_to_wait: int = 1
    warmup_epochs: int = 4
    cooldown_epochs: int = 4
    merge_weight: float = 2.0
    max_global_skip: int = 8
    comm_dtype: CommDtype = "bfloat16"
    sharded: bool = False
    adaptive: bool = True
    plateau_threshold: float = 0.05
    plateau_patience: int = 3
    program: Program = "window"

    def __post_init__(self):
        check_integer(self, "global_skip", 1)
        check_integer(self, "batches_to_wait", 0)
        check_integer(self, "warmup_epochs", 0)
        check_integer(self, "cooldown_epochs", 0)
        check_integer(self, "max_global_skip", 1)
        check_integer(self, "plateau_patience", 1)
        if self.batches_to_wait >= self.global_skip:
            raise ValueError(
                f"batches_to_wait: S = {self.batches_to_wait} must be < global_skip = {self.global_skip}, so that at "
                "most one global average is in flight"
            )
        if not (isinstance(self.merge_weight, int | float) and self.merge_weight > 0):
            raise ValueError(f"merge_weight: must be a number > 0, got {self.merge_weight!r}")
        if self.comm_dtype not in COMM_DTYPES:
            raise ValueError(f"comm_dtype: unknown dtype {self.comm_dtype!r}; allowed: {', '.join(COMM_DTYPES)}")
        if not (isinstance(self.plateau_threshold, int | float) and self.plateau_threshold >= 0):
            raise ValueError(f"plateau_threshold: must be a number >= 0, got {self.plateau_threshold!r}")
        if self.program not in PROGRAMS:
            raise ValueError(f"program: unknown program {self.program!r}; allowed: {', '.join(PROGRAMS)}")


def check_integer(config: DasoConfig, name: str, low: int) -> None:
    """Raises unless the field ``name`` of ``config`` is an integer (not a bool) ``>= low``."""
    value = getattr(config, name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
