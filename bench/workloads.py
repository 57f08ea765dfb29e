"""The sampler and feature-precompute workloads of the TPU / GPU benchmarks.

Plain functions of ``(params, inputs)`` with random-init (or abstract)
networks, so they compile for devices that are not present and need nothing
beyond jax/flax (no grain, clu, ml_collections or TFDS):

- :func:`sampler`: REGLUE's Euler-Maruyama SDE with CFG (on [CLS] and all
  channels, interval [0, 0.9]) around the SiT network, from noise to x_0;
- :func:`forward`: one CFG-free forward of the same network (the sampler's
  per-step bound is two of these inside the guidance interval, one outside);
- :func:`precompute`: one batch of the feature store's producer, uint8
  256 px images -> SD-VAE posterior moments, DINOv2-B/14 (4 registers)
  blocks 8-11 standardized and compressed to 16x16x16, [CLS] and the REPA
  targets (bfloat16) (REGLUE, Petsangourakis et al. 2025, section 3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax import models
from glue_jax.models import compressor as compressor_lib
from glue_jax.models import dinov2, pixel_tokenizer, semantic_encoder, vae
from glue_jax.sampling import presets, samplers

REGLUE_CFG = presets.PRESETS["reglue"]


def abstract_params(module_fn) -> dict:
  """Pure-dict ShapeDtypeStructs of ``module_fn()``'s state (nothing allocated)."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(module_fn)))


def sit_graphdef(cfg):
  return nnx.graphdef(models.build("sit", cfg, abstract=True))


def forward(cfg):
  """``f(params, x, t, y, g) -> v`` (eval mode)."""
  graphdef = sit_graphdef(cfg)

  def f(params, x, t, y, g):
    return nnx.merge(graphdef, params)(x, t, y, g)[0]
  return f


def forward_inputs(cfg, batch: int):
  """Abstract ``(x, t, y, g)`` of :func:`forward` for ``batch`` samples."""
  s = jax.ShapeDtypeStruct
  g = s((batch, cfg.global_token_dim), jnp.float32) if cfg.global_token_dim else None
  return (s((batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32),
          s((batch,), jnp.float32), s((batch,), jnp.int32), g)


def sampler(cfg, preset: presets.SamplerPreset = REGLUE_CFG, num_steps: int | None = None):
  """``f(params, labels, seeds) -> x0 latents``: noise from per-sample keys,
  the preset's sampler with CFG, VAE latent channels out."""
  graphdef = sit_graphdef(cfg)
  preset = preset.replace(num_steps=num_steps)

  def f(params, labels, seeds):
    apply = lambda x, t, y, g: nnx.merge(graphdef, params)(x, t, y, g)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seeds)
    x1, g1 = samplers.initial_noise(
        keys, (cfg.input_size, cfg.input_size, cfg.in_channels), cfg.global_token_dim)
    x0, _ = presets.make_sampler(apply, preset, null_label=cfg.num_classes)(
        x1, g1, labels, keys)
    return x0[..., :cfg.latent_channels]
  return f


def sampler_nfe(preset: presets.SamplerPreset, num_steps: int) -> float:
  """Network evaluations of one sample (x2 inside the CFG interval)."""
  grid = np.asarray(samplers.sde_time_grid(num_steps, preset.t_last))[:-1]
  lo, hi = preset.interval
  guided = (preset.cfg_scale != 1.0) & (grid >= lo) & (grid <= hi)
  return float(np.sum(np.where(guided, 2, 1)))


@dataclasses.dataclass(frozen=True)
class PrecomputeShape:
  image_size: int = 256
  dinov2_variant: str = "vitb14_reg"
  layers: tuple = (8, 9, 10, 11)
  dinov2_overrides: tuple = ()        # e.g. (('depth', 2), ('dim', 64), ...) for tiny runs
  vae_channels: tuple = (128, 256, 512, 512)
  vae_groups: int = 32
  compressor_hidden: int = 256
  dtype: str = "float32"


def precompute_module(shape: PrecomputeShape = PrecomputeShape()):
  """``(semantic encoder, VAE)`` modules with random weights."""
  vcfg = dinov2.dinov2_config(shape.dinov2_variant, dtype=shape.dtype,
                              **dict(shape.dinov2_overrides))
  vit = dinov2.Dinov2(vcfg, rngs=nnx.Rngs(0))
  stack = vcfg.dim * len(shape.layers)
  comp = compressor_lib.Compressor(compressor_lib.CompressorConfig(
      (stack, shape.compressor_hidden, 16)), rngs=nnx.Rngs(1))
  stats = (np.zeros(stack, np.float32), np.ones(stack, np.float32))
  spec = semantic_encoder.SemanticSpec(shape.layers, shape.image_size * 7 // 8, "compressor")
  enc = semantic_encoder.SemanticEncoder(vit, spec, stats=stats, compressor=comp)
  ae = vae.AutoencoderKL(vae.VAEConfig(block_out_channels=tuple(shape.vae_channels),
                                       norm_num_groups=shape.vae_groups,
                                       dtype=getattr(jnp, shape.dtype)), rngs=nnx.Rngs(2))
  return enc, ae


def precompute(shape: PrecomputeShape = PrecomputeShape()):
  """``(f(params, images uint8) -> feature dict, abstract params)``."""
  enc, ae = nnx.eval_shape(lambda: precompute_module(shape))
  gd_e, gd_v = nnx.graphdef(enc), nnx.graphdef(ae)
  params = {"enc": nnx.to_pure_dict(nnx.state(enc)), "vae": nnx.to_pure_dict(nnx.state(ae))}

  def f(p, images):
    mean, std = nnx.merge(gd_v, p["vae"]).encode_moments(pixel_tokenizer.to_signed(images))
    out = nnx.merge(gd_e, p["enc"])(images)
    out["align_target"] = out["align_target"].astype(jnp.bfloat16)
    out["latent_moments"] = jnp.concatenate([mean, std], axis=-1)
    return out
  return f, params
