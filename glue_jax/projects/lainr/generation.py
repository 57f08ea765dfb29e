"""LA-INR generation: a SiT over the R latent tokens of a trained reconstruction model.

The reconstruction job runs first (or ``generate.inr_workdir`` names a finished
one); the encoder's latent tokens of the train images, normalised per channel,
are the examples of a second job of the one trainer (flow-matching velocity
loss on the linear path, t ~ U[0, 1]; ``models.latent_token_sit``).  Samples
go through the one sampling entry (``sampling.sample_from_keys``) with no
guidance and are decoded by the frozen INR at the training resolution and at
``generate.upsample`` x it.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.data.pipeline import ArraySource
from glue_jax.eval import frechet
from glue_jax.models import lainr as lainr_lib
from glue_jax.models import latent_token_sit as lts
from glue_jax.projects.lainr import image_sources, reconstruction
from glue_jax.sampling import presets, sample_from_keys, samplers
from glue_jax.train import trainer, writers
from glue_jax.transport import interpolants, losses


def pooled_features(images, pool: int = 4) -> np.ndarray:
  """Crude image features for a Frechet distance: grey ``pool`` x ``pool`` means."""
  x = np.asarray(reconstruction.to_unit(images)).mean(-1)
  n, h, w = x.shape
  return x.reshape(n, pool, h // pool, pool, w // pool).mean((2, 4)).reshape(n, -1)


def make_loss(graphdef, token_dim: int):
  """Velocity (flow-matching) loss on normalised latents, linear path, t ~ U."""
  loss_cfg = losses.LossConfig(latent_channels=token_dim, align_weight=0.0)

  def loss(params, rest, batch, key, step):
    del rest, step
    x0 = batch["latents"]
    k_t, k_n, k_y = jax.random.split(key, 3)
    b = x0.shape[0]
    t = interpolants.sample_time(k_t, (b,))
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    net = nnx.merge(graphdef, params)
    apply = lambda x, tt, y, g: net(x, tt, y, g, train=True, key=k_y)
    value, _ = losses.velocity_loss(apply, {"x": x0, "y": jnp.zeros((b,), jnp.int32)}, t,
                                    noise, None, loss_cfg)
    return value, ({}, None)
  return loss


def generator_config(config):
  """The trainer sections of the generator job (``config.generate`` sizes)."""
  gc = config.generate
  c = copy.deepcopy(config)
  with c.unlocked():
    c.train.update(steps=gc.steps, batch_size=gc.batch_size)
    c.optim.lr = gc.lr
  return c


def encode_latents(inr_graphdef, inr_params, images, batch: int = 256) -> np.ndarray:
  encode = jax.jit(lambda p, x: nnx.merge(inr_graphdef, p).encode(
      2 * reconstruction.to_unit(x) - 1))
  return np.concatenate([np.asarray(encode(inr_params, images[i:i + batch]))
                         for i in range(0, len(images), batch)])


def run(config, workdir: str) -> dict:
  """Trains (or reuses) a reconstruction model, then a SiT on its latents."""
  gc = config.generate
  os.makedirs(workdir, exist_ok=True)
  inr_dir = gc.inr_workdir or os.path.join(workdir, "inr")
  if not gc.inr_workdir:
    reconstruction.run(config, inr_dir)
  mcfg, inr_graphdef, inr_params, _ = reconstruction.load_trained(inr_dir)
  train_src, test, _ = image_sources.sources(config)
  train = image_sources.first_images(train_src, config.data.num_train or 4096)
  z = encode_latents(inr_graphdef, inr_params, train)
  mean, std = z.mean((0, 1)), z.std((0, 1)) + 1e-6     # per channel: tokens differ in scale
  zn = ((z - mean) / std).astype(np.float32)
  scfg = lts.LatentTokenSiTConfig(num_tokens=mcfg.num_latents, token_dim=mcfg.dec_width,
                                  hidden_size=gc.hidden_size, depth=gc.depth,
                                  num_heads=gc.num_heads)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lts.LatentTokenSiT(scfg, rngs=nnx.Rngs(0))))
  gen_cfg = generator_config(config)
  job = trainer.Job(
      name="latent-sit", meta={"task": "generate", "model": dataclasses.asdict(scfg),
                               "inr_workdir": inr_dir},
      model=lambda seed: lts.LatentTokenSiT(scfg, rngs=nnx.Rngs(seed)),
      loss=make_loss(graphdef, scfg.token_dim),
      source=ArraySource({"latents": zn}, name="inr-latents"),
      tx=reconstruction.make_optimizer(gen_cfg))
  gen_dir = os.path.join(workdir, "generator")
  last = trainer.train(job, gen_cfg, gen_dir)
  state, _ = trainer.latest_state(gen_dir)
  imgs, imgs_up = sample_images(config, graphdef, state["params"], scfg, inr_graphdef,
                                inr_params, mean, std)
  writers.save_png(os.path.join(workdir, "samples.png"), writers.image_grid(imgs), scale=4)
  writers.save_png(os.path.join(workdir, f"samples_x{gc.upsample}.png"),
                   writers.image_grid(imgs_up), scale=2)
  test_stats = frechet.statistics(pooled_features(test))
  fd = lambda x: frechet.frechet_distance(*frechet.statistics(pooled_features(x)), *test_stats)
  result = {"fd_pooled_samples_vs_test": fd(imgs),
            "fd_pooled_train_vs_test": fd(train[:len(test)]),
            "num_samples": gc.num_samples, "train": last,
            "latent_mean_abs": float(np.abs(mean).mean()), "latent_std_mean": float(std.mean())}
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  return result


def sample_images(config, graphdef, params, scfg, inr_graphdef, inr_params, mean, std):
  """``(images, upsampled images)`` uint8 of ``generate.num_samples`` samples."""
  gc = config.generate
  h = w = config.data.image_size
  n = gc.num_samples
  preset = presets.SamplerPreset(sampler="ode" if gc.sampler == "heun" else "sde",
                                 num_steps=gc.sample_steps, cfg_scale=1.0)

  @jax.jit
  def sample(params, inr_params):
    net = nnx.merge(graphdef, params)
    keys = samplers.per_sample_keys(config.seed + 1, jnp.arange(n))
    x0, _ = sample_from_keys.sample(lambda x, t, y, g: net(x, t, y, g), preset,
                                    jnp.zeros((n,), jnp.int32), keys,
                                    spatial_shape=(scfg.num_tokens, scfg.token_dim),
                                    null_label=scfg.num_classes)
    latents = x0 * std + mean
    dec = nnx.merge(inr_graphdef, inr_params).decoder
    return (lainr_lib.decode_image(dec, latents, h, w, config.eval.chunk),
            lainr_lib.decode_image(dec, latents, h * gc.upsample, w * gc.upsample,
                                   config.eval.chunk))
  return tuple(reconstruction.uint8(a) for a in sample(params, inr_params))
