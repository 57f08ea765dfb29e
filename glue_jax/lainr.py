"""LA-INR training and evaluation: ``run(config, workdir) -> dict`` (config.kind='lainr').

``config.task`` picks the sub-task (configs/lainr.py):
  'reconstruct'  encoder + INR trained with MSE on images (digits, scikit-image
                 photo crops or a prepared TFDS set); test PSNR = mean over
                 images of -10 log10(per-image MSE) on unclipped predictions
                 (IPC's definition); reconstructions, a decode at
                 ``eval.upsample`` x the resolution and the coarse-to-fine
                 partial sums of the levels are written as PNG;
  'nvs'          few-shot novel view synthesis (``glue_jax.render.nvs``) on the
                 procedural multi-view set or ShapeNet renders;
  'generate'     SiT over the R latent tokens (``latent_token_sit``) trained on
                 the (normalised) latents of a trained reconstruction model,
                 sampled and decoded by the INR at any resolution.
Training resumes from ``<workdir>/checkpoints`` (Orbax; the train state
``{'params', 'opt_state', 'step'}`` and the config JSON); every random number
of step s comes from ``fold_in(key(seed), s)`` and the batch of step s from a
numpy generator seeded with (seed, s), so a resumed run equals an unbroken one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from glue_jax.models import lainr as lainr_lib
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax.train import fit as fit_lib
from glue_jax.train import writers


class ConfigMismatchError(ValueError):
  """The run's model config differs from the checkpoint it would resume from."""


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


def make_optimizer(lr=1e-4, b1=0.9, b2=0.999, grad_clip=0.0) -> optax.GradientTransformation:
  """Adam, constant lr, no weight decay (IPC); optional global-norm clipping."""
  adam = optax.adam(lr, b1=b1, b2=b2)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip else adam


def init_state(params, tx) -> dict:
  """``{'params', 'opt_state', 'step'}`` (built in one jitted call, not op by op)."""
  return jax.jit(lambda p: {"params": p, "opt_state": tx.init(p),
                            "step": jnp.zeros((), jnp.int32)})(params)


# -- reconstruction ----------------------------------------------------------
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


def make_recon_step(graphdef, tx, *, pixel_fraction: float = 1.0, jitter: bool = False):
  """``step(state, images (B,H,W,3) uint8|[0,1], base_key) -> (state, metrics)``."""
  def loss_fn(params, images, key):
    model = nnx.merge(graphdef, params)
    x = to_unit(images)
    b, h, w, c = x.shape
    k_pix, k_drop = jax.random.split(key)
    coords, idx = sample_pixels(h, w, b, k_pix, fraction=pixel_fraction, jitter=jitter)
    target = jnp.take_along_axis(x.reshape(b, h * w, c), idx[..., None], 1)
    pred = model.decode(model.encode(2 * x - 1, key=k_drop), coords)
    per = jnp.mean(jnp.square(pred - target), axis=(1, 2))
    return per.mean(), per
  return fit_lib.mse_step(loss_fn, tx)


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


class ImageData:
  """Train/test images for reconstruction: ``train_batch(step)`` and ``test``."""

  def __init__(self, config):
    dc = config.data
    self.seed, self.batch_size = config.seed, dc.batch_size
    size = dc.image_size
    self._tfds = None
    if dc.name == "digits":
      from glue_jax.data import digits
      self.train = digits.load("train", size)["image"][:dc.num_train or None]
      self.test = digits.load("test", size)["image"][:dc.num_test]
    elif dc.name == "photos":
      from glue_jax.data import photos
      self.train = photos.skimage_crops("train", size, dc.num_train, seed=config.seed)["image"]
      self.test = photos.skimage_crops("test", size, dc.num_test, seed=config.seed)["image"]
    elif dc.name.startswith("tfds:"):
      from glue_jax.data import photos
      name = dc.name[5:]
      self._tfds = photos.TfdsImages(name, dc.train_split, size, data_dir=dc.tfds_dir,
                                     image_key=dc.image_key, augment=dc.augment)
      test = photos.TfdsImages(name, dc.test_split, size, data_dir=dc.tfds_dir,
                               image_key=dc.image_key)
      self.test = test.get(np.arange(min(dc.num_test, len(test))))
      self.train = None
    else:
      raise ValueError(f"config.data.name={dc.name!r}: digits | photos | tfds:<name>")

  def train_batch(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step])
    n = len(self._tfds) if self._tfds is not None else len(self.train)
    idx = rng.choice(n, self.batch_size, replace=n < self.batch_size)
    return self._tfds.get(idx, rng) if self._tfds is not None else self.train[idx]


# -- the resumable training loop --------------------------------------------
def train_loop(workdir: str, config, state: dict, step_fn, batch_fn, total: int,
               meta: dict, *, desc: str = "train") -> tuple[dict, dict]:
  """Runs ``step_fn(state, batch_fn(step), key)`` up to ``total`` steps with
  Orbax checkpoints in ``<workdir>/checkpoints`` (resuming from the latest)."""
  from clu import periodic_actions
  tc = config.train
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep)
  latest = ck.latest_step()
  if latest is not None:
    saved = ck.read_config(latest).get("model", {})
    want = json.loads(json.dumps(meta["model"]))          # tuples -> lists, as stored
    diffs = sorted(k for k in set(want) | set(saved) if saved.get(k) != want.get(k))
    if diffs:
      ck.close()
      raise ConfigMismatchError(f"{ck.directory}/{latest}: model config differs from the "
                                f"checkpoint in {diffs}")
    state = ck.restore(latest, state=ckpt_lib.abstract_like(state))["state"]
    logging.info("resumed from %s/%d", ck.directory, latest)
  else:
    # A copy (the step donates its state: never delete the caller's arrays),
    # committed to the device like restored arrays (one compilation for both).
    dev = jax.devices()[0]
    state = jax.tree.map(lambda x: jax.device_put(x, dev, may_alias=False), state)
  if not hasattr(step_fn, "lower"):   # pass a jitted step to share its compilation
    step_fn = jax.jit(step_fn, donate_argnums=(0,))
  base_key = jax.random.key(config.seed)
  writer = writers.create_writer(workdir)
  start = int(state["step"])
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=tc.log_every)
  last, window = {}, []
  try:
    for step in tqdm(range(start, total), desc=desc, initial=start, total=total,
                     mininterval=5.0):
      state, metrics = step_fn(state, batch_fn(step), base_key)
      window.append(metrics)
      report(step + 1)
      if (step + 1) % tc.log_every == 0 or step + 1 == total:
        host = jax.device_get(window)
        last = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        window = []
        if not np.isfinite(last["loss"]):
          raise FloatingPointError(f"{desc}: non-finite loss by step {step + 1}")
        writer.write_scalars(step + 1, last)
      if (step + 1) % tc.ckpt_every == 0 or step + 1 == total:
        ck.save(step + 1, state=state, config=meta)
  finally:
    ck.close()
    writer.flush()
  last["step"] = int(state["step"])
  return state, last


def load_trained(workdir: str):
  """``(LAINRConfig, graphdef, params, meta)`` of the latest checkpoint in a workdir."""
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    step = ck.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"no finished LA-INR checkpoint in {ck.directory}")
    meta = ck.read_config(step)
    mcfg = dict(meta["model"])
    mcfg["sigmas"] = tuple(mcfg["sigmas"])
    cfg = lainr_lib.LAINRConfig(**mcfg)
    state = ck.restore(step, state=ck.abstract_item(step, "state"))["state"]
  finally:
    ck.close()
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lainr_lib.LAINR(cfg, rngs=nnx.Rngs(0))))
  return cfg, graphdef, state["params"], meta


def reconstruct(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  data = ImageData(config)
  size = config.data.image_size
  mcfg = model_config(config, image_size=size, in_channels=3, coord_dim=2, out_dim=3)
  graphdef, params = lainr_lib.init(mcfg, config.seed)
  tx = make_optimizer(**dict(config.optim))
  step = make_recon_step(graphdef, tx, pixel_fraction=config.data.pixel_fraction,
                         jitter=config.data.jitter)
  meta = {"task": "reconstruct", "model": dataclasses.asdict(mcfg),
          "data": dict(config.data)}
  state, last = train_loop(workdir, config, init_state(params, tx), step,
                           data.train_batch, config.train.steps, meta, desc="lainr")
  ec = config.eval
  fn = make_reconstruct(graphdef, ec.chunk)
  test = data.test[:ec.num_images]
  scores, recon = evaluate_reconstruction(fn, state["params"], test, ec.batch_size,
                                          ec.clip_psnr)
  _write_recon_images(workdir, graphdef, state["params"], test, recon, ec)
  result = {"test_psnr": float(scores.mean()), "test_psnr_std": float(scores.std()),
            "num_test_images": int(len(scores)), "train": last, "variant": mcfg.variant}
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  return result


def _uint8(x) -> np.ndarray:
  return np.round(np.clip(np.asarray(x), 0.0, 1.0) * 255).astype(np.uint8)


def _write_recon_images(workdir, graphdef, params, test, recon, ec):
  n = min(8, len(test))
  pairs = np.stack([test[:n], _uint8(recon[:n])], 1).reshape(2 * n, *test.shape[1:])
  writers.save_png(os.path.join(workdir, "reconstructions.png"),
                   writers.image_grid(pairs, ncols=2 * min(n, 4)), scale=4)
  h, w = test.shape[1:3]
  k = ec.upsample
  up = make_reconstruct(graphdef, ec.chunk)(params, test[:n], h * k, w * k)
  writers.save_png(os.path.join(workdir, f"reconstructions_x{k}.png"),
                   writers.image_grid(_uint8(up), ncols=min(n, 4)), scale=2)
  levels = make_reconstruct(graphdef, ec.chunk, levels=True)(params, test[:4], h, w)
  lv = np.concatenate([test[None, :4], _uint8(levels)], 0)   # rows: GT, partial sums
  writers.save_png(os.path.join(workdir, "levels.png"),
                   writers.image_grid(lv.swapaxes(0, 1).reshape(-1, h, w, 3),
                                      ncols=lv.shape[0]), scale=4)


# -- novel view synthesis ----------------------------------------------------
def nvs_data(config, split: str) -> dict:
  nc = config.nvs
  from glue_jax.data import multiview
  if nc.dataset == "procedural":
    n = nc.num_objects if split == "train" else nc.num_test_objects
    return multiview.procedural(n, nc.num_views, nc.image_size,
                                seed=config.seed * 2 + (split != "train"))
  if nc.dataset == "shapenet":
    return multiview.load_shapenet(nc.root, nc.category, split, image_size=nc.image_size,
                                   near=nc.near, far=nc.far)
  raise ValueError(f"config.nvs.dataset={nc.dataset!r}: procedural | shapenet")


def nvs_setup(config):
  from glue_jax.render import nvs as nvs_lib
  nc = config.nvs
  rcfg = nvs_lib.RenderConfig(near=nc.near, far=nc.far, num_samples=nc.num_samples,
                              white_background=nc.white_background,
                              density_activation=nc.density_activation,
                              scene_scale=nc.scene_scale, view_dirs=nc.view_dirs,
                              last_bin=nc.last_bin)
  mcfg = model_config(config, image_size=nc.image_size, in_channels=9,
                      coord_dim=rcfg.coord_dim, out_dim=4, output_bias=0.0,
                      patch_size=nc.patch_size, patch_padding=0,
                      sigmas=tuple(nc.sigmas), sigma_q=nc.sigma_q)
  return mcfg, rcfg


def nvs(config, workdir: str) -> dict:
  from glue_jax.render import nvs as nvs_lib
  os.makedirs(workdir, exist_ok=True)
  nc = config.nvs
  train, test = nvs_data(config, "train"), nvs_data(config, "test")
  mcfg, rcfg = nvs_setup(config)
  graphdef, params = lainr_lib.init(mcfg, config.seed)
  tx = make_optimizer(**dict(config.optim))
  step = nvs_lib.make_step(graphdef, tx, rcfg, nc.rays_per_instance)
  batch_fn = lambda s: nvs_lib.nvs_batch(train, s, config.seed, nc.batch_size,
                                         nc.support_views, nc.query_views)
  meta = {"task": "nvs", "model": dataclasses.asdict(mcfg), "render": dataclasses.asdict(rcfg)}
  state, last = train_loop(workdir, config, init_state(params, tx), step, batch_fn,
                           config.train.steps, meta, desc="lainr-nvs")
  render_fn = jax.jit(nvs_lib.make_render_views(graphdef, rcfg, nc.chunk))
  scores, renders = nvs_lib.evaluate(render_fn, state["params"], test, nc.support_views)
  k = min(4, len(test["images"]))
  rows = [test["images"][:k, :nc.support_views], test["images"][:k, nc.support_views:],
          _uint8(renders[:k])]
  grid = np.concatenate(rows, 1)                       # per object: support | GT | render
  writers.save_png(os.path.join(workdir, "novel_views.png"),
                   writers.image_grid(grid.reshape(-1, *grid.shape[2:]), ncols=grid.shape[1]),
                   scale=3)
  result = {"test_psnr": float(scores.mean()), "test_psnr_std": float(scores.std()),
            "num_test_views": int(len(scores)), "train": last, "variant": mcfg.variant}
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  return result


# -- generation in latent-token space ----------------------------------------
def pooled_features(images, pool: int = 4) -> np.ndarray:
  """Crude image features for a Frechet distance: grey ``pool`` x ``pool`` means."""
  x = np.asarray(to_unit(images)).mean(-1)
  n, h, w = x.shape
  return x.reshape(n, pool, h // pool, pool, w // pool).mean((2, 4)).reshape(n, -1)


def make_generator_step(graphdef, tx, token_dim: int):
  """Velocity (flow-matching) loss on normalised latents, linear path, t ~ U."""
  from glue_jax.transport import interpolants, losses
  loss_cfg = losses.LossConfig(latent_channels=token_dim, align_weight=0.0)

  def step(state, x0, base_key):
    key = jax.random.fold_in(base_key, state["step"])
    k_t, k_n, k_y = jax.random.split(key, 3)
    b = x0.shape[0]
    t = interpolants.sample_time(k_t, (b,))
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)

    def lf(params):
      net = nnx.merge(graphdef, params)
      apply = lambda x, tt, y, g: net(x, tt, y, g, train=True, key=k_y)
      return losses.velocity_loss(apply, {"x": x0, "y": jnp.zeros((b,), jnp.int32)}, t,
                                  noise, None, loss_cfg)
    (loss, _), grads = jax.value_and_grad(lf, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return ({"params": params, "opt_state": opt_state, "step": state["step"] + 1},
            {"loss": loss})
  return step


def generate(config, workdir: str) -> dict:
  """Trains (or reuses) a reconstruction model, then a SiT on its latents."""
  from glue_jax.eval import frechet
  from glue_jax.models import latent_token_sit as lts
  from glue_jax.sampling import guidance, samplers
  gc = config.generate
  os.makedirs(workdir, exist_ok=True)
  inr_dir = gc.inr_workdir or os.path.join(workdir, "inr")
  if not gc.inr_workdir:
    reconstruct(config, inr_dir)
  mcfg, inr_graphdef, inr_params, _ = load_trained(inr_dir)
  data = ImageData(config)
  train = data.train if data.train is not None else data._tfds.get(
      np.arange(min(config.data.num_train or 4096, len(data._tfds))))
  encode = jax.jit(lambda p, x: nnx.merge(inr_graphdef, p).encode(2 * to_unit(x) - 1))
  z = np.concatenate([np.asarray(encode(inr_params, train[i:i + 256]))
                      for i in range(0, len(train), 256)])
  mean, std = z.mean((0, 1)), z.std((0, 1)) + 1e-6     # per channel (spec gotcha 13)
  zn = ((z - mean) / std).astype(np.float32)
  scfg = lts.LatentTokenSiTConfig(num_tokens=mcfg.num_latents, token_dim=mcfg.dec_width,
                                  hidden_size=gc.hidden_size, depth=gc.depth,
                                  num_heads=gc.num_heads)
  graphdef, params = lts.init(scfg, config.seed)
  tx = make_optimizer(lr=gc.lr)
  batch_fn = lambda s: zn[np.random.default_rng([config.seed, s, 11]).choice(
      len(zn), gc.batch_size, replace=len(zn) < gc.batch_size)]
  meta = {"task": "generate", "model": dataclasses.asdict(scfg), "inr_workdir": inr_dir}
  state, last = train_loop(os.path.join(workdir, "generator"), config, init_state(params, tx),
                           make_generator_step(graphdef, tx, scfg.token_dim), batch_fn,
                           gc.steps, meta, desc="latent-sit")
  h = w = config.data.image_size
  n = gc.num_samples

  @jax.jit
  def sample(params, inr_params):
    net = nnx.merge(graphdef, params)
    keys = samplers.per_sample_keys(config.seed + 1, jnp.arange(n))
    x1, _ = samplers.initial_noise(keys, (scfg.num_tokens, scfg.token_dim))
    vel = guidance.conditional(lambda x, t, y, g: net(x, t, y, g))
    y = jnp.zeros((n,), jnp.int32)
    if gc.sampler == "heun":
      x0, _ = samplers.heun(vel, x1, None, y, num_steps=gc.sample_steps)
    else:
      x0, _ = samplers.euler_maruyama(vel, x1, None, y, keys, num_steps=gc.sample_steps)
    latents = x0 * std + mean
    dec = nnx.merge(inr_graphdef, inr_params).decoder
    return (lainr_lib.decode_image(dec, latents, h, w, config.eval.chunk),
            lainr_lib.decode_image(dec, latents, h * gc.upsample, w * gc.upsample,
                                   config.eval.chunk))
  imgs, imgs_up = (_uint8(a) for a in sample(state["params"], inr_params))
  writers.save_png(os.path.join(workdir, "samples.png"), writers.image_grid(imgs), scale=4)
  writers.save_png(os.path.join(workdir, f"samples_x{gc.upsample}.png"),
                   writers.image_grid(imgs_up), scale=2)
  test_stats = frechet.statistics(pooled_features(data.test))
  fd = lambda x: frechet.frechet_distance(*frechet.statistics(pooled_features(x)), *test_stats)
  result = {"fd_pooled_samples_vs_test": fd(imgs),
            "fd_pooled_train_vs_test": fd(train[:len(data.test)]),
            "num_samples": n, "train": last, "latent_mean_abs": float(np.abs(mean).mean()),
            "latent_std_mean": float(std.mean())}
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  return result


def run(config, workdir: str) -> dict:
  """Entry for ``config.kind == 'lainr'``."""
  task = config.get("task", "reconstruct")
  if task == "reconstruct":
    return reconstruct(config, workdir)
  if task == "nvs":
    return nvs(config, workdir)
  if task == "generate":
    return generate(config, workdir)
  raise ValueError(f"config.task={task!r}: reconstruct | nvs | generate")
