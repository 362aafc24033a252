"""Runs a test program, or the command line, in two ``jax.distributed`` processes (gloo on 127.0.0.1, 4 simulated
devices each).

A program defines ``run(mesh) -> dict of arrays``; each process calls it on a ``(2, 4)`` mesh over all 8 devices
and saves the result. The caller compares both results with ``run`` in the test process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(
    """
    import sys
    import jax
    from jaxalgo import parallel as par
    process_id, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    info = par.initialize_distributed(f"127.0.0.1:{port}", 2, process_id, local_device_count=4, timeout_seconds=60)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4, info
    exec(open(sys.argv[4]).read())
    np.savez(path, **run(par.make_mesh((2, 4))))
    jax.distributed.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_device_count(environ: dict[str, str]) -> dict[str, str]:
    """The environment with XLA_FLAGS's simulated device count removed (a subprocess chooses its own devices);
    the other XLA flags, such as the test run's optimisation level (see conftest.py), are kept."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", environ.get("XLA_FLAGS", "")).split()
    env = {k: v for k, v in environ.items() if k != "XLA_FLAGS"}
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def _environment() -> dict[str, str]:
    return without_device_count({**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})


def run_concurrently(commands: list[list[str]], timeout: float = 150) -> None:
    """Runs the commands at the same time and waits for all; skips the test if this jaxlib has no gloo CPU
    collectives, fails with their error output if any fails."""
    processes = [
        subprocess.Popen(command, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for command in commands
    ]
    errors = []
    try:
        for p in processes:
            _, stderr = p.communicate(timeout=timeout)
            if p.returncode != 0:
                errors.append(stderr.decode()[-3000:])
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    if errors and all("gloo" in e.lower() and "not" in e.lower() and "available" in e.lower() for e in errors):
        pytest.skip("gloo CPU collectives are unavailable in this jaxlib: " + errors[0][-300:])
    assert not errors, "\n---\n".join(errors)


def run_two_processes(tmp_path: Path, program: str) -> list[dict[str, np.ndarray]]:
    """Each process's ``run`` result; skips the test if this jaxlib has no gloo CPU collectives."""
    (tmp_path / "program.py").write_text(program)
    (tmp_path / "worker.py").write_text(WORKER)
    port = free_port()
    outputs = [tmp_path / f"out{i}.npz" for i in range(2)]
    run_concurrently(
        [
            [sys.executable, str(tmp_path / "worker.py"), str(i), str(port), str(out), str(tmp_path / "program.py")]
            for i, out in enumerate(outputs)
        ]
    )
    return [dict(np.load(out)) for out in outputs]


def run_cli_in_two_processes(workdir: Path, *args: str) -> None:
    """``jaxalgo train --quiet --devices 4 ARGS`` as processes 0 and 1 of one run (gloo on 127.0.0.1)."""
    command = [sys.executable, "-m", "jaxalgo", "train", "--quiet", "--devices", "4", *args, "--workdir", str(workdir)]
    command += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    run_concurrently([[*command, "--process-id", str(i)] for i in range(2)], timeout=300)
