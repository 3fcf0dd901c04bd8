"""Suite-wide settings: strict rank promotion and a persistent compilation cache.

Several tests compile the same small programs (a training run and its resumed twin, subprocesses
that rebuild the model); the on-disk cache lets each program compile once per machine.
"""

import os
import tempfile

import jax

_CACHE_DIR = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "engram_jax_test_xla_cache")
)
# Subprocesses started by the tests inherit these through the environment.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
