"""Shared config pieces: ``parse_arg`` and the diffusion training defaults."""

from __future__ import annotations

import os

import ml_collections

from glue_jax import sharding

RELEASED_STATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "glue_jax", "assets", "dinov2_vitb14_reg_blocks8-11_norm_stats.npz")


def parse_arg(arg: str | None, **defaults):
  """``'model=XL/2,method=reglue,runlocal'`` -> ConfigDict over ``defaults``.

  A bare word sets a boolean default to True; values are cast to the type of
  the default.  Unknown keys are an error naming them.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, _, val = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
    d = defaults[key]
    if not _:
      if not isinstance(d, bool):
        raise ValueError(f"config argument {key!r} needs a value")
      out[key] = True
    elif isinstance(d, bool):
      out[key] = val.lower() in ("1", "true", "yes")
    else:
      out[key] = type(d)(val)
  return out


def diffusion_defaults() -> ml_collections.ConfigDict:
  """REGLUE's training recipe (spec section d) for the diffusion families."""
  c = ml_collections.ConfigDict()
  c.kind = "diffusion"
  c.seed = 0
  c.method = "reglue"
  c.method_overrides = {}
  c.model = ml_collections.ConfigDict({"arch": "XL/2", "overrides": {}})
  c.loss = ml_collections.ConfigDict({"interpolant": "linear", "time_dist": "uniform",
                                      "semantic_weight_schedule": ()})
  c.optim = ml_collections.ConfigDict({"lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                       "weight_decay": 0.0, "grad_clip": 1.0,
                                       "warmup_steps": 0, "schedule": "constant",
                                       "total_steps": 0})
  c.ema_decay = 0.9999
  c.ema_warmup = False
  c.batch_size = 256
  c.total_steps = 400_000
  c.log_every = 100
  c.ckpt_every = 10_000
  c.keep_checkpoints = 3
  c.keep_every = 0
  c.sample_every = 10_000
  c.sample_steps = 0             # 0: the preset's steps
  c.num_grid_samples = 16
  c.mesh = {"data": -1, "fsdp": 1}
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  c.sampler = {"sampler": "sde", "num_steps": 250, "t_last": 0.04, "cfg_scale": 2.8,
               "global_cfg_scale": None, "interval": (0.0, 0.9)}
  c.first_stage = {"name": "vae", "path": "", "scale": 0.18215, "shift": 0.0}
  c.data = ml_collections.ConfigDict({"name": "feature_store", "path": "",
                                      "num_classes": 1000, "workers": 0})
  # Semantic features: 'precomputed' (read from the data source / feature store)
  # or 'online' (computed inside the train step from the source's images by the
  # frozen encoder below; glue_jax.models.semantic_encoder.from_config).
  c.features = ml_collections.ConfigDict({
      "mode": "precomputed", "encoder": "dinov2", "dinov2": "", "layers": (8, 9, 10, 11),
      "input_size": 224,
      "local": "compressor", "stats": RELEASED_STATS, "compressor": "", "pca": ""})
  c.distributed = None
  c.aot_compile = True           # compile the step at start-up, log its memory analysis
  c.profile_steps = ()           # (start, stop): profiler trace of those steps
  # jax.transfer_guard around the step in the hot loop: 'allow' | 'log' | 'disallow'
  # (tests run with 'disallow': no implicit host<->device transfers per step).
  c.transfer_guard = "allow"
  c.fault_kill_after_checkpoint = -1   # fault injection for tests: SIGKILL after this step
  c.fault_sigterm_at_step = -1         # fault injection for tests: SIGTERM at this step
  c.fault_kill_during_checkpoint = -1  # fault injection for tests: SIGKILL while writing
  c.fault_kill_at_step = -1            # fault injection for tests: SIGKILL after this step
  return c
