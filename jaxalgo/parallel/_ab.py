"""AB-training: independent low-rank groups with periodic synchronisation.

Devices form a ``("group", "dp")`` mesh: ``G`` groups of ``D`` devices (contiguous device ids per group). Every
eligible dense weight ``W`` (``m x n`` matrix view, see :func:`jaxalgo.lowrank.find_layers`) is factorised by SVD as

.. math::
  W = U \\Sigma V^T \\approx A B, \\qquad A = U_{:, :r} \\Sigma_r^{1/2} \\; (m \\times r), \\qquad
  B = \\Sigma_r^{1/2} V_{:, :r}^T \\; (r \\times n),

cut at ``r = #{i : s_i >= cutoff * s_0}``. ``W`` is the same on every device when it is factorised (after the
data-parallel steps), so each process computes the SVD once, on its first device, and the cut is the maximum of
the processes' counts (``process_allgather``): every device installs the same rank. (Eight simultaneous LAPACK
SVDs on the simulated devices of one CPU cost minutes where one costs a fraction of a second.)

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

References:
  Coquelin, Flügel, Weiel et al., "AB-training: a communication-efficient approach for distributed low-rank
  learning", arXiv 2405.01067.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from optax import tree_utils as otu

from jaxalgo.grads import Estimator
from jaxalgo.lowrank._layers import find_layers
from jaxalgo.lowrank._svd import bucket_size, check_cutoff
from jaxalgo.parallel._collectives import mean_over, merge_replicated_state, stack_copies, vary
from jaxalgo.parallel._data_parallel import check_batch, reshard
from jaxalgo.parallel._mesh import make_mesh, place

GROUP_AXIS, DP_AXIS = "group", "dp"
AB_AXES: tuple[str, str] = (GROUP_AXIS, DP_AXIS)
SYNC_MODES: tuple[str, ...] = ("full", "with-stale", "only-learned", "only-b")


@dataclasses.dataclass(frozen=True)
class ABConfig:
    """AB-training's schedule and options.

    Attributes:
      warmup_steps: full-rank data-parallel steps before the first group phase (>= 0).
      steps_between_syncs: the period of the cycle sync / data-parallel steps / re-SVD / group phase (>= 1).
      ddp_steps_after_sync: full-rank data-parallel steps at the start of each cycle (0 <= . <= steps_between_syncs;
        equal means no group phase: every cycle is sync, data-parallel steps, re-SVD).
      sync_mode: one of :data:`SYNC_MODES`.
      cutoff: keep singular values ``s_i >= cutoff * s_0``, in ``(0, 1)``; ``None`` keeps the full rank.
      lr_rebound_steps: steps of the linear learning-rate ramp after each transition (0: no rebound).
      lr_rebound_floor: the learning rate right after a transition (the reference: 1e-5).
      bucket_ratio: ratio of the zero-padded rank buckets (1: exact shapes, a re-compilation per rank change).
      min_aspect: eligibility of a weight for factorisation: ``min(m, n) > min_aspect * max(m, n)``.
    """

    warmup_steps: int = 100
    steps_between_syncs: int = 50
    ddp_steps_after_sync: int = 2
    sync_mode: str = "full"
    cutoff: float | None = 0.15
    lr_rebound_steps: int = 10
    lr_rebound_floor: float = 1e-5
    bucket_ratio: float = 1.25
    min_aspect: float = 0.1

    def __post_init__(self):
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")

        integer("warmup_steps", 0)
        integer("steps_between_syncs", 1)
        integer("ddp_steps_after_sync", 0)
        integer("lr_rebound_steps", 0)
        if self.ddp_steps_after_sync > self.steps_between_syncs:
            raise ValueError(
                f"ddp_steps_after_sync: {self.ddp_steps_after_sync} must be <= steps_between_syncs = "
                f"{self.steps_between_syncs} (the data-parallel steps are part of the cycle)"
            )
        if self.sync_mode not in SYNC_MODES:
            raise ValueError(f"sync_mode: unknown mode {self.sync_mode!r}; allowed: {', '.join(SYNC_MODES)}")
        if self.cutoff is not None:
            check_cutoff(self.cutoff)
        if not (isinstance(self.lr_rebound_floor, int | float) and self.lr_rebound_floor > 0):
            raise ValueError(f"lr_rebound_floor: must be a number > 0, got {self.lr_rebound_floor!r}")
        if not (isinstance(self.bucket_ratio, int | float) and self.bucket_ratio >= 1):
            raise ValueError(f"bucket_ratio: must be a number >= 1 (1 = exact shapes), got {self.bucket_ratio!r}")
        if not (isinstance(self.min_aspect, int | float) and 0 <= self.min_aspect < 1):
            raise ValueError(f"min_aspect: must be a number in [0, 1), got {self.min_aspect!r}")


def ab_mesh(group_size: int, *, devices: Sequence[jax.Device] | None = None, sync_mode: str = "full") -> Mesh:
    """The ``("group", "dp")`` mesh of ``len(devices) / group_size`` groups of ``group_size`` contiguous devices.

    Raises:
      ValueError: ``group_size`` does not divide the device count, or the number of groups is odd (A and B groups
        come in equal halves; only ``sync_mode="only-b"`` accepts any number).
    """
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


def check_ab_mesh(mesh: Mesh, sync_mode: str = "full") -> None:
    """Raises ValueError unless ``mesh`` has the axes ``("group", "dp")`` and (except for ``only-b``) an even
    number of groups."""
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


# ----------------------------------------------------------------------------------------------------------------
# The schedule (host side, a pure function of the step index, so a resumed run does what an uninterrupted one does)


def ab_schedule(step: int, config: ABConfig) -> tuple[tuple[str, ...], str]:
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
    order = ("factorize", "sync") if ddp == period else ("sync", "factorize")
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


# ----------------------------------------------------------------------------------------------------------------
# Factorised layers, seen from the parameter tree


@dataclasses.dataclass(frozen=True)
class ABLayer:
    """A factorised weight: ``params[block][path...]["kernel"]`` viewed as an ``m x n`` matrix ``W`` (inputs x
    outputs), factorised as ``A B`` of its view ``rows x cols``: ``W`` itself, or ``W^T`` when ``transposed``."""

    name: str
    block: int
    path: tuple[Any, ...]
    m: int
    n: int
    in_ndim: int
    transposed: bool = False

    @property
    def full_rank(self) -> int:
        return min(self.m, self.n)

    @property
    def rows(self) -> int:
        return self.n if self.transposed else self.m

    @property
    def cols(self) -> int:
        return self.m if self.transposed else self.n


def find_ab_layers(chain: Any, params: Any, *, min_aspect: float = 0.1, tall: bool = False) -> tuple[ABLayer, ...]:
    """The dense layers of a chain that AB-training factorises (see :func:`jaxalgo.lowrank.find_layers`).

    With ``tall``, a wide weight (``m < n``) is factorised through ``W^T``, so that ``A`` is the tall factor
    (``max(m, n) x r``) and ``B`` the short one (``r x min(m, n)``), as in the reference; ``sync_mode="only-b"``
    uses it, so the one trained factor is the cheaper to send.
    """
    out = []
    for info in find_layers(chain, params, min_aspect=min_aspect):
        shape = _kernel(params, info.block, info.path).shape
        in_ndim = next(k for k in range(1, len(shape)) if math.prod(shape[:k]) == info.m)
        out.append(ABLayer(info.name, info.block, info.path, info.m, info.n, in_ndim, tall and info.m < info.n))
    return tuple(out)


def _kernel(params: Any, block: int, path: tuple[Any, ...]) -> jax.Array:
    node = params[block]
    for key in path:
        node = node[key]
    return node["kernel"]


def _with_kernels(params: Any, layers: Sequence[ABLayer], kernels: dict[str, jax.Array]) -> Any:
    """A copy of ``params`` with the kernels of ``layers`` replaced by ``kernels`` (each layer's ``rows x cols``
    view, see :class:`ABLayer`)."""
    blocks = list(params)

    def rebuild(node, path, value):
        if not path:
            return {**node, "kernel": value.reshape(node["kernel"].shape).astype(node["kernel"].dtype)}
        return {**node, path[0]: rebuild(node[path[0]], path[1:], value)}

    for layer in layers:
        view = kernels[layer.name]
        blocks[layer.block] = rebuild(blocks[layer.block], layer.path, view.T if layer.transposed else view)
    return tuple(blocks)


def _kernel_mask(params: Any, layers: Sequence[ABLayer], value: Any, other: Any) -> Any:
    """A tree like ``params`` holding ``value`` at the factorised kernels and ``other`` elsewhere."""
    wanted = {(layer.block, *layer.path, "kernel") for layer in layers}

    def pick(path, _):
        keys = tuple(getattr(k, "idx", getattr(k, "key", None)) for k in path)
        return value if keys in wanted else other

    return jax.tree_util.tree_map_with_path(pick, params)


def _matrix(params: Any, layer: ABLayer) -> jax.Array:
    """The layer's ``rows x cols`` view of its kernel in ``params``: ``W`` or ``W^T``."""
    w = jnp.reshape(_kernel(params, layer.block, layer.path), (layer.m, layer.n))
    return w.T if layer.transposed else w


class ABTrainState(NamedTuple):
    """The whole AB-training state (a pytree, saved in checkpoints).

    Attributes:
      step: the number of steps taken (replicated).
      train: ``{"params": model parameters (full-rank view), "factors": {layer: {"A": (rows, size),
        "B": (size, cols)}}}`` stacked per group (leading axis ``G``).
      estimator_state: the estimator's state (replicated).
      opt_state: the optimizer state of ``train``, stacked per group.
      ranks: ``{layer: rank}`` of the current factors (replicated int32; columns/rows beyond it are zero).
      loss_sum: each group's sum of step losses (shape ``(G,)``), for logging.
    """

    step: jax.Array
    train: Any
    estimator_state: Any
    opt_state: Any
    ranks: Any
    loss_sum: jax.Array

    @property
    def params(self) -> Any:
        """The trained tree (parameters and factors); what the training loop checks for finite values."""
        return self.train


def _resize(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Slices or zero-pads ``x`` along ``axis`` to ``size``."""
    have = x.shape[axis]
    if have >= size:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - have)
    return jnp.pad(x, pad)


def _masked_update(tx, grads, opt_state, train, mask, factor):
    """``tx`` applied where ``mask`` is true (leaves and their moments); elsewhere both stay as they were."""
    updates, new_opt = tx.update(grads, opt_state, train)
    train = jax.tree.map(lambda p, u, m: jnp.where(m, p + (factor * u).astype(p.dtype), p), train, updates, mask)
    state_mask = otu.tree_map_params(
        tx, lambda _, m: m, new_opt, mask, transform_non_params=lambda v: jax.tree.map(lambda _: True, v)
    )
    new_opt = jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new_opt, opt_state, state_mask)
    return train, new_opt


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
    steps: dict[str, Callable[..., tuple[ABTrainState, jax.Array]]]
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
    """Builds AB-training's programs (see the module docstring for the algorithm).

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
    groups = mesh.shape[GROUP_AXIS]
    only_b = config.sync_mode == "only-b"
    group_spec, repl, data = P(GROUP_AXIS), P(), P(AB_AXES)

    def is_a_group():
        if only_b:
            return jnp.bool_(False)
        return jax.lax.axis_index(GROUP_AXIS) < groups // 2

    def first(tree):
        return jax.tree.map(lambda x: x[0], tree)

    def stack(tree):
        return jax.tree.map(lambda x: vary(x, GROUP_AXIS)[None], tree)

    def composed(train):
        kernels = {f: a_b["A"] @ a_b["B"] for f, a_b in train["factors"].items()}
        return _with_kernels(train["params"], layers, kernels)

    def masks(train, phase, a_group):
        params_mask = _kernel_mask(train["params"], layers, phase == "ddp", True)
        factors_mask = {
            name: {"A": jnp.logical_and(phase == "group", a_group), "B": jnp.logical_and(phase == "group", ~a_group)}
            for name in train["factors"]
        }
        return {"params": params_mask, "factors": factors_mask}

    def body(phase, step, train, estimator_state, opt_state, loss_sum, batch, run_key, factor):
        train, opt_state = first(train), first(opt_state)
        key = jax.random.fold_in(run_key, step)
        a_group = is_a_group()
        if phase == "ddp":
            model = train["params"]
            loss, grads, new_est = estimator.value_and_grad(vary(model, AB_AXES), estimator_state, batch, key=key)
            grads = mean_over(grads, AB_AXES)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss = mean_over(loss, DP_AXIS)
            train_grads = {"params": grads, "factors": jax.tree.map(jnp.zeros_like, train["factors"])}
        else:
            model = composed(train)
            loss, grads, new_est = estimator.value_and_grad(vary(model, AB_AXES), estimator_state, batch, key=key)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss = mean_over(loss, DP_AXIS)
            train_grads = group_reduce(train, grads, a_group)
        new_est = merge_replicated_state(estimator_state, new_est, AB_AXES, "delta_sum")
        mask = masks(train, phase, a_group)
        train, opt_state = _masked_update(optimizer, train_grads, opt_state, train, mask, factor)
        return (
            stack(train),
            new_est,
            stack(opt_state),
            loss_sum + vary(loss, GROUP_AXIS)[None],
            vary(loss, GROUP_AXIS)[None],
        )

    def group_reduce(train, grads, a_group):
        """Chain rule to the factors, then one packed all-reduce inside the group (see the module docstring)."""
        factors = train["factors"]
        grad_a, grad_b = {}, {}
        for layer in layers:
            g_w = _matrix(grads, layer)
            grad_a[layer.name] = g_w @ factors[layer.name]["B"].T
            grad_b[layer.name] = factors[layer.name]["A"].T @ g_w
        shared_mask = jax.tree.leaves(_kernel_mask(grads, layers, False, True))
        leaves, treedef = jax.tree.flatten(grads)
        shared_flat, unravel_shared = ravel_pytree([x for x, m in zip(leaves, shared_mask, strict=True) if m])
        flat_a, unravel_a = ravel_pytree(grad_a)
        flat_b, unravel_b = ravel_pytree(grad_b)
        if only_b:
            head = flat_b
        else:
            length = max(flat_a.size, flat_b.size)
            head = jnp.where(a_group, _resize(flat_a, 0, length), _resize(flat_b, 0, length))
        packed = mean_over(jnp.concatenate([head, shared_flat.astype(head.dtype)]), DP_AXIS)
        head, shared_flat = packed[: head.size], packed[head.size :].astype(shared_flat.dtype)
        shared = iter(unravel_shared(shared_flat))
        params_grads = treedef.unflatten(
            [next(shared) if m else jnp.zeros(x.shape, x.dtype) for x, m in zip(leaves, shared_mask, strict=True)]
        )
        g_b = unravel_b(_resize(head, 0, flat_b.size))
        zeros = lambda x: jnp.zeros(x.shape, x.dtype)
        g_a = jax.tree.map(zeros, grad_a) if only_b else unravel_a(_resize(head, 0, flat_a.size))
        factor_grads = {
            name: {
                "A": jnp.where(a_group, g_a[name], 0.0).astype(factors[name]["A"].dtype),
                "B": jnp.where(a_group, 0.0, g_b[name]).astype(factors[name]["B"].dtype),
            }
            for name in factors
        }
        return {"params": params_grads, "factors": factor_grads}

    def make_step(phase):
        sharded = jax.shard_map(
            lambda *args: body(phase, *args),
            mesh=mesh,
            in_specs=(repl, group_spec, repl, group_spec, group_spec, data, repl, repl),
            out_specs=(group_spec, repl, group_spec, group_spec, group_spec),
        )

        def step(state: ABTrainState, batch, run_key, factor):
            check_batch(batch, mesh, AB_AXES)
            batch = reshard(batch, mesh, data)
            factor = reshard(jnp.asarray(factor, jnp.float32), mesh, repl)
            train, est, opt, loss_sum, loss = sharded(
                state.step, state.train, state.estimator_state, state.opt_state, state.loss_sum, batch, run_key, factor
            )
            return ABTrainState(state.step + 1, train, est, opt, state.ranks, loss_sum), loss

        return jax.jit(step, donate_argnums=0)

    # ---- sync ----------------------------------------------------------------------------------------------
    def merged_kernels(train, a_group):
        factors = train["factors"]
        out = {}
        for name, f in factors.items():
            a, b = f["A"], f["B"]
            if config.sync_mode == "full":
                out[name] = mean_over(a @ b, GROUP_AXIS)
            elif config.sync_mode == "with-stale":
                out[name] = mean_over(a, GROUP_AXIS) @ mean_over(b, GROUP_AXIS)
            elif config.sync_mode == "only-learned":
                n_a, n_b = groups // 2, groups - groups // 2
                a_mean = jax.lax.psum(jnp.where(a_group, a, 0.0), GROUP_AXIS) / n_a
                b_mean = jax.lax.psum(jnp.where(a_group, 0.0, b), GROUP_AXIS) / n_b
                out[name] = a_mean @ b_mean
            else:  # only-b: A is the same everywhere (no group trains it)
                out[name] = a @ mean_over(b, GROUP_AXIS)
        return out

    def sync_body(train, opt_state):
        train, opt_state = first(train), first(opt_state)
        a_group = is_a_group()
        kernels = merged_kernels(train, a_group)
        shared_mask = _kernel_mask(train["params"], layers, False, True)
        params = jax.tree.map(lambda x, m: mean_over(x, GROUP_AXIS) if m else x, train["params"], shared_mask)
        params = _with_kernels(params, layers, kernels)
        # the shared parameters' moments diverged in the group phase: one optimizer state for the DDP steps
        mask = {"params": shared_mask, "factors": jax.tree.map(lambda _: False, train["factors"])}
        opt_state = otu.tree_map_params(optimizer, lambda x, m: mean_over(x, GROUP_AXIS) if m else x, opt_state, mask)
        return stack({"params": params, "factors": train["factors"]}), stack(opt_state)

    sync_sharded = jax.shard_map(
        sync_body, mesh=mesh, in_specs=(group_spec, group_spec), out_specs=(group_spec, group_spec)
    )

    @jax.jit
    def sync_program(train, opt_state):
        return sync_sharded(train, opt_state)

    def sync(state: ABTrainState) -> ABTrainState:
        train, opt_state = sync_program(state.train, state.opt_state)
        return state._replace(train=train, opt_state=opt_state)

    # ---- re-SVD ----------------------------------------------------------------------------------------------
    @jax.jit
    def local_svd(params):
        full_a, full_b, counts = {}, {}, {}
        for layer in layers:
            u, s, vt = jnp.linalg.svd(_matrix(params, layer), full_matrices=False)
            root = jnp.sqrt(s)
            full_a[layer.name] = u * root[None, :]
            full_b[layer.name] = root[:, None] * vt
            if config.cutoff is None:
                counts[layer.name] = jnp.asarray(s.size, jnp.int32)
            else:
                counts[layer.name] = jnp.maximum(jnp.sum(s >= config.cutoff * s[0]).astype(jnp.int32), 1)
        return full_a, full_b, counts

    def svd_program(params):
        """The SVD of one device's copy of the parameters (group slice 0 of this process's first device)."""
        local = jax.tree.map(lambda x: x.addressable_data(0)[0], params)
        full_a, full_b, counts = local_svd(local)
        stacked = lambda tree: place(
            jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (groups, *x.shape)), tree), mesh, group_spec
        )
        return stacked(full_a), stacked(full_b), counts

    def install(state, full_a, full_b, ranks, sizes):
        """Factors cut to ``ranks`` and stored at ``sizes``; their moments sliced or zero-padded to ``sizes``."""
        sizes = dict(sizes)
        factors = {}
        for layer in layers:
            name, size = layer.name, sizes[layer.name]
            keep = jnp.arange(size) < ranks[name]
            a = _resize(full_a[name], 2, size) * keep[None, None, :]
            b = _resize(full_b[name], 1, size) * keep[None, :, None]
            factors[name] = {"A": a.astype(full_a[name].dtype), "B": b.astype(full_b[name].dtype)}
        keep_as_is = lambda x: x
        resizers = {
            "params": jax.tree.map(lambda _: keep_as_is, state.train["params"]),
            "factors": {
                x.name: {
                    "A": functools.partial(_resize, axis=2, size=sizes[x.name]),
                    "B": functools.partial(_resize, axis=1, size=sizes[x.name]),
                }
                for x in layers
            },
        }
        opt_state = otu.tree_map_params(optimizer, lambda x, fn: fn(x), state.opt_state, resizers)
        train = {"params": state.train["params"], "factors": factors}
        return state._replace(train=train, opt_state=opt_state, ranks=ranks)

    install_program = jax.jit(install, static_argnames="sizes")

    def factorize(state: ABTrainState, *, ranks: dict[str, int] | None = None) -> ABTrainState:
        full_a, full_b, counts = svd_program(state.train["params"])
        # every process's proposal: the cut is their maximum, the same for every device
        gathered = multihost_utils.process_allgather(counts)
        agreed = {name: int(np.max(value)) for name, value in gathered.items()}
        if ranks is not None:
            unknown = set(ranks) - {layer.name for layer in layers}
            if unknown:
                raise ValueError(
                    f"ranks: no factorised layer named {sorted(unknown)}; layers: {[x.name for x in layers]}"
                )
            agreed = {**agreed, **{k: int(v) for k, v in ranks.items()}}
        host = agreed
        for layer in layers:
            if not 1 <= host[layer.name] <= layer.full_rank:
                raise ValueError(
                    f"ranks: layer {layer.name} needs 1 <= rank <= {layer.full_rank}, got {host[layer.name]}"
                )
        sizes = tuple(sorted((x.name, bucket_size(host[x.name], x.full_rank, config.bucket_ratio)) for x in layers))
        ranks_arrays = place({k: jnp.asarray(v, jnp.int32) for k, v in host.items()}, mesh, repl)
        return install_program(state, full_a, full_b, ranks_arrays, sizes)

    def resize(state: ABTrainState, sizes: dict[str, int]) -> ABTrainState:
        """The state with factors stored at ``sizes`` (a restore target for checkpoints written at those sizes)."""
        factors = state.train["factors"]
        full_a = {name: f["A"] for name, f in factors.items()}
        full_b = {name: f["B"] for name, f in factors.items()}
        return install_program(state, full_a, full_b, state.ranks, tuple(sorted(sizes.items())))

    def consensus(state: ABTrainState, live_factors: bool) -> Any:
        """The merged model on the host: the sync's result while the factors are live, else the (identical)
        per-group parameters."""
        params = sync_program(state.train, state.opt_state)[0]["params"] if live_factors else state.train["params"]
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], params)

    def init(params) -> ABTrainState:
        params = jax.tree.map(jnp.asarray, params)
        factors = {
            layer.name: {
                "A": jnp.zeros((layer.rows, layer.full_rank), _kernel(params, layer.block, layer.path).dtype),
                "B": jnp.zeros((layer.full_rank, layer.cols), _kernel(params, layer.block, layer.path).dtype),
            }
            for layer in layers
        }
        train = {"params": params, "factors": factors}
        state = ABTrainState(
            step=jnp.zeros((), jnp.int32),
            train=stack_copies(train, groups),
            estimator_state=estimator.init(params),
            opt_state=stack_copies(optimizer.init(train), groups),
            ranks={layer.name: jnp.asarray(layer.full_rank, jnp.int32) for layer in layers},
            loss_sum=jnp.zeros((groups,), jnp.float32),
        )
        return place_ab_state(state, mesh)

    return AB(
        config=config,
        mesh=mesh,
        layers=layers,
        init=init,
        steps={phase: make_step(phase) for phase in ("ddp", "group")},
        sync=sync,
        factorize=factorize,
        consensus=consensus,
        resize=resize,
        sync_program=sync_program,
        svd_program=svd_program,
        lr=lr,
    )


def place_ab_state(state: ABTrainState, mesh: Mesh) -> ABTrainState:
    """Places an AB train state: per-group trees over ``"group"``, the rest replicated."""
    return ABTrainState(
        step=place(state.step, mesh, P()),
        train=place(state.train, mesh, P(GROUP_AXIS)),
        estimator_state=place(state.estimator_state, mesh, P()),
        opt_state=place(state.opt_state, mesh, P(GROUP_AXIS)),
        ranks=place(state.ranks, mesh, P()),
        loss_sum=place(state.loss_sum, mesh, P(GROUP_AXIS)),
    )


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
    reports = {program: ab_program_report(ab, program, state, batch, run_key) for program in ("ddp", "group", "sync")}
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


def ab_program_report(ab: AB, program: str, state: ABTrainState, batch: Any, run_key: jax.Array) -> Any:
    """The :class:`~jaxalgo.parallel.CommReport` of one AB program at the state's factor sizes: ``"ddp"`` or
    ``"group"`` (a step, lowered as the runs call it, so the compilation is shared with them) or ``"sync"``."""
    from jaxalgo.parallel._comm import comm_report

    if program == "sync":
        return comm_report(ab.sync_program, state.train, state.opt_state, mesh=ab.mesh)
    batch = reshard(batch, ab.mesh, P(AB_AXES))
    return comm_report(ab.steps[program], state, batch, run_key, 1.0, mesh=ab.mesh)
