"""Test configuration: 8 simulated CPU devices; warnings are errors (see pyproject.toml).

JAX's persistent compilation cache is on for the whole run, subprocesses included (they inherit the environment):
many tests compile the same programs (the command line's default run, the same estimator on the same model), and a
program compiled once is then loaded, not compiled again. The cached executable is the one the compiler made, so no
result changes; set ``JAX_COMPILATION_CACHE_DIR`` to use another directory.

XLA's CPU backend compiles with the flags of ``_xla_flags.FAST_COMPILE`` (LLVM optimisation level 0, the LLVM IR
fusion emitters, one codegen module; subprocesses included), each unless ``XLA_FLAGS`` sets it: the suite's programs
are small and compiled once each, so compiling them is most of the suite's time, and the operations computed are
the same. Set a flag yourself in ``XLA_FLAGS`` to test with another value.
"""

import os
import pathlib

from _xla_flags import add_fast_compile_flags

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
add_fast_compile_flags(os.environ)

import jax  # noqa: E402 (after the cache's and XLA's environment, which jax reads when it starts)

jax.config.update("jax_num_cpu_devices", 8)
