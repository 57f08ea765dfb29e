"""glue_jax: global-local generative modelling in JAX (REGLUE, GLoD, LA-INR)."""

__version__ = "0.1.0"


def load_model(checkpoint_dir, **kwargs):
  """See :func:`glue_jax.api.load_model`."""
  from glue_jax import api
  return api.load_model(checkpoint_dir, **kwargs)
