"""Test configuration: 8 simulated CPU devices; warnings are errors (see pyproject.toml).

JAX's persistent compilation cache is on for the whole run, subprocesses included (they inherit the environment):
many tests compile the same programs (the command line's default run, the same estimator on the same model), and a
program compiled once is then loaded, not compiled again. The cached executable is the one the compiler made, so no
result changes; set ``JAX_COMPILATION_CACHE_DIR`` to use another directory.

XLA's CPU backend compiles at LLVM optimisation level 0 (``--xla_backend_optimization_level=0``, subprocesses
included): the suite's programs are small and compiled once each, so compiling them is most of the suite's time,
and a less optimised executable computes the same operations (XLA's graph passes, which decide fusion, buffers and
collectives, run as before: the memory and communication assertions see the same program). Set the flag yourself
in ``XLA_FLAGS`` to test at another level.

It also emits fusions with XLA CPU's LLVM IR emitters rather than its newer MLIR fusion emitters
(``--xla_cpu_use_fusion_emitters=false``) and generates code as one module, not split for parallel compilation
(``--xla_cpu_parallel_codegen_split_count=1``), each unless ``XLA_FLAGS`` sets it: the same fused computations,
compiled in about half the time (the catalogue's contract and data-parallel tests, one process: 114-122 CPU-s at
level 0 alone, 57-66 with the LLVM IR emitters, 47 with one module as well).
"""

import os
import pathlib

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
_COMPILE_FAST = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
    "--xla_cpu_parallel_codegen_split_count": "1",
}
for flag, value in _COMPILE_FAST.items():
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={value}".strip()

import jax  # noqa: E402 (after the cache's and XLA's environment, which jax reads when it starts)

jax.config.update("jax_num_cpu_devices", 8)
