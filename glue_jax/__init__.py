"""glue_jax: global-local generative modelling in JAX (REGLUE, GLoD, LA-INR)."""

import os as _os

# TensorFlow (pulled in by TFDS, Grain and clu) prints two oneDNN banners and
# an "All log messages before absl::InitializeLog()" notice at import unless
# these are set before it loads; every entry point imports this package first.
# A user's own setting wins.  (So they come before the imports below.)
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from glue_jax.api import load_model  # noqa: E402  (after the settings above)

__version__ = "0.1.0"

__all__ = ["load_model"]
