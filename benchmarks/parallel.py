"""DDP against DASO on 8 simulated CPU devices (2 nodes x 4): bytes per step by mesh level, and step times; and
forward gradients with only the k directional derivatives all-reduced, against DDP.

For each program (the DDP step, and DASO's four phases, plain and with the sharded global average) the compiled
HLO is read with ``jaxalgo.parallel.comm_report``: cross-node and node-local bytes as compiled (XLA:CPU runs bf16
all-reduces in f32) and as requested (bf16 on the wire). DASO's per-step figures are averaged over one cycle of
``global_skip`` steps (one send, one merge, the rest local). Step times are medians of repeated runs measured in
this one process, reported as ratios to DDP; on simulated devices all "links" are memory copies on the same two
cores, so the times show the computational overhead of each phase, not network savings.

Forward gradients (``--parallel ddp`` with a weight-perturbation estimator): on the MLP 784-1024-1024-1024-10
(2.9M parameters), batch 256, rank-1 FROG with k = 16, the bytes per step of (a) DDP with backprop, (b) DDP with
forward gradients on the ordinary path (the n-sized estimate all-reduced, ``reduce="gradients"``), (c) the
directional path (``reduce="auto"``: k + 1 numbers), the ratio (c) / (a) (target <= 1e-4), and the three step times
measured in this run.

Runs with no arguments in a few minutes; the last line is one JSON object of the figures.
"""

from __future__ import annotations

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _timing import median_seconds  # noqa: E402  (same directory)
from forward_gradients import init_params, loss_fn  # noqa: E402  (the same MLP and loss, same directory)

from jaxalgo import parallel as par  # noqa: E402
from jaxalgo.grads import backprop, rank1_forward_gradient  # noqa: E402

SIZES = (784, 512, 512, 10)
BATCH = 256
GLOBAL_SKIP, WAIT = 4, 1
REPEATS = 30
FG_SIZES = (784, 1024, 1024, 1024, 10)
FG_TANGENTS = 16
FG_REPEATS = 10


def make_ddp_step(estimator, optimizer):
    """A jitted train step ``(state, batch, run_key) -> (state, loss)`` on a data-parallel estimator."""

    def ddp_step(state, batch, run_key):
        step, params, opt_state = state
        loss, grads, _ = estimator.value_and_grad(params, (), batch, key=jax.random.fold_in(run_key, step))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (step + 1, optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(ddp_step, donate_argnums=0)


def forward_gradient_figures(mesh, run_key):
    """Bytes per step and step times: DDP + backprop, DDP + rank-1 FROG (ordinary path), directional path."""
    params = init_params(jax.random.key(3), FG_SIZES)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kx, ky = jax.random.split(jax.random.key(4))
    batch = {"x": jax.random.normal(kx, (BATCH, FG_SIZES[0])), "y": jax.random.randint(ky, (BATCH,), 0, FG_SIZES[-1])}
    batch = par.shard(batch, mesh)
    frog = rank1_forward_gradient(loss_fn, num_tangents=FG_TANGENTS, aggregation="orthogonal_projection")
    variants = {
        "ddp_backprop": (par.data_parallel(backprop(loss_fn), mesh), optax.sgd(0.01, momentum=0.9)),
        "ddp_fg_ordinary": (par.data_parallel(frog, mesh, reduce="gradients"), optax.sgd(1.0)),
        "ddp_fg_directional": (par.data_parallel(frog, mesh), optax.sgd(1.0)),
    }
    mlp = "-".join(map(str, FG_SIZES))
    print(f"\nforward gradients: MLP {mlp} ({n_params} parameters), batch {BATCH}, rank-1 FROG k = {FG_TANGENTS}")
    figures = {"num_params": n_params, "num_tangents": FG_TANGENTS}
    for name, (estimator, optimizer) in variants.items():
        step = make_ddp_step(estimator, optimizer)
        state = par.replicate((jnp.zeros((), jnp.int32), params, optimizer.init(params)), mesh)
        report = par.comm_report(step, state, batch, run_key)
        seconds = median_seconds(step, state, batch, run_key, repeats=FG_REPEATS)
        figures[name] = {
            "cross_node_bytes": report.cross_node_bytes,
            "node_local_bytes": report.node_local_bytes,
            "total_bytes": report.total(),
            "step_ms": 1e3 * seconds,
        }
        print(
            f"{name:18s}: {report.total():9d} B per step ({report.cross_node_bytes} cross-node), "
            f"median {1e3 * seconds:8.2f} ms"
        )
    base = figures["ddp_backprop"]
    for name in ("ddp_fg_ordinary", "ddp_fg_directional"):
        figures[name]["bytes_vs_ddp"] = figures[name]["total_bytes"] / base["total_bytes"]
        figures[name]["time_vs_ddp"] = figures[name]["step_ms"] / base["step_ms"]
    fast, slow = figures["ddp_fg_directional"], figures["ddp_fg_ordinary"]
    figures["directional_time_vs_ordinary"] = fast["step_ms"] / slow["step_ms"]
    figures["directional_bytes_fraction_of_ddp"] = fast["bytes_vs_ddp"]
    figures["target_met"] = fast["bytes_vs_ddp"] <= 1e-4
    print(
        f"directional path: {fast['bytes_vs_ddp']:.2e} x DDP's bytes (target <= 1e-4: "
        f"{'met' if figures['target_met'] else 'NOT met'}), {base['total_bytes'] / fast['total_bytes']:.0f} x fewer; "
        f"step time {fast['time_vs_ddp']:.2f} x DDP+backprop, {figures['directional_time_vs_ordinary']:.2f} x the "
        "ordinary forward-gradient path"
    )
    return figures


def main():
    mesh = par.make_mesh((2, 4))
    params = init_params(jax.random.key(0), SIZES)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    kx, ky = jax.random.split(jax.random.key(1))
    batch = {"x": jax.random.normal(kx, (BATCH, SIZES[0])), "y": jax.random.randint(ky, (BATCH,), 0, SIZES[-1])}
    batch = par.shard(batch, mesh)
    run_key = par.replicate(jax.random.key(2), mesh)
    estimator, optimizer = backprop(loss_fn), optax.sgd(0.01, momentum=0.9)

    ddp_step = make_ddp_step(par.data_parallel(estimator, mesh), optimizer)
    ddp_state = par.replicate((jnp.zeros((), jnp.int32), params, optimizer.init(params)), mesh)
    ddp_report = par.comm_report(ddp_step, ddp_state, batch, run_key)
    ddp_time = median_seconds(ddp_step, ddp_state, batch, run_key, repeats=REPEATS)
    print(f"parameters: {n_params} ({4 * n_params} bytes in f32); mesh 2 nodes x 4 local devices; batch {BATCH}")
    print(
        f"DDP step: cross-node {ddp_report.cross_node_bytes} B, node-local {ddp_report.node_local_bytes} B, "
        f"median {1e3 * ddp_time:.2f} ms"
    )
    print(ddp_report)

    figures = {
        "num_params": n_params,
        "ddp": {
            "cross_node_bytes": ddp_report.cross_node_bytes,
            "node_local_bytes": ddp_report.node_local_bytes,
            "step_ms": 1e3 * ddp_time,
        },
    }
    cycle = [
        par.daso_phase(
            t,
            steps_per_epoch=1000,
            total_epochs=10,
            global_skip=GLOBAL_SKIP,
            batches_to_wait=WAIT,
            config=par.DasoConfig(global_skip=GLOBAL_SKIP, batches_to_wait=WAIT),
        )
        for t in range(4 * 1000 + 4, 4 * 1000 + 4 + GLOBAL_SKIP)
    ]
    for sharded in (False, True):
        name = "daso_sharded" if sharded else "daso"
        config = par.DasoConfig(global_skip=GLOBAL_SKIP, batches_to_wait=WAIT, sharded=sharded)
        d = par.daso(estimator, optimizer, mesh, config)
        phases = {}
        for phase in par.PHASES:
            state = d.init(params)
            report = par.comm_report(d.steps[phase], state, batch, run_key)
            seconds = median_seconds(d.steps[phase], state, batch, run_key, repeats=REPEATS)
            phases[phase] = {
                "cross_node_bytes": report.cross_node_bytes,
                "requested_cross_node_bytes": report.requested_cross_node_bytes,
                "node_local_bytes": report.node_local_bytes,
                "requested_node_local_bytes": report.requested_node_local_bytes,
                "step_ms": 1e3 * seconds,
                "time_vs_ddp": seconds / ddp_time,
            }
            print(
                f"{name} {phase:8s}: cross-node {report.cross_node_bytes:8d} B (requested "
                f"{report.requested_cross_node_bytes:8d} B), node-local {report.node_local_bytes:8d} B, "
                f"median {1e3 * seconds:.2f} ms = {seconds / ddp_time:.2f} x DDP"
            )
        per_step = sum(phases[p]["cross_node_bytes"] for p in cycle) / GLOBAL_SKIP
        requested = sum(phases[p]["requested_cross_node_bytes"] for p in cycle) / GLOBAL_SKIP
        cycle_time = sum(phases[p]["step_ms"] for p in cycle) / GLOBAL_SKIP
        figures[name] = {
            "phases": phases,
            "cycle": cycle,
            "cross_node_bytes_per_step": per_step,
            "requested_cross_node_bytes_per_step": requested,
            "cross_node_ratio_vs_ddp": per_step / ddp_report.cross_node_bytes,
            "requested_cross_node_ratio_vs_ddp": requested / ddp_report.cross_node_bytes,
            "cycle_step_ms": cycle_time,
            "cycle_time_vs_ddp": cycle_time / figures["ddp"]["step_ms"],
        }
        print(
            f"{name}: cycle {cycle}, cross-node bytes per step {per_step:.0f} = "
            f"{per_step / ddp_report.cross_node_bytes:.4f} x DDP as compiled, "
            f"{requested / ddp_report.cross_node_bytes:.4f} x DDP as requested (bf16); "
            f"mean step time {cycle_time / figures['ddp']['step_ms']:.2f} x DDP"
        )
    figures["forward_gradients"] = forward_gradient_figures(mesh, run_key)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
