"""Shared helpers for trainer tests: a tiny synthetic feature file and config."""
import os

import numpy as np

from glue_jax.configs import common


def write_features(path, n=64, seed=0, latent_hw=8, grid=4, enc_dim=32, classes=5):
  rng = np.random.default_rng(seed)
  arrays = dict(
      latents=rng.normal(size=(n, latent_hw, latent_hw, 4)).astype(np.float32),
      semantic=rng.normal(size=(n, grid, grid, 16)).astype(np.float32),
      cls=rng.normal(size=(n, enc_dim)).astype(np.float32),
      align_target=rng.normal(size=(n, grid * grid, enc_dim)).astype(np.float32),
      label=rng.integers(0, classes, size=n).astype(np.int32))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **arrays)
  return path


def tiny_config(features_path, *, method="reglue", steps=6, batch=8, mesh=None):
  c = common.diffusion_defaults()
  c.method = method
  c.model.arch = "S/2"
  c.model.overrides = {"depth": 2, "hidden_size": 32, "num_heads": 2, "encoder_depth": 1,
                       "projector_dim": 16}
  c.data = common.data_defaults(name="npz", path=features_path, num_classes=5)
  c.first_stage = {"name": "pixel", "factor": 2, "channels": 1, "scale": 1.0, "shift": 0.0}
  c.train.update(batch_size=batch, steps=steps, log_every=2, sample_every=0, ema_decay=0.9,
                 transfer_guard="disallow")   # no implicit host<->device transfer in the hot loop
  c.checkpoint.every = 3
  c.optim.lr = 1e-3
  c.mesh = mesh or {"data": -1, "fsdp": 1}
  return c


def tiny_random_sit():
  """``(SiTConfig, nnx.State)`` of a tiny REGLUE-shaped SiT with random (not
  adaLN-zero) weights, so outputs depend on noise, label and t (checkpoint
  fixtures of the evaluation, API and fault tests)."""
  import jax
  from flax import nnx
  from glue_jax import models
  from glue_jax.models import sit
  cfg = sit.config_for("S/2", depth=1, hidden_size=32, num_heads=2, input_size=4,
                       latent_channels=12, semantic_channels=4, num_classes=5,
                       global_token_dim=8)
  state = nnx.state(models.build("sit", cfg, abstract=True))
  rng = np.random.default_rng(0)
  pure = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return cfg, state
