""":func:`ab_training`: AB-training's programs for one estimator, optimizer, model and mesh, gathered in an
:class:`AB`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jaxalgo.grads import Estimator
from jaxalgo.parallel.ab._config import GROUP_AXIS, ABConfig, check_ab_mesh
from jaxalgo.parallel.ab._factorize import (
    factorize_state,
    local_factors,
    make_install_program,
    resize_state,
    svd_program,
)
from jaxalgo.parallel.ab._layers import ABLayer, find_ab_layers
from jaxalgo.parallel.ab._schedule import PHASES, Phase
from jaxalgo.parallel.ab._state import ABTrainState, Layout, init_state
from jaxalgo.parallel.ab._steps import make_step
from jaxalgo.parallel.ab._sync import consensus, make_sync_program, sync


@dataclasses.dataclass(frozen=True)
class AB:
    """AB-training steps for one estimator, optimizer, model and mesh; build it with :func:`ab_training`.

    Attributes:
      init: ``init(params) -> ABTrainState`` placed on the mesh (factors at full rank).
      steps: ``{"ddp": step, "group": step}``, jitted ``step(state, batch, run_key, lr_factor) -> (state,
        loss_per_group)`` (state donated).
      sync: ``sync(state) -> state``, the merge of the groups' models (``sync_mode``).
      factorize: ``factorize(state, *, ranks=None) -> state``: re-SVD with the agreed cut (or the given ranks).
      consensus: ``consensus(state, live_factors) -> params``: the merged model (host arrays) for evaluation.
    """

    config: ABConfig
    mesh: Mesh
    layers: tuple[ABLayer, ...]
    init: Callable[[Any], ABTrainState]
    steps: dict[Phase, Callable[..., tuple[ABTrainState, jax.Array]]]
    sync: Callable[[ABTrainState], ABTrainState]
    factorize: Callable[..., ABTrainState]
    consensus: Callable[[ABTrainState, bool], Any]
    resize: Callable[[ABTrainState, dict[str, int]], ABTrainState]
    sync_program: Callable[..., Any]
    svd_program: Callable[..., Any]
    lr: float = 1e-3

    @property
    def num_groups(self) -> int:
        return self.mesh.shape[GROUP_AXIS]

    def sizes(self, state: ABTrainState) -> dict[str, int]:
        """The stored size (rank bucket) of each layer's factors."""
        return {name: int(f["A"].shape[-1]) for name, f in state.train["factors"].items()}

    def compression(self, state: ABTrainState) -> dict[str, float]:
        """Parameter counts of the dense model and of the low-rank one at the current ranks, and their ratio."""
        params = state.train["params"]
        dense = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params))
        ranks = {k: int(np.asarray(jax.device_get(v))) for k, v in state.ranks.items()}
        factored = sum(layer.m * layer.n for layer in self.layers)
        lowrank = dense - factored + sum((layer.m + layer.n) * ranks[layer.name] for layer in self.layers)
        return {"dense_params": dense, "lowrank_params": lowrank, "compression_ratio": dense / lowrank}


def ab_training(
    estimator: Estimator,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    chain: Any,
    params: Any,
    config: ABConfig | None = None,
    *,
    lr: float = 1e-3,
) -> AB:
    """Builds AB-training's programs (see :mod:`jaxalgo.parallel.ab` for the algorithm).

    Args:
      estimator: any estimator; it sees one device's shard of the batch and the step's key
        ``fold_in(run_key, step)`` (the same on every device) and returns the gradient of the composed model.
      optimizer: any optax optimizer; each group runs its own copy.
      mesh: a ``("group", "dp")`` mesh (:func:`ab_mesh`).
      chain: the model's :class:`jaxalgo.models.ChainFn` (to find the dense layers).
      params: the model's parameters (structure and shapes).
      config: :class:`ABConfig`.
      lr: the optimizer's learning rate (only for the rebound floor ``lr_rebound_floor / lr``).

    Returns:
      An :class:`AB`.
    """
    config = ABConfig() if config is None else config
    check_ab_mesh(mesh, config.sync_mode)
    layers = find_ab_layers(chain, params, min_aspect=config.min_aspect, tall=config.sync_mode == "only-b")
    if not layers:
        raise ValueError("chain: the model has no dense layer eligible for factorisation; AB-training needs one")
    layout = Layout(config, mesh, layers)
    sync_program = make_sync_program(layout, optimizer)
    svd = functools.partial(svd_program, layout, jax.jit(functools.partial(local_factors, layout)))
    install_program = make_install_program(layout, optimizer)
    return AB(
        config=config,
        mesh=mesh,
        layers=layers,
        init=functools.partial(init_state, layout, estimator, optimizer),
        steps={phase: make_step(layout, estimator, optimizer, phase) for phase in PHASES},
        sync=functools.partial(sync, sync_program),
        factorize=functools.partial(factorize_state, layout, svd, install_program),
        consensus=functools.partial(consensus, sync_program),
        resize=functools.partial(resize_state, install_program),
        sync_program=sync_program,
        svd_program=svd,
        lr=lr,
    )
