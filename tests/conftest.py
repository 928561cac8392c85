"""Shared pytest setup: CPU, full-precision float32 matmuls, a persistent compilation cache.

The cache lets tests that build the same programs again (e.g. a resumed run) and later
test sessions skip XLA compilation; it is keyed by the program, so it is never stale.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "minirl_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
