"""LA-INR reconstruction: the encoder + locality-aware INR trained with MSE on images.

A job of the one trainer (data-parallel over every device, resumable with
its data position).  Test PSNR is the mean over images of -10 log10(per-image
MSE) on unclipped predictions (IPC's definition); reconstructions, a decode
at ``eval.upsample`` x the resolution and the coarse-to-fine partial sums of
the levels are written as PNG.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models import lainr as lainr_lib
from glue_jax.projects.lainr import image_sources
from glue_jax.train import trainer, writers
from glue_jax.train import step as step_lib


def psnr(pred, target, *, clip: bool = False) -> jax.Array:
  """Per-image PSNR (B,) for values in [0, 1]: -10 log10(mean squared error)."""
  pred = jnp.clip(pred, 0.0, 1.0) if clip else pred
  err = jnp.square(jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32))
  return -10.0 * jnp.log10(err.reshape(err.shape[0], -1).mean(-1))


def to_unit(images) -> jax.Array:
  x = jnp.asarray(images)
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def model_config(config, **fixed) -> lainr_lib.LAINRConfig:
  """LAINRConfig from ``config.model`` plus task-given fields."""
  kw = dict(config.model)
  kw.update(fixed)
  kw["sigmas"] = tuple(float(s) for s in kw["sigmas"])
  known = {f.name for f in dataclasses.fields(lainr_lib.LAINRConfig)}
  if set(kw) - known:
    raise ValueError(f"config.model: unknown keys {sorted(set(kw) - known)}")
  return lainr_lib.LAINRConfig(**kw)


def make_optimizer(config):
  """Adam, constant lr, no weight decay (IPC); optional global-norm clipping."""
  return step_lib.make_optimizer(**dict(config.optim))


def sample_pixels(h: int, w: int, b: int, key, *, fraction: float = 1.0,
                  jitter: bool = False):
  """Coordinates (B, K, 2) and flat pixel indices (B, K) for the loss: all pixels
  or a random ``fraction`` per image; ``jitter`` moves each coordinate
  uniformly within its pixel cell (the target stays the pixel value)."""
  grid = lainr_lib.pixel_grid(h, w)
  n = h * w
  k_sub, k_jit = jax.random.split(key)
  if fraction < 1.0:
    k = max(1, int(round(fraction * n)))
    idx = jax.lax.top_k(jax.random.uniform(k_sub, (b, n)), k)[1]
  else:
    idx = jnp.broadcast_to(jnp.arange(n)[None], (b, n))
  coords = grid[idx]
  if jitter:
    half = jnp.asarray([1.0 / h, 1.0 / w], jnp.float32)
    coords = coords + jax.random.uniform(k_jit, coords.shape, minval=-1.0, maxval=1.0) * half
  return coords, idx


def make_loss(graphdef, *, pixel_fraction: float = 1.0, jitter: bool = False):
  """The trainer's ``loss(params, rest, batch, key, step)``: MSE of the decoded
  pixels; metrics: PSNR (mean over images of -10 log10 MSE)."""
  def loss(params, rest, batch, key, step):
    del rest, step
    model = nnx.merge(graphdef, params)
    x = to_unit(batch["image"])
    b, h, w, c = x.shape
    k_pix, k_drop = jax.random.split(key)
    coords, idx = sample_pixels(h, w, b, k_pix, fraction=pixel_fraction, jitter=jitter)
    target = jnp.take_along_axis(x.reshape(b, h * w, c), idx[..., None], 1)
    pred = model.decode(model.encode(2 * x - 1, key=k_drop), coords)
    per = jnp.mean(jnp.square(pred - target), axis=(1, 2))
    return per.mean(), ({"psnr": jnp.mean(-10.0 * jnp.log10(per))}, None)
  return loss


@functools.lru_cache(maxsize=8)
def make_reconstruct(graphdef, chunk: int = 4096, levels: bool = False):
  """``f(params, images, out_h, out_w) -> (B, out_h, out_w, 3)`` unclipped; with
  ``levels`` also the partial sums of the level outputs (L, B, h, w, 3).

  Cached on (graphdef, chunk, levels): repeated evaluations of one model reuse
  the compiled function."""
  def f(params, images, out_h, out_w):
    model = nnx.merge(graphdef, params)
    z = model.encode(2 * to_unit(images) - 1)
    if not levels:
      return lainr_lib.decode_image(model.decoder, z, out_h, out_w, chunk)
    coords = jnp.broadcast_to(lainr_lib.pixel_grid(out_h, out_w)[None],
                              (z.shape[0], out_h * out_w, 2))
    per_level = lainr_lib.decode_chunked(
        model.decoder, z, coords, chunk,
        fn=lambda dec, prep, c: jnp.stack(dec.query(prep, c)[1], 2))   # (B, n, L, 3)
    partial = jnp.cumsum(per_level, axis=2) + model.cfg.output_bias
    return jnp.moveaxis(partial, 2, 0).reshape(-1, z.shape[0], out_h, out_w, 3)
  return jax.jit(f, static_argnums=(2, 3))


def evaluate_reconstruction(fn, params, images, batch_size: int, clip: bool = False):
  """Per-image PSNR (N,) and the reconstructions (N, H, W, 3) of ``images``."""
  out, scores = [], []
  h, w = images.shape[1:3]
  for i in range(0, len(images), batch_size):
    rec = fn(params, images[i:i + batch_size], h, w)
    scores.append(np.asarray(psnr(rec, to_unit(images[i:i + batch_size]), clip=clip)))
    out.append(np.asarray(rec))
  return np.concatenate(scores), np.concatenate(out)


def build_job(config) -> tuple[trainer.Job, lainr_lib.LAINRConfig, object, np.ndarray]:
  """``(job, model config, graphdef, test images)`` of the reconstruction task."""
  train_src, test, augment = image_sources.sources(config)
  size = config.data.image_size
  mcfg = model_config(config, image_size=size, in_channels=3, coord_dim=2, out_dim=3)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lainr_lib.LAINR(mcfg, rngs=nnx.Rngs(0))))
  job = trainer.Job(
      name="lainr", meta={"task": "reconstruct", "model": dataclasses.asdict(mcfg),
                          "data": dict(config.data)},
      model=lambda seed: lainr_lib.LAINR(mcfg, rngs=nnx.Rngs(seed)),
      loss=make_loss(graphdef, pixel_fraction=config.data.pixel_fraction,
                     jitter=config.data.jitter),
      source=train_src, tx=make_optimizer(config), keys=("image",), augment=augment)
  return job, mcfg, graphdef, test


def load_trained(workdir: str):
  """``(LAINRConfig, graphdef, params, meta)`` of the latest checkpoint in a workdir."""
  state, meta = trainer.latest_state(workdir)
  mcfg = dict(meta["model"])
  mcfg["sigmas"] = tuple(mcfg["sigmas"])
  cfg = lainr_lib.LAINRConfig(**mcfg)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lainr_lib.LAINR(cfg, rngs=nnx.Rngs(0))))
  return cfg, graphdef, state["params"], meta


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  job, mcfg, graphdef, test = build_job(config)
  last = trainer.train(job, config, workdir)
  _, _, params, _ = load_trained(workdir)
  ec = config.eval
  fn = make_reconstruct(graphdef, ec.chunk)
  test = test[:ec.num_images]
  scores, recon = evaluate_reconstruction(fn, params, test, ec.batch_size, ec.clip_psnr)
  write_images(workdir, graphdef, params, test, recon, ec)
  result = {"test_psnr": float(scores.mean()), "test_psnr_std": float(scores.std()),
            "num_test_images": int(len(scores)), "train": last, "variant": mcfg.variant}
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  return result


def uint8(x) -> np.ndarray:
  return np.round(np.clip(np.asarray(x), 0.0, 1.0) * 255).astype(np.uint8)


def write_images(workdir, graphdef, params, test, recon, ec):
  n = min(8, len(test))
  pairs = np.stack([test[:n], uint8(recon[:n])], 1).reshape(2 * n, *test.shape[1:])
  writers.save_png(os.path.join(workdir, "reconstructions.png"),
                   writers.image_grid(pairs, ncols=2 * min(n, 4)), scale=4)
  h, w = test.shape[1:3]
  k = ec.upsample
  up = make_reconstruct(graphdef, ec.chunk)(params, test[:n], h * k, w * k)
  writers.save_png(os.path.join(workdir, f"reconstructions_x{k}.png"),
                   writers.image_grid(uint8(up), ncols=min(n, 4)), scale=2)
  levels = make_reconstruct(graphdef, ec.chunk, levels=True)(params, test[:4], h, w)
  lv = np.concatenate([test[None, :4], uint8(levels)], 0)   # rows: GT, partial sums
  writers.save_png(os.path.join(workdir, "levels.png"),
                   writers.image_grid(lv.swapaxes(0, 1).reshape(-1, h, w, 3),
                                      ncols=lv.shape[0]), scale=4)
