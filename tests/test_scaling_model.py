"""The alpha-beta network model of ``benchmarks/scaling.py`` against hand-computed cases.

The benchmarks directory is not a package, so the script is imported from its path; its model is plain Python
(jax is imported only by the measurement functions, which these tests do not call).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
_SPEC = importlib.util.spec_from_file_location("scaling_benchmark", _PATH)
scaling = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = scaling  # dataclasses look their module up there
_SPEC.loader.exec_module(scaling)

# NVLink-class 450 GB/s + 1 us inside a node, InfiniBand-class 50 GB/s + 5 us across nodes, 8 devices per node
LINKS = scaling.Links(intra_bandwidth=450e9, intra_latency=1e-6, inter_bandwidth=50e9, inter_latency=5e-6)


def seconds(kind, nbytes, local, nodes, **kwargs):
    return scaling.collective_seconds(kind, nbytes, local=local, nodes=nodes, links=LINKS, **kwargs)


@pytest.mark.parametrize(
    ("kind", "nbytes", "local", "nodes", "algorithm", "expected"),
    [
        # one node, ring of 8: 2 * 7/8 * 1e8 / 450e9 + 2 * 7 * 1e-6
        ("all-reduce", 1e8, 8, 1, "hierarchical", 3.888888889e-4 + 14e-6),
        # 8 nodes x 8: the above + 2 * 7/8 * (1e8 / 8) / 50e9 + 2 * 7 * 5e-6
        ("all-reduce", 1e8, 8, 8, "hierarchical", 3.888888889e-4 + 14e-6 + 4.375e-4 + 70e-6),
        # the same 64 devices as one flat ring at the inter-node figures: 2 * 63/64 * 1e8 / 50e9 + 2 * 63 * 5e-6
        ("all-reduce", 1e8, 8, 8, "ring", 3.9375e-3 + 630e-6),
        # one device per node (DASO's cross-node send of 1e7 bf16 values): 2 * 7/8 * 2e7 / 50e9 + 14 * 5e-6
        ("all-reduce", 2e7, 1, 8, "hierarchical", 7e-4 + 70e-6),
        # all-gather of a 1 MB shard inside a node: 7 * 1e6 / 450e9 + 7 * 1e-6
        ("all-gather", 1e6, 8, 1, "hierarchical", 1.5555555556e-5 + 7e-6),
        # all-gather 8 x 2: across the 2 nodes first (1 * 1e6 / 50e9 + 5e-6), then the 2 MB inside the node
        ("all-gather", 1e6, 8, 2, "hierarchical", 2e-5 + 5e-6 + 7 * 2e6 / 450e9 + 7e-6),
        # reduce-scatter 8 x 2 of 8 MB: 7/8 * 8e6 / 450e9 + 7e-6 inside, then 1/2 * 1e6 / 50e9 + 5e-6 across
        ("reduce-scatter", 8e6, 8, 2, "hierarchical", 1.5555555556e-5 + 7e-6 + 1e-5 + 5e-6),
        ("collective-permute", 5e7, 1, 2, "hierarchical", 1e-3 + 5e-6),
        ("all-reduce", 1e9, 1, 1, "hierarchical", 0.0),  # a group of one device sends nothing
    ],
)
def test_collective_seconds_match_hand_computed_cases(kind, nbytes, local, nodes, algorithm, expected):
    assert seconds(kind, nbytes, local, nodes, algorithm=algorithm) == pytest.approx(expected, rel=1e-9)


def test_several_collectives_pay_the_latency_term_each():
    """Forward gradients at 4096 devices (8 x 512): with no bytes only the ring steps remain,
    3 x (2 * 7 * 1e-6 + 2 * 511 * 5e-6)."""
    assert seconds("all-reduce", 0.0, 8, 512, count=3) == pytest.approx(3 * (14e-6 + 1022 * 5e-6), rel=1e-12)
    one, three = seconds("all-reduce", 1e8, 8, 8), seconds("all-reduce", 1e8, 8, 8, count=3)
    assert three - one == pytest.approx(2 * (14e-6 + 70e-6), rel=1e-9)


def test_group_span_reads_nodes_from_the_mesh_layout():
    assert scaling.group_span((8, 8), (0, 1), 8) == (8, 8)  # DDP at 64 devices
    assert scaling.group_span((8, 8), (0,), 8) == (1, 8)  # DASO's global average: one device per node
    assert scaling.group_span((8, 8), (1,), 8) == (8, 1)  # node-local
    assert scaling.group_span((2, 4), (0,), 8) == (2, 1)  # AB's two groups of 4 inside one node
    assert scaling.group_span((1, 8), (0,), 8) == (1, 1)  # one node: the cross-node axis has size 1


def test_program_seconds_scales_bytes_affinely_and_splits_them_by_level():
    """DDP's measured class (a = 4 bytes per parameter, b = 4 for the loss) at ResNet-50's 25.6 M parameters on
    64 devices: 102 400 004 bytes, all in a collective spanning nodes."""
    assert scaling.fit_affine(33024, 4 * 33024 + 4, 66048, 4 * 66048 + 4) == pytest.approx((4.0, 4.0))
    ddp = scaling.CollectiveClass("all-reduce", (0, 1), "f32", per_param=4.0, fixed=4.0, count=1)
    local = scaling.CollectiveClass("all-reduce", (1,), "f32", per_param=0.0, fixed=4.0, count=1)
    got = scaling.program_seconds([ddp, local], 25.6e6, (8, 8), LINKS)
    s = 102_400_004
    expected = 2 * 7 / 8 * s / 450e9 + 14e-6 + 2 * 7 / 8 * s / 8 / 50e9 + 70e-6 + (2 * 7 / 8 * 4 / 450e9 + 14e-6)
    assert got["seconds"] == pytest.approx(expected, rel=1e-12)
    assert (got["cross_node_bytes"], got["node_local_bytes"]) == (pytest.approx(s), 4.0)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: seconds("broadcast", 1.0, 8, 1), r"kind: expected one of all-reduce, .*got 'broadcast'"),
        (lambda: seconds("all-reduce", 1.0, 16, 1), r"local: 16 devices per node exceed links.devices_per_node = 8"),
        (lambda: seconds("all-reduce", 1.0, 8, 0), r"nodes: expected an integer >= 1, got 0"),
        (lambda: seconds("all-reduce", -1.0, 8, 1), r"nbytes: expected a finite number >= 0, got -1.0"),
        (lambda: seconds("all-reduce", 1.0, 8, 2, algorithm="tree"), r"algorithm: expected one of hierarchical, ring"),
        (lambda: scaling.Links(inter_bandwidth=0.0), r"inter_bandwidth: expected a finite number of bytes per second"),
        (lambda: scaling.Links(devices_per_node=0), r"devices_per_node: expected an integer >= 1, got 0"),
        (lambda: scaling.fit_affine(5, 1, 5, 2), r"n1, n2: the two parameter counts must differ, got 5 twice"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, error):
    with pytest.raises(ValueError, match=error):
        call()
