"""Communication accounting: which collectives a compiled step runs, how many bytes, over which mesh level.

:func:`comm_report` compiles a function, reads every collective (all-reduce, all-gather, reduce-scatter,
collective-permute, all-to-all, and their async ``-start`` forms) from the optimised HLO, and classifies each by
the mesh axes its replica groups span: **cross-node** if they span the outermost axis (``"node"``), **node-local**
otherwise. Bytes are operand bytes per participating device (for an all-gather its input shard, for a
reduce-scatter its full input), counted once per occurrence in the program (a collective inside a loop body is
counted once).

XLA may change what was asked for: XLA:CPU runs a bf16 all-reduce in f32, and the all-reduce combiner merges several
reductions into one tuple-shaped collective. So every compiled collective also carries the **requested** dtype(s),
found by matching it against the collectives of the lowered StableHLO (same kind, same replica groups, same
element count), and the report gives both ``bytes`` (compiled) and ``requested_bytes``.

Replica-group ids are logical device ids, i.e. flat positions in ``mesh.devices`` (jit's device assignment for a
mesh), so the classification holds in multi-process runs too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

CollectiveKind = Literal["all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"]
"""The kinds of collective a report counts (the ``kind`` of :meth:`CommReport.total`)."""
KINDS: tuple[CollectiveKind, ...] = typing.get_args(CollectiveKind)
Level = Literal["cross-node", "node-local", "none"]
"""The mesh level of a collective's replica groups (the ``level`` of :meth:`CommReport.total`)."""
LEVELS: tuple[Level, ...] = typing.get_args(Level)


def _check_filters(level: Level | None, kind: CollectiveKind | None) -> None:
    """Raises ValueError naming ``level`` or ``kind`` unless each is None or one of :data:`LEVELS` / :data:`KINDS`."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"level: unknown level {level!r}; allowed: {', '.join(LEVELS)} (or None: all)")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: unknown collective {kind!r}; allowed: {', '.join(KINDS)} (or None: all)")


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_HLO_BYTES.update({"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
_MLIR_TO_HLO = {"bf16": "bf16", "f16": "f16", "f32": "f32", "f64": "f64", "i1": "pred", "i8": "s8", "i16": "s16"}
_MLIR_TO_HLO.update({"i32": "s32", "i64": "s64", "ui8": "u8", "ui32": "u32", "ui64": "u64"})

_HLO_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?P<start>-start)?\("
)
_KIND_OF: dict[str, CollectiveKind] = {kind: kind for kind in KINDS}  # the _HLO_OP match's kind, typed
_HLO_SHAPE = re.compile(r"\b(pred|[subfc]\d+|bf16)\[([\d,]*)\]")
_MLIR_OP = re.compile(r'"?stablehlo\.(all_reduce|all_gather|reduce_scatter|collective_permute|all_to_all)"?\(')
_MLIR_SIG = re.compile(r":\s*\(((?:tensor<[^>]*>(?:,\s*)?)+)\)\s*->")
_MLIR_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program.

    Attributes:
      kind: one of :data:`KINDS`.
      dtypes: compiled element type(s) of the operand(s), e.g. ``("f32",)``.
      requested_dtypes: element type(s) in the lowered program (what the code asked for), e.g. ``("bf16",)``.
      bytes: operand bytes per participating device, as compiled.
      requested_bytes: the same at the requested dtype(s).
      elements: operand elements per participating device.
      group_size: devices per replica group.
      axes: mesh axes spanned by the replica groups.
      level: ``"cross-node"`` (spans the outermost axis), ``"node-local"``, or ``"none"`` (groups of one).
      replica_groups: the device groups (logical ids, flat positions in ``mesh.devices``); for a
        collective-permute, the (source, target) pairs.
      name: the HLO instruction name.
    """

    kind: CollectiveKind
    dtypes: tuple[str, ...]
    requested_dtypes: tuple[str, ...]
    bytes: int
    requested_bytes: int
    elements: int
    group_size: int
    axes: tuple[str, ...]
    level: Level
    replica_groups: tuple[tuple[int, ...], ...]
    name: str


@dataclasses.dataclass(frozen=True)
class CommReport:
    """The collectives of one compiled program; see :func:`comm_report`."""

    collectives: tuple[Collective, ...]
    mesh_axes: tuple[str, ...]

    def total(self, *, level: Level | None = None, kind: CollectiveKind | None = None, requested: bool = False) -> int:
        """Bytes summed over the collectives of ``level`` and ``kind`` (``None``: all), compiled or requested."""
        _check_filters(level, kind)
        return sum(
            c.requested_bytes if requested else c.bytes
            for c in self.collectives
            if (level is None or c.level == level) and (kind is None or c.kind == kind)
        )

    @property
    def cross_node_bytes(self) -> int:
        return self.total(level="cross-node")

    @property
    def node_local_bytes(self) -> int:
        return self.total(level="node-local")

    @property
    def requested_cross_node_bytes(self) -> int:
        return self.total(level="cross-node", requested=True)

    @property
    def requested_node_local_bytes(self) -> int:
        return self.total(level="node-local", requested=True)

    def count(self, *, level: Level | None = None, kind: CollectiveKind | None = None) -> int:
        """The number of collectives of ``level`` and ``kind`` (``None``: all)."""
        _check_filters(level, kind)
        return sum(
            1 for c in self.collectives if (level is None or c.level == level) and (kind is None or c.kind == kind)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: totals per level, and one row per collective."""
        return {
            "cross_node_bytes": self.cross_node_bytes,
            "node_local_bytes": self.node_local_bytes,
            "requested_cross_node_bytes": self.requested_cross_node_bytes,
            "requested_node_local_bytes": self.requested_node_local_bytes,
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
        }

    def __str__(self) -> str:
        header = ("kind", "level", "axes", "group", "dtype", "requested", "bytes", "requested bytes")
        rows = [header] + [
            (
                c.kind,
                c.level,
                ",".join(c.axes) or "-",
                str(c.group_size),
                ",".join(c.dtypes),
                ",".join(c.requested_dtypes) or "?",
                str(c.bytes),
                str(c.requested_bytes),
            )
            for c in self.collectives
        ]
        rows.append(("total", "cross-node", "", "", "", "", str(self.cross_node_bytes), ""))
        rows[-1] = (*rows[-1][:7], str(self.requested_cross_node_bytes))
        rows.append(("total", "node-local", "", "", "", "", str(self.node_local_bytes), ""))
        rows[-1] = (*rows[-1][:7], str(self.requested_node_local_bytes))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def _parse_groups(attrs: str, total_devices: int) -> list[list[int]]:
    """Replica groups from an HLO attribute string: ``{{0,1},{2,3}}``, iota ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)``,
    or ``source_target_pairs={{0,1},...}`` for collective-permute."""
    pairs = re.search(r"source_target_pairs=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if pairs:
        return [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]*)\}", pairs.group(1))]
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if iota:
        shape = [int(v) for v in iota.group(1).split(",")]
        dims = [int(v) for v in iota.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(v) for v in iota.group(3).split(",")])
        return ids.reshape(shape).tolist()
    listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if listed:
        groups = [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
        if groups:
            return groups
    return [list(range(total_devices))]


def _classify(
    groups: list[list[int]], mesh_shape: tuple[int, ...], names: tuple[str, ...], cross: tuple[str, ...]
) -> tuple[tuple[str, ...], Level]:
    spanned: set[str] = set()
    for group in groups:
        if len(group) < 2:
            continue
        coords = np.array(np.unravel_index(np.asarray(group), mesh_shape)).T
        for i, name in enumerate(names):
            if len(set(coords[:, i].tolist())) > 1:
                spanned.add(name)
    axes = tuple(n for n in names if n in spanned)
    level: Level = "none" if not axes else ("cross-node" if any(a in cross for a in axes) else "node-local")
    return axes, level


def _group_key(kind: str, groups: list[list[int]]) -> tuple:
    return (kind, frozenset(frozenset(g) for g in groups))


def _requested_ops(stablehlo: str, total_devices: int) -> dict[tuple, list[tuple[int, str]]]:
    """Collectives of the lowered program: ``(kind, groups) -> [(elements, dtype), ...]`` per operand."""
    found: dict[tuple, list[tuple[int, str]]] = {}
    for match in _MLIR_OP.finditer(stablehlo):
        kind = match.group(1).replace("_", "-")
        tail = stablehlo[match.end() : match.end() + 20000]
        sig = _MLIR_SIG.search(tail)
        if sig is None:
            continue
        head = tail[: sig.start()]
        dense = re.search(r"(?:replica_groups|source_target_pairs)\s*=\s*dense<(\[\[[\d,\s\[\]]*\]\])>", head)
        groups = (
            [[int(v) for v in re.findall(r"\d+", g)] for g in re.findall(r"\[([\d,\s]*)\]", dense.group(1))]
            if dense
            else [list(range(total_devices))]
        )
        for dims, dtype in _MLIR_TENSOR.findall(sig.group(1)):
            elements = int(np.prod([int(d) for d in dims.split("x") if d])) if dims else 1
            found.setdefault(_group_key(kind, groups), []).append((elements, _MLIR_TO_HLO.get(dtype, dtype)))
    return found


def _mesh_of(args: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def comm_report(
    fn: Callable[..., Any] | jax.stages.Lowered,
    *args: Any,
    mesh: Mesh | None = None,
    cross_axes: Sequence[str] | None = None,
    **kwargs: Any,
) -> CommReport:
    """Compiles ``fn(*args, **kwargs)`` and reports its collectives by kind, dtype, bytes and mesh level.

    Args:
      fn: a jitted function (anything with ``.lower``), a plain function (jitted here), or a ``Lowered``.
      *args: example arguments (arrays or ``jax.ShapeDtypeStruct`` values) for lowering.
      mesh: the mesh the program runs on (default: the mesh of the first ``NamedSharding`` among the arguments).
      cross_axes: the mesh axes whose traffic is cross-node (default: the outermost axis).
      **kwargs: keyword arguments for lowering.

    Returns:
      A :class:`CommReport`; ``report.cross_node_bytes``, ``report.node_local_bytes``, ``report.total(...)``,
      ``str(report)`` for a table.

    Example::

      report = comm_report(step, state, batch, key, mesh=mesh)
      print(report.cross_node_bytes, report.requested_cross_node_bytes)
    """
    if isinstance(fn, jax.stages.Lowered):
        lowered = fn
    else:
        if not callable(fn):
            raise TypeError(f"fn: expected a function or a jax.stages.Lowered, got {type(fn).__name__}")
        jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
        lowered = jitted.lower(*args, **kwargs)
    mesh = mesh if mesh is not None else _mesh_of((args, kwargs))
    if mesh is None:
        raise ValueError("mesh: could not find a NamedSharding among the arguments; pass mesh= explicitly")
    names = tuple(mesh.axis_names)
    cross = tuple(cross_axes) if cross_axes is not None else names[:1]
    unknown = [a for a in cross if a not in names]
    if unknown:
        raise ValueError(f"cross_axes: {unknown} are not axes of the mesh {names}")
    shape = tuple(mesh.devices.shape)
    total = int(np.prod(shape))
    requested = _requested_ops(lowered.as_text(), total)
    compiled_text = lowered.compile().as_text()
    if compiled_text is None:
        raise ValueError("fn: its compiled program has no HLO text to read the collectives from")
    out = []
    for line in compiled_text.splitlines():
        match = _HLO_OP.match(line)
        if match is None:
            continue
        kind, is_start = _KIND_OF[match.group("op")], bool(match.group("start"))
        shapes = [
            (t, int(np.prod([int(d) for d in dims.split(",") if d]))) for t, dims in _HLO_SHAPE.findall(match["type"])
        ]
        if is_start and kind in ("all-gather", "collective-permute", "all-to-all"):
            shapes = shapes[: max(1, len(shapes) // 2)] if kind == "all-gather" else shapes[:1]
        groups = _parse_groups(line[match.end() :], total)
        group_size = max(len(g) for g in groups)
        if kind == "all-gather" and not is_start:
            shapes = [(t, n // group_size) for t, n in shapes]
        elif kind == "all-gather" and is_start:
            pass  # the operand half of the async tuple is already the per-device input
        elif kind == "reduce-scatter":
            shapes = [(t, n * group_size) for t, n in shapes]
        axes, level = _classify(groups, shape, names, cross)
        candidates = requested.get(_group_key(kind, groups), [])
        req_dtypes, req_bytes = [], 0
        for dtype, elements in shapes:
            hit = next((i for i, (n, _) in enumerate(candidates) if n == elements), None)
            req = candidates.pop(hit)[1] if hit is not None else dtype
            req_dtypes.append(req)
            req_bytes += elements * _HLO_BYTES.get(req, _HLO_BYTES.get(dtype, 4))
        out.append(
            Collective(
                kind=kind,
                dtypes=tuple(dict.fromkeys(t for t, _ in shapes)),
                requested_dtypes=tuple(dict.fromkeys(req_dtypes)),
                bytes=sum(n * _HLO_BYTES.get(t, 4) for t, n in shapes),
                requested_bytes=req_bytes,
                elements=sum(n for _, n in shapes),
                group_size=group_size,
                axes=axes,
                level=level,
                replica_groups=tuple(tuple(g) for g in groups),
                name=match.group("name"),
            )
        )
    return CommReport(collectives=tuple(out), mesh_axes=names)
