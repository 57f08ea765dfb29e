"""JAX settings shared by the test process (conftest) and its subprocess workers.

- CPU only, ``num_devices`` fake devices (8 by default);
- exact float32 matmuls;
- ``jax_disable_most_optimizations``: tests use tiny networks, so compile time
  dominates; trade run time for it;
- a persistent compilation cache shared by every test process of a run
  (``$GLUE_JAX_TEST_CACHE``): the same tiny trainer program is compiled by many
  tests and their subprocess workers, and is compiled once.
"""
import os
import tempfile


def configure(num_devices: int = 8, *, exact: bool = True) -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  cache = os.environ.setdefault("GLUE_JAX_TEST_CACHE",
                                os.path.join(tempfile.gettempdir(), "glue_jax_test_xla_cache"))
  import jax
  jax.config.update("jax_num_cpu_devices", num_devices)
  if exact:
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
