"""Test configuration: 8 simulated CPU devices; warnings are errors (see pyproject.toml)."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
