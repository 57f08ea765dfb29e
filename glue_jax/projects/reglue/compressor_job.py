"""REGLUE's semantic compressor as a job of the one trainer (``config.kind = 'compressor'``).

  python -m glue_jax.main --config=glue_jax/configs/compressor.py:dinov2=PATH --workdir=DIR

The official recipe (REGLUE, Sec. 3.2 and its released ``train_compressor.py``):
frozen DINOv2 blocks 8-11 (images -> ImageNet normalisation -> bicubic 224 ->
the blocks, each through the final norm), per-channel standardisation with
the released statistics (or statistics estimated here, :func:`feature_statistics`),
MSE reconstruction through the 16-channel bottleneck (KL variant as a
switch), Adam lr 1e-3 with cosine annealing stepped once per epoch (T_max =
100 epochs, eta_min = 1e-4) for 25 epochs, a validation MSE before every
epoch (here: at the start and after every epoch).

Images stream from a Grain pipeline over any prepared TFDS image dataset
(ADM centre crop; ``glue_jax.data.imagenet.ImageSource``) or the digits, so
host memory does not grow with the dataset; the frozen DINOv2 runs inside
the sharded step.  An epoch is ``len(train) // batch_size`` steps (batches
may straddle epoch boundaries); the run resumes mid-epoch from the trainer's
checkpoints (state, iterator position, validation history).  The result is
``<workdir>/compressor.npz`` (our layout), ``compressor_history.json`` and an
MSE curve PNG.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.data import digits, imagenet, pipeline
from glue_jax.models import compressor as compressor_lib
from glue_jax.models import dinov2_weights
from glue_jax.models import semantic_encoder as se
from glue_jax import sharding
from glue_jax.train import trainer, writers
from glue_jax.train import step as step_lib

log = logging.getLogger("glue_jax.compressor")


def image_source(data_cfg, split: str):
  """Random-access ``{'image': uint8 (S, S, 3)}`` examples of a split: the
  digits (in memory, 1797 images) or a prepared TFDS image dataset (streamed)."""
  name = data_cfg.name
  if name == "digits":
    return pipeline.ArraySource({"image": digits.load(split, data_cfg.image_size)["image"]},
                                name=f"digits/{split}")
  if name.startswith("tfds:"):
    src, _ = imagenet.open_image_source(name[len("tfds:"):], split, data_cfg.data_dir or None,
                                        image_size=data_cfg.image_size)
    return src
  raise ValueError(f"compressor data.name={name!r}: 'digits' or 'tfds:<dataset>'")


def build_vit(enc_cfg):
  """The frozen foundation model from ``encoder.weights`` (DINOv2 formats or
  our ``.npz``)."""
  if not enc_cfg.weights:
    raise ValueError("encoder.weights: path to DINOv2 weights (HF dir, hub .pth or .npz)")
  return dinov2_weights.load_dinov2(enc_cfg.weights, variant=enc_cfg.variant or None)


def feature_statistics(vit, source, spec: se.SemanticSpec, *, num_images: int,
                       batch_size: int = 256):
  """Per-channel mean/std of the multi-layer stack over the first
  ``num_images`` of ``source`` (float64 accumulation over all tokens; the
  official script's estimator), read batch by batch."""
  enc = se.SemanticEncoder(vit, se.SemanticSpec(spec.layers, spec.input_size, "none"))
  gd, st = nnx.split(enc)

  @jax.jit
  def moments(st, x):
    stack = nnx.merge(gd, st).local_stack(x)[0].astype(jnp.float32)
    flat = stack.reshape(-1, stack.shape[-1])
    return flat.sum(0), jnp.square(flat).sum(0), flat.shape[0]

  n_img = min(num_images or len(source), len(source))
  s1 = s2 = None
  n = 0
  t0 = time.time()
  for i in range(0, n_img, batch_size):
    x = np.stack([source[j]["image"] for j in range(i, min(i + batch_size, n_img))])
    a, b, c = jax.device_get(moments(st, x))
    s1 = a.astype(np.float64) if s1 is None else s1 + a
    s2 = b.astype(np.float64) if s2 is None else s2 + b
    n += int(c)
    done = min(i + batch_size, n_img)
    log.info("feature statistics %d/%d images (%.1f img/s)", done, n_img,
             done / max(time.time() - t0, 1e-9))
  mean = s1 / n
  std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)


def _stats(config, workdir, vit, spec, train_src):
  stack_dim = vit.cfg.dim * len(spec.layers)
  if config.stats:
    return se.load_stats(config.stats, stack_dim)
  path = os.path.join(workdir, "feature_stats.npz")
  if os.path.exists(path):
    return se.load_stats(path, stack_dim)
  stats = feature_statistics(vit, train_src, spec, num_images=config.stats_images)
  writers.save_npz(path, mean=stats[0], std=stats[1])
  return stats


def build_job(config, workdir: str) -> tuple[trainer.Job, dict]:
  """The compressor job and its facts (``steps_per_epoch``, ``channels``)."""
  spec = se.SemanticSpec(tuple(config.layers), config.input_size or None, "none")
  vit = build_vit(config.encoder)
  train_src = image_source(config.data, "train")
  stats = _stats(config, workdir, vit, spec, train_src)
  frozen = se.SemanticEncoder(vit, spec, stats=stats)
  enc_gd, enc_arrays = nnx.split(frozen)
  enc_arrays = nnx.to_pure_dict(enc_arrays)
  stack_dim = vit.cfg.dim * len(spec.layers)
  ccfg = compressor_lib.CompressorConfig(
      channels=(stack_dim,) + tuple(config.hidden_channels) + (config.out_channels,),
      variational=config.loss == "mse_kl")
  batch = config.train.batch_size
  spe = len(train_src) // batch
  if spe == 0:
    raise ValueError(f"compressor: {len(train_src)} train images < train.batch_size {batch}")
  comp_gd = nnx.graphdef(nnx.eval_shape(lambda: compressor_lib.Compressor(
      ccfg, rngs=nnx.Rngs(0))))
  kind, kl_weight = config.loss, config.kl_weight

  def features(arrays, images):
    enc = nnx.merge(enc_gd, arrays)
    return jax.lax.stop_gradient(enc.standardize(enc.local_stack(images)[0]))

  def loss(params, rest, batch_, key, step, arrays):
    del step
    comp = nnx.merge(comp_gd, params, rest)
    value, terms = compressor_lib.compressor_loss(
        comp, features(arrays, batch_["image"]), key, kind=kind, kl_weight=kl_weight, train=True)
    return value, (terms, nnx.to_pure_dict(nnx.state(comp, nnx.Not(nnx.Param))))

  oc = dict(config.optim)
  oc.update(steps_per_epoch=spe)
  tx = step_lib.make_optimizer(**oc)
  lr_at = step_lib.lr_schedule(oc["lr"], schedule=oc["schedule"], steps_per_epoch=spe,
                               t_max_epochs=oc["t_max_epochs"], eta_min=oc["eta_min"])
  val = _validation_hook(config, enc_gd, comp_gd, features, spe, lr_at)
  meta = {"model": {"channels": list(ccfg.channels), "variational": ccfg.variational,
                    "layers": list(spec.layers), "input_size": spec.input_size,
                    "encoder": se.identity(vit)},
          "data": {"name": config.data.name, "train_examples": len(train_src)},
          "steps_per_epoch": spe}
  job = trainer.Job(
      name="compressor", meta=meta, model=lambda seed: compressor_lib.Compressor(
          ccfg, rngs=nnx.Rngs(seed)),
      loss=loss, source=train_src, tx=tx, aux=(enc_arrays,), keys=("image",),
      hooks=(val,))
  return job, {"steps_per_epoch": spe, "channels": list(ccfg.channels), "comp_gd": comp_gd}


def _validation_hook(config, enc_gd, comp_gd, features, spe: int, lr_at) -> trainer.Hook:
  """Validation MSE over ``data.val_images`` images of ``data.val_split``
  (deterministic reconstruction, BatchNorm in inference mode) at the start
  and after every epoch, with the epoch's learning rate."""
  src = image_source(config.data, config.data.val_split)
  n = min(config.data.val_images or len(src), len(src))
  batch = config.train.batch_size
  compiled = {}

  def fn(ctx: trainer.HookContext):
    data = ctx.setup.batch_shardings["image"]
    if "f" not in compiled:
      rep = sharding.replicated(ctx.mesh)

      def mse(params, rest, arrays, images):
        comp = nnx.merge(comp_gd, params, rest)
        x = features(arrays, images)
        return jnp.mean(jnp.square(comp(x, train=False) - x))
      compiled["f"] = jax.jit(mse, in_shardings=(rep, rep, rep, data))
    vals = []
    nproc = jax.process_count()
    for i in range(0, n - batch + 1, batch):
      lo = i + jax.process_index() * (batch // nproc)
      local = np.stack([src[j]["image"] for j in range(lo, lo + batch // nproc)])
      images = sharding.global_batch({"image": local}, {"image": data})["image"]
      vals.append(compiled["f"](ctx.state["params"], ctx.state.get("rest"), ctx.aux[0],
                                images))
    if not vals:
      raise ValueError(f"compressor: {n} validation images < train.batch_size {batch}")
    epoch = ctx.step // spe
    out = {"val_mse": float(np.mean(jax.device_get(vals))), "epoch": float(epoch),
           "lr": float(lr_at(epoch * spe))}
    log.info("compressor epoch %d: val MSE %.5f (lr %.3g)", epoch, out["val_mse"], out["lr"])
    return out
  return trainer.Hook(spe, fn, at_start=True)


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the compressor; writes ``compressor.npz`` and the curves."""
  os.makedirs(workdir, exist_ok=True)
  job, facts = build_job(config, workdir)
  with config.unlocked():
    config.train.steps = int(config.epochs) * facts["steps_per_epoch"]
  metrics = trainer.train(job, config, workdir)
  state, _ = trainer.latest_state(workdir)
  comp = nnx.merge(facts["comp_gd"], state["params"], state.get("rest", {}))
  path = os.path.join(workdir, "compressor.npz")
  writers.save_module(comp, path)
  history = [h for h in metrics.get("hook_history", []) if "val_mse" in h]
  writers.save_json(os.path.join(workdir, "compressor_history.json"), history)
  writers.save_curve(os.path.join(workdir, "compressor_mse.png"),
                     {"val": [h["val_mse"] for h in history]}, xlabel="epoch", ylabel="MSE")
  result = {"compressor": path, "channels": facts["channels"],
            "steps_per_epoch": facts["steps_per_epoch"],
            "train_mse": metrics.get("mse"), "step": metrics.get("step")}
  if history:
    result.update(epoch=int(history[-1]["epoch"]), val_mse=history[-1]["val_mse"])
  return result
