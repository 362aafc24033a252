"""Scale on paper: modelled (not measured) communication time per step of DDP, DASO, AB-training and
forward-gradient data parallelism at 8, 64, 512 and 4096 devices, for ResNet-50- and ViT-B-sized parameter counts.

What is measured. Each strategy's programs are compiled on simulated CPU devices, two nodes of the modelled size
(mesh ``2 x 8`` by default: ``2 x --devices-per-node``), for a small model, and
:func:`jaxalgo.parallel.comm_report` reads every collective from the HLO: its kind, the mesh axes its groups span,
and its bytes per participating device at the dtype the program asked for (``requested_bytes``: DASO's bf16 sends
count 2 bytes per value, as a GPU would send them; XLA:CPU widens them to f32). Programs: the DDP step (backprop,
gradients all-reduced); DASO's steady cycle of ``global_skip`` steps (defaults: ``global_skip = 4``, ``S = 1``)
with its window program from a send to its merge (:func:`jaxalgo.parallel.window_comm_report`) and local steps,
the same cycle from the step programs (the bytes agree), and the same with the Horovod-style sharded global average
(``sharded=True``: each device sends ``1 / 8`` of the parameters across nodes); AB-training's steady cycle of
``steps_between_syncs`` steps (``D`` data-parallel steps after each sync, group steps, one sync; defaults 20 and 1),
every layer cut to ``--ab-rank-fraction`` of its full rank; and forward-gradient DDP (orthogonal-projection forward
gradients, ``k`` tangents, only the ``k`` directional derivatives and the loss all-reduced).

How bytes scale to a parameter count. The small model is an MLP of ``L`` square layers ``128 x 128`` with biases,
compiled at ``L = 2, 3, 4``. Within each program the collectives are grouped by (kind, mesh axes spanned, requested
dtype); each group's bytes are solved exactly as ``bytes(n) = a * n + b`` from ``L = 2`` and ``L = 4`` (``n`` the
parameter count; ``a`` bytes per parameter, ``b`` fixed bytes) and checked against ``L = 3``. Growing the depth
keeps what every layer contributes a fixed fraction of its parameters (its gradient, its parameters, its A or B
factor at a fixed rank fraction), and the rest is a fixed count (losses, the ``k`` directional derivatives), so the
relation is exact (``affine_check`` in the JSON line): DDP gets ``a = 4`` (f32 gradients) and ``b = 4`` (the
loss), forward gradients ``a = 0`` and ``b = 4 (k + 1)``, DASO's send ``a = 2`` (bf16), AB's group step
``a = 4 (r + 1) / (w + 1)`` for rank ``r`` of width ``w`` (each layer's A or B factor and its bias: 0.527 at
``r = 16``, ``w = 128``; the bias share of this small model, ``1 / (w + 1)``, is larger than in the two target
networks). The fitted relation is then evaluated at ``n = 25.6 M`` (ResNet-50) and ``n = 86.6 M`` (ViT-B/16). Not
modelled: real layer shapes (AB-training's A side of an ``m x n`` weight, ``m >= n``, is ``m r``: non-square layers
and 1-D parameters change its fraction), gradient buckets (the number of collectives, which sets the latency term,
is the compiled program's), and the overlap of communication with compute (DASO's window hides its send behind ``S``
steps; the model counts it in full).

Network model (alpha-beta, per collective; ``S`` = bytes per participating device as ``comm_report`` counts them, a
group of ``g = g_l * g_n`` devices, ``g_l`` per node on ``g_n`` nodes; ``B_l, a_l`` intra-node bandwidth per
direction per device and latency, ``B_n, a_n`` the same across nodes, one network port per device as on an
8-GPU node with one NIC per GPU). Ring primitives on ``g`` devices over one link type ``(B, a)``:

- all-reduce ``AR(g, S) = 2 (g - 1) / g * S / B + 2 (g - 1) a``;
- reduce-scatter (input ``S``) ``RS(g, S) = (g - 1) / g * S / B + (g - 1) a``;
- all-gather (input shard ``S``, output ``g S``) ``AG(g, S) = (g - 1) * S / B + (g - 1) a``;
- all-to-all ``(g - 1) / g * S / B + (g - 1) a``; collective-permute ``S / B + a``.

A group inside one node uses ``(B_l, a_l)``; a group of one device per node uses ``(B_n, a_n)`` (the ``g_l``
parallel rings of the node's devices each use their own port). A group spanning both levels, **hierarchical**
(default): all-reduce ``RS_l(g_l, S) + AR_n(g_n, S / g_l) + AG_l(g_l, S / g_l)`` =
``2 (g_l - 1) / g_l * S / B_l + 2 (g_l - 1) a_l + 2 (g_n - 1) / g_n * S / (g_l B_n) + 2 (g_n - 1) a_n``;
reduce-scatter ``RS_l(g_l, S) + RS_n(g_n, S / g_l)``; all-gather ``AG_n(g_n, S) + AG_l(g_l, g_n S)``; all-to-all
and permute at the inter-node figures. With ``--algorithm ring`` such a group is one flat ring at the inter-node
figures: ``AR(g, S) = 2 (g - 1) / g * S / B_n + 2 (g - 1) a_n``. A group of ``c`` collectives pays the bandwidth
term on their summed bytes and the latency term ``c`` times. Time per step is the sum over a strategy's cycle divided
by its length. Ring latency grows with ``g``: at 4096 devices the ``2 (g_n - 1) a_n`` term of a small all-reduce
(forward gradients) is milliseconds, which a tree algorithm (``~2 log2(g) a``) would avoid.

Meshes at ``p`` devices, 8 per node: DDP, DASO and forward gradients ``(p / 8 nodes, 8)``; AB-training
``(p / g, g)`` groups with ``g = 8`` (one group per node, as the reference's groups of one node's GPUs), ``g = 4``
at 8 devices (two groups in one node). At 8 devices DASO's cross-node average spans one node and costs nothing.

Link defaults (peak figures; real collectives reach only part of them):

- intra-node 450 GB/s per direction per GPU: NVLink 4 on H100 SXM, 900 GB/s total bidirectional (NVIDIA H100
  datasheet); latency 1 us per ring step (an assumption of order of magnitude);
- inter-node 50 GB/s per direction per GPU: NDR InfiniBand, 400 Gb/s per port, one ConnectX-7 port per GPU as in a
  DGX H100 (NVIDIA DGX H100 / ConnectX-7 datasheets); latency 5 us per ring step (an assumption: about 1 us of
  switch and adapter latency plus software).

Usage: ``python benchmarks/scaling.py [--intra-gbps 450] [--intra-latency-us 1] [--inter-gbps 50]
[--inter-latency-us 5] [--devices-per-node 8] [--algorithm hierarchical|ring] [--ab-rank-fraction 0.125]
[--tangents 16]``. Runs in a few minutes on 2 cores (about 40 compilations); the last line is one JSON object of
the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
ALGORITHMS = ("hierarchical", "ring")
DEVICE_COUNTS = (8, 64, 512, 4096)
PARAMETER_COUNTS = {"resnet50": 25_600_000, "vit_b": 86_600_000}
WIDTH, DEPTHS, BATCH = 128, (2, 3, 4), 64


# ---------------------------------------------------------------------------------------------------------------
# The network model: plain Python, importable without devices (tests/test_scaling_model.py).


@dataclasses.dataclass(frozen=True)
class Links:
    """The two link levels of the alpha-beta model.

    Attributes:
      intra_bandwidth: bytes per second per direction per device inside a node (default: NVLink 4, 450 GB/s).
      intra_latency: seconds per ring step inside a node (default 1 us).
      inter_bandwidth: bytes per second per direction per device across nodes (default: NDR InfiniBand, 50 GB/s).
      inter_latency: seconds per ring step across nodes (default 5 us).
      devices_per_node: devices per node (default 8).
    """

    intra_bandwidth: float = 450e9
    intra_latency: float = 1e-6
    inter_bandwidth: float = 50e9
    inter_latency: float = 5e-6
    devices_per_node: int = 8

    def __post_init__(self):
        for name in ("intra_bandwidth", "inter_bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite number of bytes per second > 0, got {value!r}")
        for name in ("intra_latency", "inter_latency"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number of seconds >= 0, got {value!r}")
        count = self.devices_per_node
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"devices_per_node: expected an integer >= 1, got {count!r}")


def _ring(kind: str, group: int, nbytes: float, bandwidth: float, latency: float) -> float:
    """One ring primitive of ``kind`` on ``group`` devices over one link type (the formulas of the module doc)."""
    if group <= 1:
        return 0.0
    steps = group - 1
    if kind == "all-reduce":
        return 2 * steps / group * nbytes / bandwidth + 2 * steps * latency
    if kind in ("reduce-scatter", "all-to-all"):
        return steps / group * nbytes / bandwidth + steps * latency
    if kind == "all-gather":
        return steps * nbytes / bandwidth + steps * latency
    if kind == "collective-permute":
        return nbytes / bandwidth + latency
    raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def collective_seconds(
    kind: str,
    nbytes: float,
    *,
    local: int,
    nodes: int,
    links: Links,
    algorithm: str = "hierarchical",
    count: int = 1,
) -> float:
    """Modelled seconds of ``count`` collectives of ``kind`` moving ``nbytes`` in total per participating device.

    Args:
      kind: one of ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``collective-permute``, ``all-to-all``.
      nbytes: bytes per participating device summed over the ``count`` collectives, counted as
        :func:`jaxalgo.parallel.comm_report` counts them (an all-gather's input shard, a reduce-scatter's input).
      local: devices of each group inside one node (``g_l``).
      nodes: nodes each group spans (``g_n``).
      links: the link figures.
      algorithm: ``hierarchical`` or ``ring``, for groups spanning both levels (module docstring).
      count: collectives in the group: the bandwidth term is paid once on ``nbytes``, the latency term ``count``
        times.

    Returns:
      Seconds; 0 for groups of one device.

    Raises:
      ValueError: naming the argument, its value and what is allowed.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    for name, value in (("local", local), ("nodes", nodes), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if local > links.devices_per_node:
        raise ValueError(f"local: {local} devices per node exceed links.devices_per_node = {links.devices_per_node}")
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"nbytes: expected a finite number >= 0, got {nbytes!r}")

    def cost(kind_: str, group: int, size: float, bandwidth: float, latency: float) -> float:
        # the bandwidth term once on the summed bytes, the latency term once per collective
        return _ring(kind_, group, size, bandwidth, 0.0) + count * _ring(kind_, group, 0.0, bandwidth, latency)

    intra = (links.intra_bandwidth, links.intra_latency)
    inter = (links.inter_bandwidth, links.inter_latency)
    if nodes == 1:
        return cost(kind, local, nbytes, *intra)
    if local == 1:
        return cost(kind, nodes, nbytes, *inter)
    if algorithm == "ring" or kind in ("all-to-all", "collective-permute"):
        return cost(kind, local * nodes, nbytes, *inter)
    if kind == "all-reduce":
        return (
            cost("reduce-scatter", local, nbytes, *intra)
            + cost("all-reduce", nodes, nbytes / local, *inter)
            + cost("all-gather", local, nbytes / local, *intra)
        )
    if kind == "reduce-scatter":
        return cost("reduce-scatter", local, nbytes, *intra) + cost("reduce-scatter", nodes, nbytes / local, *inter)
    return cost("all-gather", nodes, nbytes, *inter) + cost("all-gather", local, nodes * nbytes, *intra)


def group_span(mesh_shape: Sequence[int], axes: Sequence[int], devices_per_node: int) -> tuple[int, int]:
    """``(g_l, g_n)``: devices per node and nodes of the group of device 0 along the mesh dimensions ``axes``, on
    a mesh of ``mesh_shape`` laid out row-major over devices numbered node by node (``devices_per_node`` each)."""
    ids = np.arange(int(np.prod(mesh_shape))).reshape(tuple(mesh_shape))
    index = tuple(slice(None) if d in axes else 0 for d in range(len(mesh_shape)))
    members = ids[index].ravel()
    nodes = len(set((members // devices_per_node).tolist()))
    return len(members) // nodes, nodes


def fit_affine(n1: float, bytes1: float, n2: float, bytes2: float) -> tuple[float, float]:
    """``(a, b)`` with ``bytes = a * n + b`` through the two measurements ``(n1, bytes1)``, ``(n2, bytes2)``."""
    if n1 == n2:
        raise ValueError(f"n1, n2: the two parameter counts must differ, got {n1} twice")
    a = (bytes2 - bytes1) / (n2 - n1)
    return a, bytes1 - a * n1


@dataclasses.dataclass(frozen=True)
class CollectiveClass:
    """The collectives of one program with the same kind, spanned mesh dimensions and requested dtype.

    Attributes:
      kind: the collective kind.
      axes: indices of the mesh dimensions spanned (0: the outer, cross-node level).
      dtype: the requested dtype(s), for the record.
      per_param: ``a``, bytes per parameter.
      fixed: ``b``, bytes independent of the parameter count.
      count: number of collectives (each pays the latency term).
    """

    kind: str
    axes: tuple[int, ...]
    dtype: str
    per_param: float
    fixed: float
    count: int

    def nbytes(self, num_params: float) -> float:
        return self.per_param * num_params + self.fixed


def program_seconds(
    classes: Sequence[CollectiveClass],
    num_params: float,
    mesh_shape: Sequence[int],
    links: Links,
    algorithm: str = "hierarchical",
) -> dict[str, float]:
    """Modelled seconds of one run of a program, and its bytes per device, split by link level.

    Returns:
      ``{"seconds", "node_local_bytes", "cross_node_bytes"}``: bytes per device (as ``comm_report`` counts them) of
      the collectives inside one node, and of those spanning several nodes.
    """
    out = {"seconds": 0.0, "node_local_bytes": 0.0, "cross_node_bytes": 0.0}
    for c in classes:
        local, nodes = group_span(mesh_shape, c.axes, links.devices_per_node)
        nbytes = c.nbytes(num_params)
        out["seconds"] += collective_seconds(
            c.kind, nbytes, local=local, nodes=nodes, links=links, algorithm=algorithm, count=c.count
        )
        if local * nodes > 1:
            out["cross_node_bytes" if nodes > 1 else "node_local_bytes"] += nbytes
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measurement: the strategies' compiled programs on a small model (needs 2 * per_node devices).


def _classes_of(report: Any) -> dict[tuple, tuple[int, int]]:
    """``(kind, axis indices, requested dtypes) -> (requested bytes, count)`` of a ``CommReport``."""
    out: dict[tuple, tuple[int, int]] = {}
    for c in report.collectives:
        if c.level == "none":
            continue
        key = (c.kind, tuple(report.mesh_axes.index(a) for a in c.axes), ",".join(c.requested_dtypes))
        total, count = out.get(key, (0, 0))
        out[key] = (total + c.requested_bytes, count + 1)
    return out


def _problem(depth: int):
    import jax

    from jaxalgo import losses, models

    chain = models.mlp((WIDTH,), WIDTH, hidden=(WIDTH,) * (depth - 1), key=jax.random.key(depth))
    fn, params = models.split_chain(chain)
    kx, ky = jax.random.split(jax.random.key(100))
    batch = {"x": jax.random.normal(kx, (BATCH, WIDTH)), "y": jax.random.randint(ky, (BATCH,), 0, WIDTH)}

    def loss_fn(p, b):
        return losses.softmax_cross_entropy(fn.apply(p, b["x"]), b["y"])

    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return fn, params, batch, loss_fn, n


def _steady_daso_cycle(config: Any) -> list[tuple[str, int, int]]:
    """DASO's programs over one steady cycle of ``global_skip`` steps after the warm-up, as ``(program, steps,
    runs)`` entries: a phase or ``"window"`` (``S + 1`` steps in one run), from the library's own schedule
    (``daso_phase``, ``daso_window``)."""
    from jaxalgo import parallel as par

    spe, epochs = 1000, config.warmup_epochs + config.cooldown_epochs + 2
    kwargs = {"steps_per_epoch": spe, "total_epochs": epochs, "global_skip": config.global_skip}
    kwargs |= {"batches_to_wait": config.batches_to_wait, "config": config}
    start = config.warmup_epochs * spe + config.global_skip - 1  # the first send after the warm-up
    cycle, t = [], start
    while t < start + config.global_skip:
        length = par.daso_window(t, **kwargs) if config.program == "window" else 1
        cycle.append(("window", length, 1) if length > 1 else (par.daso_phase(t, **kwargs), 1, 1))
        t += length
    return cycle


def measure(depth: int, *, rank_fraction: float, tangents: int, per_node: int) -> dict[str, Any]:
    """The collective classes of every program of every strategy at one depth on a ``(2, per_node)`` mesh, with the
    cycles that use them."""
    import jax
    import optax

    from jaxalgo import parallel as par
    from jaxalgo.grads import backprop, forward_gradient
    from jaxalgo.runner import TrainState, make_train_step

    fn, params, batch, loss_fn, n = _problem(depth)
    mesh, ab_mesh = par.make_mesh((2, per_node)), par.make_mesh((2, per_node), par.AB_AXES)
    run_key = par.replicate(jax.random.key(1), mesh)
    sharded = par.shard(batch, mesh)
    programs: dict[str, dict[str, Any]] = {}

    def dp_program(estimator, optimizer):
        step = make_train_step(par.data_parallel(estimator, mesh), optimizer)
        state = par.replicate(TrainState.fresh(params, estimator, optimizer), mesh)
        return _classes_of(par.comm_report(step, state, sharded, run_key))

    programs["ddp"] = {"step": dp_program(backprop(loss_fn), optax.sgd(0.1))}
    frog = forward_gradient(loss_fn, num_tangents=tangents, aggregation="orthogonal_projection")
    programs["forward_gradient_ddp"] = {"step": dp_program(frog, optax.sgd(0.1))}

    cycles: dict[str, list[tuple[str, int, int]]] = {"ddp": [("step", 1, 1)], "forward_gradient_ddp": [("step", 1, 1)]}
    variants = {"daso": {}, "daso_step_programs": {"program": "step"}, "daso_sharded": {"sharded": True}}
    for name, options in variants.items():
        config = par.DasoConfig(**options)
        d = par.daso(backprop(loss_fn), optax.sgd(0.1), mesh, config)
        cycles[name] = _steady_daso_cycle(config)
        reports = {}
        for phase, length, _ in cycles[name]:
            state = d.init(params)
            if phase == "window":
                batches = [sharded] * length
                report = par.window_comm_report(d.window(length - 1), state, batches, run_key, mesh=mesh)
            else:
                report = par.comm_report(d.steps[phase], state, sharded, run_key)
            reports[phase] = _classes_of(report)
        programs[name] = reports

    config = par.ABConfig(bucket_ratio=1.0)
    ab = par.ab_training(backprop(loss_fn), optax.sgd(0.1), ab_mesh, fn, params, config, lr=0.1)
    ranks = {x.name: max(1, round(x.full_rank * rank_fraction)) for x in ab.layers}
    state = ab.factorize(ab.init(params), ranks=ranks)
    comm = par.ab_comm(ab, state, par.shard(batch, ab_mesh), par.replicate(jax.random.key(1), ab_mesh))
    programs["ab"] = {program: _classes_of(comm[program]) for program in ("ddp", "group", "sync")}
    period, ddp_steps = config.steps_between_syncs, config.ddp_steps_after_sync
    group_steps = period - ddp_steps
    cycles["ab"] = [("ddp", ddp_steps, ddp_steps), ("group", group_steps, group_steps), ("sync", 0, 1)]
    return {"num_params": n, "programs": programs, "cycles": cycles, "ab_ranks": ranks}


def fit(measured: list[dict[str, Any]]) -> tuple[dict[str, dict[str, list[CollectiveClass]]], dict[str, Any]]:
    """Solves each class's ``bytes = a n + b`` from the first and last depths and checks it on the middle one."""
    first, middle, last = measured
    fitted: dict[str, dict[str, list[CollectiveClass]]] = {}
    check: dict[str, Any] = {"exact": True, "mismatches": []}
    for strategy, programs in last["programs"].items():
        fitted[strategy] = {}
        for program, classes in programs.items():
            low, mid = first["programs"][strategy][program], middle["programs"][strategy][program]
            if set(low) != set(classes) or set(mid) != set(classes):
                raise RuntimeError(
                    f"{strategy}/{program}: the collectives differ between depths ({sorted(low)} vs {sorted(classes)})"
                )
            out = []
            for key, (nbytes, count) in sorted(classes.items()):
                a, b = fit_affine(first["num_params"], low[key][0], last["num_params"], nbytes)
                predicted = a * middle["num_params"] + b
                if abs(predicted - mid[key][0]) > 1e-6 * max(1.0, mid[key][0]):
                    check["exact"] = False
                    check["mismatches"].append([strategy, program, list(key), predicted, mid[key][0]])
                kind, axes, dtype = key
                out.append(CollectiveClass(kind, axes, dtype, a, b, max(count, low[key][1], mid[key][1])))
            fitted[strategy][program] = out
    return fitted, check


def mesh_at(strategy: str, devices: int, per_node: int) -> tuple[int, int]:
    """The 2-D mesh of ``strategy`` at ``devices`` devices (module docstring)."""
    if strategy == "ab":
        group = per_node if devices >= 2 * per_node else devices // 2
        return devices // group, group
    return max(1, devices // per_node), min(devices, per_node)


def model(fitted, cycles, links: Links, algorithm: str) -> dict[str, Any]:
    """Per model size, strategy and device count: modelled ms per step and bytes per step per device."""
    table: dict[str, Any] = {}
    for size_name, n in PARAMETER_COUNTS.items():
        table[size_name] = {}
        for strategy, programs in fitted.items():
            cycle = cycles[strategy]
            steps = sum(length for _, length, _ in cycle)
            row = {}
            for p in DEVICE_COUNTS:
                shape = mesh_at(strategy, p, links.devices_per_node)
                total = {"seconds": 0.0, "node_local_bytes": 0.0, "cross_node_bytes": 0.0}
                for program, _, runs in cycle:
                    figures = program_seconds(programs[program], n, shape, links, algorithm)
                    for key in total:
                        total[key] += runs * figures[key]
                row[str(p)] = {
                    "ms_per_step": 1e3 * total["seconds"] / steps,
                    "node_local_bytes_per_step": total["node_local_bytes"] / steps,
                    "cross_node_bytes_per_step": total["cross_node_bytes"] / steps,
                }
            table[size_name][strategy] = row
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--intra-gbps", type=float, default=450.0, help="GB/s per direction per device (NVLink 4)")
    parser.add_argument("--intra-latency-us", type=float, default=1.0, help="us per ring step inside a node")
    parser.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per direction per device (NDR IB)")
    parser.add_argument("--inter-latency-us", type=float, default=5.0, help="us per ring step across nodes")
    parser.add_argument("--devices-per-node", type=int, default=8, help="also the measured mesh: 2 x this")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="hierarchical")
    parser.add_argument("--ab-rank-fraction", type=float, default=0.125, help="AB factors' rank / full rank")
    parser.add_argument("--tangents", type=int, default=16, help="forward-gradient tangents k")
    args = parser.parse_args(argv)
    if not 0 < args.ab_rank_fraction <= 1:
        parser.error(f"--ab-rank-fraction: expected a number in (0, 1], got {args.ab_rank_fraction}")
    if args.tangents < 1:
        parser.error(f"--tangents: expected an integer >= 1, got {args.tangents}")
    links = Links(
        intra_bandwidth=args.intra_gbps * 1e9,
        intra_latency=args.intra_latency_us * 1e-6,
        inter_bandwidth=args.inter_gbps * 1e9,
        inter_latency=args.inter_latency_us * 1e-6,
        devices_per_node=args.devices_per_node,
    )

    import jax

    # two nodes of the modelled size, so that sizes which depend on the devices per node (DASO's sharded average
    # sends 1 / per_node of the parameters from each device) are measured at that size
    jax.config.update("jax_num_cpu_devices", 2 * links.devices_per_node)
    options = {"rank_fraction": args.ab_rank_fraction, "tangents": args.tangents, "per_node": links.devices_per_node}
    measured = [measure(depth, **options) for depth in DEPTHS]
    fitted, check = fit(measured)
    cycles = measured[-1]["cycles"]
    table = model(fitted, cycles, links, algorithm=args.algorithm)

    print(
        f"Modelled, not measured: communication time per step, {args.algorithm} ring model, "
        f"intra-node {args.intra_gbps:g} GB/s + {args.intra_latency_us:g} us, inter-node {args.inter_gbps:g} GB/s + "
        f"{args.inter_latency_us:g} us, {args.devices_per_node} devices per node."
    )
    print(
        f"Bytes per collective from the compiled HLO of an MLP of {WIDTH}x{WIDTH} layers at depths {DEPTHS} "
        f"(n = {[m['num_params'] for m in measured]}), scaled as bytes = a n + b "
        f"(checked at the middle depth: {'exact' if check['exact'] else 'NOT exact'})."
    )
    for strategy, programs in fitted.items():
        parts = []
        for program, classes in programs.items():
            for c in classes:
                axes = ",".join(map(str, c.axes))
                parts.append(f"{program}: {c.count} {c.kind}[{axes}] {c.dtype} a={c.per_param:g} b={c.fixed:g}")
        print(f"  {strategy}: " + "; ".join(parts))
    same = table["resnet50"]["daso"] == table["resnet50"]["daso_step_programs"]
    print(f"DASO from its step programs instead of the window program: {'identical' if same else 'DIFFERENT'} figures")
    counts = "".join(f"{p:>9d}" for p in DEVICE_COUNTS)
    print(f"\n{'model':9s} {'strategy':21s} {'local MB':>9s} {'cross MB':>9s}{counts}  devices: ms per step")
    for size_name, rows in table.items():
        for strategy, row in rows.items():
            if strategy == "daso_step_programs":
                continue
            at = row[str(DEVICE_COUNTS[-1])]  # bytes per device per step at the largest count (8 per node)
            cells = "".join(f"{row[str(p)]['ms_per_step']:9.3f}" for p in DEVICE_COUNTS)
            local, cross = at["node_local_bytes_per_step"] / 1e6, at["cross_node_bytes_per_step"] / 1e6
            print(f"{size_name:9s} {strategy:21s} {local:9.3f} {cross:9.3f}{cells}")
    print(
        f"(MB: bytes per device per step of the collectives inside a node / spanning nodes, at {DEVICE_COUNTS[-1]} "
        "devices; at 8 devices everything is inside one node)"
    )
    figures = {
        "modelled": True,
        "links": dataclasses.asdict(links),
        "algorithm": args.algorithm,
        "ab_rank_fraction": args.ab_rank_fraction,
        "tangents": args.tangents,
        "parameter_counts": PARAMETER_COUNTS,
        "measured_num_params": [m["num_params"] for m in measured],
        "affine_check": check,
        "cycles": {s: [list(x) for x in c] for s, c in cycles.items()},
        "per_collective": {
            s: {p: [dataclasses.asdict(c) for c in cs] for p, cs in programs.items()} for s, programs in fitted.items()
        },
        "table": table,
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
