"""The optimizer catalogue: optax optimizers by name, one options dataclass per family of them.

``adam`` / ``adamw`` are :class:`AdamOptions` (``adamw``: decoupled weight decay), ``sgd`` / ``momentum`` are
:class:`SGDOptions` (``momentum``: heavy ball 0.9). Without decoupling, weight decay is added to the gradient
before the optimizer (``optax.add_decayed_weights``), i.e. L2 regularisation.
"""

from __future__ import annotations

import dataclasses
import math

import optax

from jaxalgo.options import Catalogue, Entry, check_fields, option


def _check_rate(lr: float, weight_decay: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: must be a number > 0 (and finite), got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay: must be a finite number >= 0, got {weight_decay!r}")


def _with_l2(base: optax.GradientTransformation, weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), base) if weight_decay > 0 else base


@dataclasses.dataclass(frozen=True)
class AdamOptions:
    """Adam (Kingma and Ba, arXiv 1412.6980); AdamW with decoupled weight decay (Loshchilov and Hutter,
    arXiv 1711.05101).

    Attributes:
      lr: learning rate (> 0).
      weight_decay: weight decay (>= 0): decoupled (adamw) or L2 added to the gradient (adam).
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the root of the second moment (> 0).
      decoupled: decoupled weight decay (AdamW).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = option(0.9, flag="adam_b1")
    b2: float = option(0.999, flag="adam_b2")
    eps: float = option(1e-8, flag="adam_eps")
    decoupled: bool = option(False, flag="adam_decoupled")

    def __post_init__(self):
        check_fields(self)
        _check_rate(self.lr, self.weight_decay)
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps: must be a finite number > 0, got {self.eps!r}")

    def build(self) -> optax.GradientTransformation:
        if self.decoupled:
            return optax.adamw(self.lr, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        return _with_l2(optax.adam(self.lr, b1=self.b1, b2=self.b2, eps=self.eps), self.weight_decay)


@dataclasses.dataclass(frozen=True)
class SGDOptions:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    Attributes:
      lr: learning rate (> 0).
      weight_decay: L2 weight decay added to the gradient (>= 0).
      momentum: heavy-ball momentum in [0, 1); 0 is plain SGD.
      nesterov: Nesterov momentum.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        check_fields(self)
        _check_rate(self.lr, self.weight_decay)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1), got {self.momentum!r}")

    def build(self) -> optax.GradientTransformation:
        momentum = self.momentum or None
        return _with_l2(optax.sgd(self.lr, momentum=momentum, nesterov=self.nesterov), self.weight_decay)


OPTIMIZERS: Catalogue = {
    "adam": Entry(AdamOptions, help="Adam"),
    "adamw": Entry(AdamOptions, fixed={"decoupled": True}, help="AdamW (decoupled weight decay)"),
    "sgd": Entry(SGDOptions, help="SGD (plain unless --momentum is given)"),
    "momentum": Entry(SGDOptions, fixed={"momentum": 0.9}, help="SGD with momentum 0.9"),
}
"""The optimizer catalogue: name -> :class:`jaxalgo.options.Entry`."""

__all__ = ["OPTIMIZERS", "AdamOptions", "SGDOptions"]
