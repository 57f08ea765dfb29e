"""The one sampling entry: per-sample keys -> initial noise -> preset sampler -> latents.

Every place that draws samples from a SiT-family network (the trainer's
sample grids, ``glue_jax.load_model(...).sample``, sharded evaluation, GLoD
and LA-INR generation) goes through :func:`sample` so that sample ``i``
depends only on ``(seed, i)`` and the preset, whatever the batching or the
device topology.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from glue_jax.sampling import presets, samplers


def sample(apply_fn: Callable, preset: presets.SamplerPreset, labels: jax.Array,
           keys: jax.Array, *, spatial_shape: tuple, global_dim: int = 0,
           null_label: int, latent_channels: int | None = None):
  """``(x0, g0)``: final states of the preset's sampler started from the
  noise of ``keys`` (one key per sample, ``samplers.per_sample_keys``).

  ``apply_fn(x, t, y, g) -> (v, v_g, projections)``; t=0 data, t=1 noise.
  ``x0`` is in model space (all channels: latents first, then REGLUE's
  semantic channels); ``g0`` the global token (None without one).
  """
  x1, g1 = samplers.initial_noise(keys, tuple(spatial_shape), global_dim)
  return presets.make_sampler(apply_fn, preset, null_label=null_label,
                              latent_channels=latent_channels)(x1, g1, labels, keys)


def sample_velocity(velocity_fn: Callable, keys: jax.Array, cond, *, spatial_shape: tuple,
                    global_dim: int = 0, sampler: str = "sde", num_steps: int = 50,
                    t_last: float = 0.04):
  """:func:`sample` for a ready velocity field ``velocity_fn(x, t, cond, g)``
  (e.g. GLoD's composed guidance): the keys' noise integrated by the
  Euler-Maruyama SDE ('sde') or Heun ODE ('ode')."""
  x1, g1 = samplers.initial_noise(keys, tuple(spatial_shape), global_dim)
  if sampler == "sde":
    return samplers.euler_maruyama(velocity_fn, x1, g1, cond, keys, num_steps=num_steps,
                                   t_last=t_last)
  if sampler == "ode":
    return samplers.heun(velocity_fn, x1, g1, cond, num_steps=num_steps)
  raise ValueError(f"unknown sampler {sampler!r}; 'sde' or 'ode'")


def sample_network(graphdef, params, net_cfg, preset: presets.SamplerPreset,
                   labels: jax.Array, indices: jax.Array, seed: int):
  """:func:`sample` for a SiT-family network ``(graphdef, params)`` with its
  config: sample ``i`` uses the key of ``(seed, indices[i])``."""
  apply = lambda x, t, y, g: nnx.merge(graphdef, params)(x, t, y, g)
  keys = samplers.per_sample_keys(seed, indices)
  return sample(apply, preset, labels, keys,
                spatial_shape=(net_cfg.input_size, net_cfg.input_size, net_cfg.in_channels),
                global_dim=net_cfg.global_token_dim, null_label=net_cfg.num_classes,
                latent_channels=net_cfg.latent_channels)
