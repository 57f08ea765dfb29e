"""Test-wide JAX settings (tests/jax_setup.py): CPU only, 8 fake devices, exact
float32 matmuls, a compilation cache shared with subprocess workers.

These must run before JAX initialises its backend, hence at import time.
"""
from tests import jax_setup

jax_setup.configure(8)
