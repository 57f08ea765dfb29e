"""REGLUE methods: every Table 1 method trains on digits-like data; the loss on
fixed inputs equals a hand computation; online features == precomputed."""

import jax
import numpy as np
import pytest
from flax import nnx

from glue_jax import methods
from glue_jax.models import compressor as compressor_lib
from glue_jax.models import dinov2, dinov2_weights, pca as pca_lib
from glue_jax.models import semantic_encoder as se
from glue_jax import diffusion_job
from glue_jax.train import writers
from glue_jax.train import step as step_lib
from glue_jax.transport import objective
from tests import train_utils


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory):
  """A tiny DINOv2-class ViT (4 blocks, 16-d, patch 4), stats, compressor, PCA,
  and a feature file of digits at 16 px with images, all written to disk."""
  from glue_jax.data import digits
  d = tmp_path_factory.mktemp("enc")
  vit = dinov2.Dinov2(dinov2.Dinov2Config(dim=16, depth=4, num_heads=2, patch_size=4,
                                          pos_grid=4), rngs=nnx.Rngs(0))
  dinov2_weights.save_npz(vit, str(d / "vit.npz"))
  data = digits.load("train", 16)
  imgs, labels = data["image"][:64], data["label"][:64] % 5
  stack, cls, patches = jax.jit(lambda v, x: se.SemanticEncoder(
      v, se.SemanticSpec((0, 1, 2, 3), None, "none")).local_stack(x))(vit, imgs)
  mean, std = np.asarray(stack).reshape(-1, 64).mean(0), np.asarray(stack).reshape(-1, 64).std(0)
  writers.save_npz(str(d / "stats.npz"), mean=mean, std=std)
  comp = compressor_lib.Compressor(compressor_lib.CompressorConfig(channels=(64, 8, 16)),
                                   rngs=nnx.Rngs(1))
  writers.save_module(comp, str(d / "comp.npz"))
  pca_lib.fit(np.asarray(patches), k=8).save(str(d / "pca.npz"))
  latents = imgs.reshape(64, 8, 2, 8, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(64, 8, 8, 12)
  base = dict(image=imgs, latents=(latents / 127.5 - 1).astype(np.float32), label=labels)
  np.savez(d / "images.npz", **base)
  return d


def _features_cfg(c, d, local, layers):
  c.features.dinov2 = str(d / "vit.npz")
  c.features.layers = layers
  c.features.input_size = 0
  c.features.local = local
  c.features.stats = str(d / "stats.npz")
  c.features.compressor = str(d / "comp.npz")
  c.features.pca = str(d / "pca.npz")


@pytest.mark.parametrize("method,local,layers", [("reglue", "compressor", (0, 1, 2, 3)),
                                                 ("redi", "pca", (3,))])
def test_online_features_equal_precomputed(encoder_files, tmp_path, method, local, layers):
  d = encoder_files
  # precomputed: the same frozen module, run by hand, stored next to the images
  cfg_on = train_utils.tiny_config(str(d / "images.npz"), method=method)
  _features_cfg(cfg_on, d, local, layers)
  cfg_on.features.mode = "online"
  sem = se.from_config(cfg_on.features)
  with np.load(d / "images.npz") as f:
    arrays = {k: f[k] for k in f.files}
  feats = jax.device_get(jax.jit(lambda m, x: m(x))(sem, arrays["image"]))
  np.savez(tmp_path / "pre.npz", **{k: v for k, v in arrays.items() if k != "image"}, **feats)
  cfg_pre = train_utils.tiny_config(str(tmp_path / "pre.npz"), method=method)
  cfg_pre.first_stage = cfg_on.first_stage = {"name": "pixel", "factor": 2, "channels": 3,
                                              "scale": 1.0, "shift": 0.0}
  losses = {}
  for name, cfg in (("online", cfg_on), ("pre", cfg_pre)):
    run = diffusion_job.build(cfg)
    assert run.net_cfg.semantic_channels == methods.get(method).semantic_channels
    state = step_lib.init_state(diffusion_job.init_params(run, 0), run.tx)
    ex = [run.source[i] for i in range(8)]
    batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
    if name == "online":
      batch = {k: v for k, v in batch.items() if k in run.batch_shardings}
    with jax.set_mesh(run.mesh):
      from glue_jax import sharding
      _, m = diffusion_job.make_step(run)(state, sharding.global_batch(batch, run.batch_shardings),
                                 jax.random.key(3))
    losses[name] = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
  for k in ("loss", "latent", "semantic", "global", "align"):
    if k in losses["pre"]:
      np.testing.assert_allclose(losses["online"][k], losses["pre"][k], rtol=2e-5, err_msg=k)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains(tmp_path, method):
  """Finite loss that decreases over a short run on a fixed synthetic set."""
  from glue_jax.data import digits
  feats = train_utils.write_features(str(tmp_path / "f.npz"), n=32)
  m = methods.get(method)
  with np.load(feats) as f:
    arrays = {k: f[k] for k in f.files}
  # real digits (16 px, grey) through the exact pixel tokenizer: 8x8x4 latents
  d = digits.load("train", 16)
  g = d["image"][:32, :, :, 0].astype(np.float32) / 127.5 - 1.0
  arrays["latents"] = g.reshape(32, 8, 2, 8, 2).transpose(0, 1, 3, 2, 4).reshape(32, 8, 8, 4)
  arrays["label"] = (d["label"][:32] % 5).astype(np.int32)
  if m.local == "linear":
    arrays["semantic"] = arrays["semantic"][..., :8]
  np.savez(feats, **arrays)
  cfg = train_utils.tiny_config(feats, method=method, steps=20, batch=16)
  cfg.train.log_every, cfg.checkpoint.every, cfg.optim.lr = 10, 30, 3e-3
  cfg.model.overrides = dict(cfg.model.overrides, class_dropout_prob=0.0)
  run = diffusion_job.build(cfg)
  state = step_lib.init_state(diffusion_job.init_params(run, 0), run.tx)
  ex = [run.source[i] for i in range(16)]
  batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
  step = jax.jit(objective.make_train_step(run.graphdef, run.tx, run.step_cfg))
  hist = []
  for i in range(20):
    state, met = step(state, batch, jax.random.key(0))
    hist.append({k: float(v) for k, v in met.items() if np.ndim(v) == 0})
  assert all(np.isfinite(list(h.values())).all() for h in hist), hist
  # every method models the latents; that term must fall on a fixed batch
  lat = [h["latent"] for h in hist]
  assert np.mean(lat[-5:]) < 0.9 * np.mean(lat[:5]), (method, lat)
  terms = {"semantic": m.local != "none", "global": m.global_joint, "align": m.aligns}
  for k, present in terms.items():        # the method's switches pick the loss terms
    assert (k in hist[0]) == present, (method, k, sorted(hist[0]))
