"""The embedded demo: the whole REGLUE pipeline on scikit-learn's digits, on CPU.

Stages (each reused when its output exists, so a second run resumes):
 1. dataset: digits upsampled to ``image_size`` RGB (train 1500 / test 297);
 2. semantic encoder: DINOv2 weights when ``encoder.weights`` is given, else a
    small ViT of the same module class (patch 4 -> 4x4 grid at 16 px) trained briefly
    as a digit classifier on the train split;
 3. features: blocks ``layers`` of the encoder, each through the final norm
    (multi-layer local features), the last block's [CLS] (global) and patch
    tokens (REPA targets); per-channel statistics of the local stack;
 4. compressor: conv autoencoder on the standardized stack -> 16 channels;
 5. feature file: first-stage latents (exact pixel tokenizer, or the SD-VAE
    when its weights are given), compressed semantics, [CLS], REPA targets;
 6. REGLUE training with the regular trainer (``glue_jax.diffusion_job``);
 7. sampling (SDE + CFG) from the EMA weights, a sample grid PNG, and metrics:
    Frechet distance of encoder [CLS] features against the test split and
    the class accuracy of conditional samples under the encoder's classifier.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glue_jax import api
from glue_jax.data import digits
from glue_jax.eval import frechet
from glue_jax.models import compressor as compressor_lib
from glue_jax.models import dinov2, dinov2_weights, first_stage as first_stage_lib, layers
from glue_jax import diffusion_job
from glue_jax.train import module_fit, writers

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class Encoder(nnx.Module):
  """A DINOv2-class ViT plus a linear digit classifier on its [CLS]."""

  def __init__(self, cfg: dinov2.Dinov2Config, num_classes: int, *, rngs: nnx.Rngs):
    self.vit = dinov2.Dinov2(cfg, rngs=rngs)
    self.head = layers.Dense(cfg.dim, num_classes, rngs=rngs, axes=("embed", None))

  def logits(self, x):
    return self.head(self.vit(x)["x_norm_clstoken"])


def normalize(images_uint8) -> jax.Array:
  return (jnp.asarray(images_uint8, jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def _encoder(cfg, workdir, data):
  ec = cfg.encoder
  vit_cfg = dinov2.Dinov2Config(dim=ec.dim, depth=ec.depth, num_heads=ec.heads,
                                patch_size=ec.patch_size, pos_grid=cfg.image_size // ec.patch_size)
  enc = Encoder(vit_cfg, digits.NUM_CLASSES, rngs=nnx.Rngs(cfg.seed))
  path = os.path.join(workdir, "encoder.npz")
  key = {"image_size": cfg.image_size, "seed": cfg.seed, **ec.to_dict()}
  if _reuse(path, key, "encoder"):
    return writers.load_module(enc, path)

  def loss_fn(m, batch, key):
    logits = m.logits(normalize(batch["image"]))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  module_fit.fit(enc, loss_fn, {"image": data["image"], "label": data["label"]},
                 workdir=os.path.join(workdir, "encoder_run"), name="encoder",
                 steps=ec.steps, batch_size=ec.batch_size,
                 tx=optax.adamw(ec.lr, weight_decay=0.05), seed=cfg.seed, meta=key)
  # The ViT alone in DINOv2's loadable format (glue_jax/configs/compressor.py:digits,
  # tools/precompute read it like real DINOv2 weights).
  vit_path = os.path.join(workdir, "encoder_vit.npz")
  dinov2_weights.save_npz(enc.vit, vit_path + ".tmp.npz")
  os.replace(vit_path + ".tmp.npz", vit_path)
  writers.save_module(enc, path)
  _record(path, key)
  return enc


def _reuse(path: str, key: dict, stage: str) -> bool:
  """True when ``path`` exists and was made by the config ``key`` (recorded in
  ``<path>.config.json``); a file made by another config is an error."""
  if not os.path.exists(path):
    return False
  rec = path + ".config.json"
  saved = json.load(open(rec)) if os.path.exists(rec) else None
  want = json.loads(json.dumps(key, default=list))
  if saved != want:
    diff = sorted(k for k in set(want) | set(saved or {}) if (saved or {}).get(k) != want.get(k))
    raise ValueError(f"demo stage '{stage}': {path} was made by another config (differs in "
                     f"{diff or 'unrecorded settings'}); delete it (and what was built from it) "
                     "or use another --workdir")
  return True


def _record(path: str, key: dict) -> None:
  writers.save_json(path + ".config.json", json.loads(json.dumps(key, default=list)))


def _extract(enc, images, layer_ids, batch=256):
  @jax.jit
  def run(x):
    maps, _ = enc.vit.intermediate_layers(normalize(x), layer_ids, norm=True)
    out = enc.vit(normalize(x))
    return jnp.concatenate(maps, -1), out["x_norm_clstoken"], out["x_norm_patchtokens"], \
        enc.logits(normalize(x))
  outs = [run(images[i:i + batch]) for i in range(0, len(images), batch)]
  return [np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(4)]


def _features(cfg, workdir, enc, fs, split, data):
  path = os.path.join(workdir, f"features_{split}.npz")
  key = {"encoder": cfg.encoder.to_dict(), "compressor": cfg.compressor.to_dict(),
         "first_stage": dict(cfg.train.first_stage), "image_size": cfg.image_size,
         "seed": cfg.seed}
  if _reuse(path, key, f"features_{split}"):
    return path
  local, cls, patches, _ = _extract(enc, data["image"], tuple(cfg.encoder.layers))
  stats_path = os.path.join(workdir, "feature_stats.npz")
  if not os.path.exists(stats_path):
    if split != "train":
      raise RuntimeError("feature statistics come from the train split")
    np.savez(stats_path, mean=local.reshape(-1, local.shape[-1]).mean(0),
             std=local.reshape(-1, local.shape[-1]).std(0))
  with np.load(stats_path) as st:
    std_local = compressor_lib.standardize(local, st["mean"], st["std"], 1e-6)
  comp = _compressor(cfg, workdir, std_local if split == "train" else None, local.shape[-1])
  semantic = np.asarray(jax.jit(lambda x: comp.encode(x, False))(std_local))
  latents = np.asarray(fs.encode(data["image"]))
  arrays = dict(latents=latents, semantic=semantic, cls=cls, align_target=patches,
                label=data["label"])
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  _record(path, key)
  return path


def _compressor(cfg, workdir, std_local, in_ch):
  cc = cfg.compressor
  comp = compressor_lib.Compressor(compressor_lib.CompressorConfig(
      channels=(in_ch, cc.hidden, cc.out_channels)), rngs=nnx.Rngs(cfg.seed))
  path = os.path.join(workdir, "compressor.npz")
  key = {"encoder": cfg.encoder.to_dict(), "seed": cfg.seed, **cc.to_dict()}
  if _reuse(path, key, "compressor"):
    writers.load_module(comp, path)
    return comp
  if std_local is None:
    raise RuntimeError("the compressor is trained on the train split first")

  def loss_fn(m, batch, key):
    return jnp.mean(jnp.square(m(batch["x"], train=True) - batch["x"]))

  sched = optax.cosine_decay_schedule(cc.lr, cc.steps * 4, alpha=0.1)
  last = module_fit.fit(comp, loss_fn, {"x": std_local},
                        workdir=os.path.join(workdir, "compressor_run"), name="compressor",
                        steps=cc.steps, batch_size=cc.batch_size, tx=optax.adam(sched),
                        seed=cfg.seed, meta=key)
  logging.info("compressor: reconstruction MSE %.4f after %d steps", last.get("loss", float("nan")),
               cc.steps)
  writers.save_module(comp, path)
  _record(path, key)
  return comp


class _StageTimer:
  """Wall-clock seconds per demo stage (reported in metrics.json)."""

  def __init__(self):
    self.seconds, self._t = {}, time.time()

  def done(self, stage: str):
    now = time.time()
    self.seconds[stage] = round(now - self._t, 2)
    self._t = now


def prepare(cfg, workdir: str, timer: "_StageTimer | None" = None):
  """Stages 1-5 (reused when present): ``(encoder, first_stage, test split)``;
  ``cfg.train.data.path`` then names the feature files."""
  timer = timer or _StageTimer()
  os.makedirs(workdir, exist_ok=True)
  train = digits.load("train", cfg.image_size)
  test = digits.load("test", cfg.image_size)
  fs = first_stage_lib.build(dict(cfg.train.first_stage))
  timer.done("dataset")
  enc = _encoder(cfg, workdir, train)
  timer.done("encoder")
  _features(cfg, workdir, enc, fs, "train", train)
  _features(cfg, workdir, enc, fs, "test", test)
  timer.done("features_and_compressor")
  with cfg.train.unlocked():
    cfg.train.data.path = os.path.join(workdir, "features_{split}.npz")
  return enc, fs, test


def run(cfg, workdir: str) -> dict:
  """The whole pipeline; a finished run (its ``metrics.json`` made by the same
  config) returns its recorded metrics without recompiling anything."""
  done = os.path.join(workdir, "metrics.json")
  config_json = json.loads(cfg.to_json())
  if os.path.exists(done):
    recorded = json.load(open(done))
    if recorded.get("config") == config_json:
      logging.info("demo: %s is finished; returning its recorded metrics", workdir)
      return recorded
  timer = _StageTimer()
  enc, fs, test = prepare(cfg, workdir, timer)
  metrics = diffusion_job.train(cfg.train, os.path.join(workdir, "reglue"))
  timer.done("train")
  result = _evaluate(cfg, workdir, enc, fs, test)
  timer.done("evaluate")
  result["train"] = metrics
  result["stage_seconds"] = timer.seconds
  result["config"] = config_json
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  logging.info("demo metrics: %s", json.dumps(result, default=float))
  return result


def _evaluate(cfg, workdir, enc, fs, test) -> dict:
  model = api.load_model(os.path.join(workdir, "reglue", "checkpoints"))
  n = cfg.eval.num_samples
  labels = np.arange(n) % digits.NUM_CLASSES
  out = []
  for i in range(0, n, cfg.eval.batch_size):
    x0, _ = model.sample(labels[i:i + cfg.eval.batch_size], seed=cfg.seed,
                         indices=np.arange(i, min(i + cfg.eval.batch_size, n)),
                         cfg_scale=cfg.eval.cfg_scale, num_steps=cfg.eval.num_steps)
    out.append(np.asarray(fs.decode_uint8(x0[..., :model.config.latent_channels])))
  imgs = np.concatenate(out)
  writers.save_png(os.path.join(workdir, "samples.png"),
                   writers.image_grid(imgs[:100], ncols=10), scale=2)
  _, cls_s, _, logits_s = _extract(enc, imgs, tuple(cfg.encoder.layers))
  _, cls_t, _, logits_t = _extract(enc, test["image"], tuple(cfg.encoder.layers))
  return {
      "fd_cls_samples_vs_test": frechet.frechet_distance(
          *frechet.statistics(cls_s), *frechet.statistics(cls_t)),
      "sample_class_accuracy": float((logits_s.argmax(-1) == labels).mean()),
      "encoder_test_accuracy": float((logits_t.argmax(-1) == test["label"]).mean()),
      "num_samples": int(n), "cfg_scale": float(cfg.eval.cfg_scale),
      "num_steps": int(cfg.eval.num_steps),
  }
