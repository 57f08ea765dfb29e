"""Shared config pieces: ``parse_arg`` and the diffusion training defaults."""

from __future__ import annotations

import os

import ml_collections

from glue_jax.train import trainer_config

RELEASED_STATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "assets", "dinov2_vitb14_reg_blocks8-11_norm_stats.npz")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_arg(arg: str | None, **defaults):
  """``'model=XL/2,method=reglue,runlocal'`` -> ConfigDict over ``defaults``.

  A bare word sets a boolean default to True; values are cast to the type of
  the default (booleans: 1/true/yes/on or 0/false/no/off).  An unknown key or
  a value that does not fit the default's type is a ValueError naming the
  ``key=value`` (with the closest known key for a misspelling).
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, has_value, val = item.partition("=")
    if key not in defaults:
      import difflib
      close = difflib.get_close_matches(key, list(defaults), n=1)
      raise ValueError(f"config argument {key!r} unknown" +
                       (f"; did you mean {close[0]!r}?" if close else "") +
                       f" (known: {', '.join(sorted(defaults))})")
    d = defaults[key]
    if not has_value:
      if not isinstance(d, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=<{type(d).__name__}>)")
      out[key] = True
    else:
      out[key] = _cast_arg(key, val, d)
  return out


def _cast_arg(key: str, val: str, default):
  """``val`` as the type of ``default``; a ValueError naming ``key=val``."""
  if isinstance(default, bool):
    if val.lower() in _TRUE:
      return True
    if val.lower() in _FALSE:
      return False
    raise ValueError(f"config argument {key}={val}: not a boolean "
                     f"(one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)})")
  if default is None or isinstance(default, str):
    return val
  try:
    return type(default)(val)
  except (TypeError, ValueError):
    raise ValueError(f"config argument {key}={val}: not {_article(type(default).__name__)} "
                     f"{type(default).__name__} (default {default!r})") from None


def _article(name: str) -> str:
  return "an" if name[:1] in "aeiou" else "a"


def trainer_sections(c: ml_collections.ConfigDict, **kw) -> ml_collections.ConfigDict:
  """The sections every training job shares (``glue_jax.train.trainer_config``):
  ``seed``, ``mesh``, ``sharding_rules``, ``train``, ``optim``, ``checkpoint``
  and ``debug`` (test-only fault injection)."""
  return trainer_config.sections(c, **kw)


data_defaults = trainer_config.data_defaults


def diffusion_defaults() -> ml_collections.ConfigDict:
  """REGLUE's training recipe (REGLUE paper and its release) for the diffusion families."""
  c = ml_collections.ConfigDict()
  c.kind = "diffusion"
  c.seed = 0
  c.method = "reglue"
  c.method_overrides = {}
  c.model = ml_collections.ConfigDict({"arch": "XL/2", "overrides": {}})
  c.loss = ml_collections.ConfigDict({"interpolant": "linear", "time_dist": "uniform",
                                      "semantic_weight_schedule": ()})
  trainer_sections(c, steps=400_000, batch_size=256, log_every=100, ckpt_every=10_000,
                   keep=3, lr=1e-4, grad_clip=1.0, ema_decay=0.9999)
  # Sample grids of the EMA model while training (0: never).
  c.train.sample_every = 10_000
  c.train.sample_steps = 0       # 0: the preset's steps
  c.train.num_grid_samples = 16
  c.sampler = {"sampler": "sde", "num_steps": 250, "t_last": 0.04, "cfg_scale": 2.8,
               "global_cfg_scale": None, "interval": (0.0, 0.9), "vae_cfg": False}
  c.first_stage = {"name": "vae", "path": "", "scale": 0.18215, "shift": 0.0}
  c.data = data_defaults(name="feature_store", path="", num_classes=1000)
  # Semantic features: 'precomputed' (read from the data source / feature store)
  # or 'online' (computed inside the train step from the source's images by the
  # frozen encoder below; glue_jax.models.semantic_encoder.from_config).
  c.features = ml_collections.ConfigDict({
      "mode": "precomputed", "encoder": "dinov2", "dinov2": "", "layers": (8, 9, 10, 11),
      "input_size": 224,
      "local": "compressor", "stats": RELEASED_STATS, "compressor": "", "pca": ""})
  return c
