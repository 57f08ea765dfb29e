"""Training sources by name: what the diffusion trainer reads.

A source yields per-example dicts with ``label`` and either
``latent_moments`` (VAE posterior [mean, std]) or ``latents``, plus the
method's features (``semantic``, ``cls``, ``align_target``).

- ``npz``: one ``.npz`` of arrays with a leading example axis (the demo's
  precomputed features; small datasets).
- ``feature_store``: the sharded ArrayRecord feature store (large datasets;
  written by ``glue_jax.data.feature_store``, read by
  ``glue_jax.data.feature_reader``).
"""

from __future__ import annotations

import os

import numpy as np

from glue_jax.data import feature_reader
from glue_jax.data.pipeline import ArraySource

REQUIRED = ("label",)


def build(cfg, split: str = "train"):
  name = cfg.name
  if name == "npz":
    path = cfg.path.format(split=split)
    if not os.path.exists(path):
      raise FileNotFoundError(f"data.path: no features file {path}")
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
    missing = [k for k in REQUIRED if k not in arrays]
    if missing or not ({"latents", "latent_moments"} & set(arrays)):
      raise KeyError(f"{path}: needs 'label' and 'latents' or 'latent_moments'; "
                     f"has {sorted(arrays)}")
    keep = cfg.get("keys")
    if keep:
      arrays = {k: v for k, v in arrays.items() if k in set(keep) | {"label"}}
    return ArraySource(arrays, name=path)
  if name == "feature_store":
    return feature_reader.open_source(cfg, split)
  raise ValueError(f"unknown data source {name!r}; 'npz' or 'feature_store'")


def example_spec(source) -> dict:
  """``{key: (shape, dtype)}`` of one example."""
  ex = source[0]
  return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in ex.items()}
