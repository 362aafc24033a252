"""XLA CPU flags for programs that are small and compiled once each, as the test suite's and the documentation
notebooks' are: compiling is most of their time, so these flags trade the executables' speed for compile time.

- ``--xla_backend_optimization_level=0``: LLVM at optimisation level 0. XLA's graph passes, which decide fusion,
  buffers and collectives, run as before, so the compiled-memory and communication assertions see the same program.
- ``--xla_cpu_use_fusion_emitters=false``: fusions emitted by XLA CPU's LLVM IR emitters, not its newer MLIR ones.
- ``--xla_cpu_parallel_codegen_split_count=1``: code generated as one module, not split for parallel compilation.

The operations computed are the same; only the machine code differs. Measured on the catalogue's contract and
data-parallel tests, one process, cold compilation cache: 114-122 CPU-s at level 0 alone, 57-66 with the LLVM IR
emitters, 47 with one module as well.
"""

from __future__ import annotations

from collections.abc import MutableMapping

FAST_COMPILE = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
    "--xla_cpu_parallel_codegen_split_count": "1",
}


def add_fast_compile_flags(environ: MutableMapping[str, str]) -> None:
    """Appends each flag of :data:`FAST_COMPILE` to ``environ["XLA_FLAGS"]`` unless that flag is already set there
    (a developer's own choice wins). Call it before jax starts: jax reads ``XLA_FLAGS`` once."""
    for flag, value in FAST_COMPILE.items():
        if flag not in environ.get("XLA_FLAGS", ""):
            environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {flag}={value}".strip()
