"""Shared pytest setup: CPU, full-precision float32 matmuls, a persistent compilation cache.

The cache lets tests that build the same programs again (e.g. a resumed run) and later
test sessions skip XLA compilation; it is keyed by the program, so it is never stale. It is
set through the environment too, so the scripts and grids that tests start as subprocesses
(train -> resume -> eval -> sample -> gap; a grid's cold start and arms) compile each shared
program once.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from fake_devices import FAST_COMPILE  # noqa: E402  (flags that compile ~4x faster)

if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
CACHE_DIR = os.path.join(tempfile.gettempdir(), "minirl_jax_test_xla_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
