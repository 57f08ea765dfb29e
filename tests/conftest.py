"""Test-wide JAX settings: CPU only, 8 fake devices, exact float32 matmuls.

These must run before JAX initialises its backend, hence at import time.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
# Tests use tiny networks: compile time dominates, so trade run time for it.
jax.config.update("jax_disable_most_optimizations", True)
