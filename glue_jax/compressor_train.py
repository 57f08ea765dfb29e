"""Training REGLUE's semantic compressor (``config.kind = 'compressor'``).

  python -m glue_jax.main --config=configs/compressor.py:dinov2=PATH,stats=PATH,data=tfds:imagenet2012 \
      --workdir=DIR

As the official ``train_compressor.py`` (spec b): frozen DINOv2 blocks 8-11 on
the fly (images -> ImageNet normalisation -> bicubic 224 -> the blocks, each
through the final norm), per-channel standardization with the released
statistics (or statistics computed by :func:`feature_statistics`), MSE
reconstruction (KL variant as a switch), Adam lr 1e-3 with cosine annealing
stepped once per epoch (T_max = 100 epochs, eta_min = 1e-4) for 25 epochs, a
validation MSE before every epoch.  Per-epoch checkpoints (Orbax) make the run
resumable; the result is ``<workdir>/compressor.npz`` (our layout) plus an
MSE curve (JSON + PNG).

The features are computed inside the jitted step from uint8 images, so the
only host work per step is reading images.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from glue_jax.models import compressor as compressor_lib
from glue_jax.models import dinov2_weights
from glue_jax.models import semantic_encoder as se
from glue_jax.train import checkpoint as ckpt_lib
from glue_jax.train import writers


def cosine_per_epoch(lr: float, t_max: int, eta_min: float):
  """PyTorch ``CosineAnnealingLR`` value for an epoch index."""
  def f(epoch):
    return eta_min + (lr - eta_min) * (1 + jnp.cos(jnp.pi * epoch / t_max)) / 2
  return f


def image_arrays(data_cfg, split: str) -> np.ndarray:
  """uint8 NHWC images of a split (digits, or a TFDS image dataset)."""
  name = data_cfg.name
  if name == "digits":
    from glue_jax.data import digits
    return digits.load(split, data_cfg.image_size)["image"]
  if name.startswith("tfds:"):
    from glue_jax.data import imagenet
    return imagenet.load_images(name[len("tfds:"):], split, image_size=data_cfg.image_size,
                                data_dir=data_cfg.get("data_dir") or None,
                                limit=data_cfg.get("limit") or None)
  raise ValueError(f"compressor data.name={name!r}: 'digits' or 'tfds:<dataset>'")


def build_vit(enc_cfg):
  """The frozen foundation model from ``encoder.weights`` (DINOv2 formats or
  our ``.npz``)."""
  if not enc_cfg.weights:
    raise ValueError("encoder.weights: path to DINOv2 weights (HF dir, hub .pth or .npz)")
  return dinov2_weights.load_dinov2(enc_cfg.weights, variant=enc_cfg.get("variant") or None)


def feature_statistics(vit, images: np.ndarray, spec: se.SemanticSpec, *,
                       batch_size: int = 256, desc: str = "feature stats"):
  """Per-channel mean/std of the multi-layer stack over ``images`` (float64
  accumulation over all tokens; the official script's estimator)."""
  enc = se.SemanticEncoder(vit, se.SemanticSpec(spec.layers, spec.input_size, "none"))
  gd, st = nnx.split(enc)

  @jax.jit
  def moments(st, x):
    stack = nnx.merge(gd, st).local_stack(x)[0].astype(jnp.float32)
    flat = stack.reshape(-1, stack.shape[-1])
    return flat.sum(0), jnp.square(flat).sum(0), flat.shape[0]

  s1 = s2 = None
  n = 0
  for i in tqdm(range(0, len(images), batch_size), desc=desc, mininterval=5.0):
    a, b, c = jax.device_get(moments(st, images[i:i + batch_size]))
    s1 = a.astype(np.float64) if s1 is None else s1 + a
    s2 = b.astype(np.float64) if s2 is None else s2 + b
    n += int(c)
  mean = s1 / n
  std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  spec = se.SemanticSpec(tuple(config.layers), config.input_size or None, "compressor")
  vit = build_vit(config.encoder)
  train_imgs = image_arrays(config.data, "train")
  val_imgs = image_arrays(config.data, config.data.val_split)
  stack_dim = vit.cfg.dim * len(spec.layers)
  if config.stats:
    stats = se.load_stats(config.stats, stack_dim)
  else:
    stats_path = os.path.join(workdir, "feature_stats.npz")
    if os.path.exists(stats_path):
      stats = se.load_stats(stats_path, stack_dim)
    else:
      stats = feature_statistics(vit, train_imgs[:config.stats_images or None], spec)
      writers.save_npz(stats_path, mean=stats[0], std=stats[1])
  ccfg = compressor_lib.CompressorConfig(
      channels=(stack_dim,) + tuple(config.hidden_channels) + (config.out_channels,),
      variational=config.loss == "mse_kl")
  comp = compressor_lib.Compressor(ccfg, rngs=nnx.Rngs(config.seed))
  enc = se.SemanticEncoder(vit, spec, stats=stats, compressor=comp)
  gd, params, rest = nnx.split(enc, nnx.Param, ...)
  vit_params = params["vit"]
  c_params = nnx.to_pure_dict(params["compressor"])
  rest = nnx.to_pure_dict(rest)
  params = {"vit": nnx.to_pure_dict(vit_params), "compressor": c_params}
  lr_at = cosine_per_epoch(config.lr, config.t_max_epochs, config.eta_min)
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.lr)
  opt_state = tx.init(c_params)

  def loss_of(c_params, vit_p, rest, images, key, train):
    m = nnx.merge(gd, {"vit": vit_p, "compressor": c_params}, rest)
    x = jax.lax.stop_gradient(m.standardize(m.local_stack(images)[0]))
    loss, aux = compressor_lib.compressor_loss(m.compressor, x, key, kind=config.loss,
                                               kl_weight=config.kl_weight, train=train)
    return loss, (aux, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param))))

  @jax.jit
  def train_step(c_params, opt_state, vit_p, rest, images, key, epoch):
    (loss, (aux, new_rest)), g = jax.value_and_grad(loss_of, has_aux=True)(
        c_params, vit_p, rest, images, key, True)
    opt_state.hyperparams["learning_rate"] = lr_at(epoch)
    upd, opt_state = tx.update(g, opt_state, c_params)
    return optax.apply_updates(c_params, upd), opt_state, new_rest, aux

  @jax.jit
  def val_step(c_params, vit_p, rest, images):
    return loss_of(c_params, vit_p, rest, images, jax.random.key(0), False)[1][0]["mse"]

  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
  start_epoch, history = 0, []
  latest = ck.latest_step()
  if latest is not None:
    r = ck.restore(latest, state={"c": c_params, "opt": opt_state, "rest": rest})
    c_params, opt_state, rest = r["state"]["c"], r["state"]["opt"], r["state"]["rest"]
    history = list(ck.read_config(latest)["history"])
    start_epoch = latest
    logging.info("compressor: resumed after epoch %d", latest)
  bs = config.batch_size
  n_batches = len(train_imgs) // bs
  if n_batches == 0:
    raise ValueError(f"compressor: {len(train_imgs)} train images < batch_size {bs}")
  base = jax.random.key(config.seed)
  for epoch in range(start_epoch, config.epochs):
    vals = [float(val_step(c_params, params["vit"], rest, val_imgs[i:i + bs]))
            for i in range(0, len(val_imgs) - bs + 1, bs)] or \
        [float(val_step(c_params, params["vit"], rest, val_imgs))]
    perm = np.random.default_rng(config.seed + epoch).permutation(len(train_imgs))
    losses = []
    for i in tqdm(range(n_batches), desc=f"compressor epoch {epoch + 1}/{config.epochs}",
                  mininterval=5.0):
      idx = np.sort(perm[i * bs:(i + 1) * bs])
      key = jax.random.fold_in(jax.random.fold_in(base, epoch), i)
      c_params, opt_state, rest, aux = train_step(c_params, opt_state, params["vit"], rest,
                                                  train_imgs[idx], key, epoch)
      losses.append(aux["mse"])
    train_mse = float(np.mean(jax.device_get(losses)))
    if not np.isfinite(train_mse):
      raise FloatingPointError(f"compressor: non-finite training MSE in epoch {epoch + 1}")
    history.append({"epoch": epoch + 1, "train_mse": train_mse, "val_mse": float(np.mean(vals)),
                    "lr": float(lr_at(epoch))})
    logging.info("compressor %s", history[-1])
    ck.save(epoch + 1, state={"c": c_params, "opt": opt_state, "rest": rest},
            config={"history": history})
  ck.wait()
  final = nnx.merge(gd, {"vit": params["vit"], "compressor": c_params}, rest)
  path = os.path.join(workdir, "compressor.npz")
  writers.save_module(final.compressor, path)
  writers.save_json(os.path.join(workdir, "compressor_history.json"), history)
  writers.save_curve(os.path.join(workdir, "compressor_mse.png"),
                     {"train": [h["train_mse"] for h in history],
                      "val": [h["val_mse"] for h in history]}, xlabel="epoch", ylabel="MSE")
  return {"compressor": path, "channels": list(ccfg.channels), **(history[-1] if history else {})}
