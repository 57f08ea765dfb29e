"""LA-INR: band order, shapes, chunked decoding, PSNR, training, checkpoint resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glue_jax.configs import lainr as lainr_configs
from glue_jax.projects.lainr import reconstruction as lainr
from glue_jax import sharding
from glue_jax.train import trainer
from glue_jax.train import step as step_lib
from glue_jax.models import lainr as lainr_lib
from glue_jax.models import latent_token_sit as lts

TINY = dict(image_size=16, patch_size=4, patch_padding=0, enc_width=32, enc_depth=1,
            enc_heads=2, num_latents=8, dec_width=32, attn_heads=2, sigmas=(8.0, 4.0),
            sigma_q=2.0, num_freqs=6)


@pytest.fixture(scope="module")
def tiny():
  cfg = lainr_lib.LAINRConfig(**TINY)
  graphdef, params = lainr_lib.init(cfg, seed=0)
  return cfg, graphdef, params


@pytest.fixture(scope="module")
def digits16():
  from glue_jax.data import digits
  return digits.load("train", 16)["image"][:64]


def test_band_order_is_validated():
  with pytest.raises(ValueError, match="sigma_1 >= ... >= sigma_L >= sigma_q"):
    lainr_lib.LAINRConfig(**{**TINY, "sigmas": (4.0, 8.0)})
  with pytest.raises(ValueError, match="sigma_q"):
    lainr_lib.LAINRConfig(**{**TINY, "sigma_q": 6.0})
  with pytest.raises(ValueError, match="not divisible by patch"):
    lainr_lib.LAINRConfig(**{**TINY, "patch_size": 5})
  with pytest.raises(ValueError, match="variant"):
    lainr_lib.LAINRConfig(**{**TINY, "variant": "ipc"})
  bands = lambda **kw: lainr_lib.LAINRConfig(**{**TINY, **kw}).bands
  assert bands() == (8.0, 4.0)
  assert bands(variant="no_select") == (8.0, 4.0)
  assert bands(variant="single_band") == (8.0, 8.0)
  assert bands(variant="single_band", single_band_mode="one_level") == (8.0,)
  # the paper configuration at 178 px: 20x20 patches of 9 with padding 1
  c = lainr_configs.get_config("dataset=tfds:imagenette")
  m = lainr.model_config(c, image_size=178, in_channels=3, coord_dim=2, out_dim=3)
  assert (m.num_patches, m.sigmas, m.sigma_q, m.num_latents, m.dec_width) == (
      400, (128.0, 32.0), 16.0, 256, 256)
  assert c.data.jitter and c.data.test_split == "validation" and c.optim.lr == 1e-4


def test_fourier_frequencies_log_spaced_from_one():
  w = lainr_lib.frequencies(32.0, 6)
  np.testing.assert_allclose(w, np.exp(np.linspace(0, np.log(32.0), 6)), rtol=1e-6)
  assert w[0] == 1.0 and abs(w[-1] - 32.0) < 1e-4
  v = jnp.asarray([[0.25, -0.5]])
  f = np.asarray(lainr_lib.fourier_features(v, 32.0, 6))
  ref = np.concatenate([np.concatenate([np.cos(np.pi * w * x), np.sin(np.pi * w * x)])
                        for x in (0.25, -0.5)])
  np.testing.assert_allclose(f[0], ref, rtol=1e-5, atol=1e-6)


def _trace_bands(cfg, monkeypatch):
  """Sigmas passed to the Fourier features, in call order, during one decode."""
  seen = []
  real = lainr_lib.fourier_features
  monkeypatch.setattr(lainr_lib, "fourier_features",
                      lambda v, s, n, p=True: seen.append(s) or real(v, s, n, p))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lainr_lib.LAINR(cfg, rngs=nnx.Rngs(0))))
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: lainr_lib.LAINR(cfg, rngs=nnx.Rngs(0)))))

  def f(p, x, c):
    out, levels = nnx.merge(graphdef, p).decoder.query(
        nnx.merge(graphdef, p).decoder.prepare(nnx.merge(graphdef, p).encode(x)), c)
    return nnx.merge(graphdef, p).encode(x), out, levels
  shapes = jax.eval_shape(f, params, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32),
                          jax.ShapeDtypeStruct((2, 10, 2), jnp.float32))
  monkeypatch.setattr(lainr_lib, "fourier_features", real)
  return seen, shapes


@pytest.mark.parametrize("variant,want_bands,n_levels", [
    ("lainr", [2.0, 8.0, 4.0], 2), ("no_select", [8.0, 4.0], 2),
    ("single_band", [2.0, 8.0, 8.0], 2), ("global", [8.0], 1)])
def test_shapes_and_band_order(variant, want_bands, n_levels, monkeypatch):
  cfg = lainr_lib.LAINRConfig(**{**TINY, "variant": variant})
  seen, (z, out, levels) = _trace_bands(cfg, monkeypatch)
  # query features at sigma_q first (selective variants), then the shallowest
  # level gets the LARGEST bandwidth
  assert seen == want_bands
  assert z.shape == (2, 8, 32) and out.shape == (2, 10, 3)
  assert len(levels) == n_levels and all(l.shape == (2, 10, 3) for l in levels)


def test_levels_sum_chunked_equals_full_any_resolution(tiny, digits16):
  cfg, graphdef, params = tiny

  @jax.jit
  def run(p, images):
    m = nnx.merge(graphdef, p)
    z = m.encode(2 * lainr.to_unit(images) - 1)
    coords = jnp.broadcast_to(lainr_lib.pixel_grid(16, 16)[None], (4, 256, 2))
    full, levels = m.decoder.query(m.decoder.prepare(z), coords)
    chunked = lainr_lib.decode_chunked(m.decoder, z, coords, chunk=37)   # pads 256 -> 259
    big = lainr_lib.decode_image(m.decoder, z, 40, 24, chunk=128)
    return full, sum(levels) + cfg.output_bias, chunked, big
  full, level_sum, chunked, big = run(params, digits16[:4])
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(level_sum), np.asarray(full), rtol=1e-5, atol=1e-6)
  assert big.shape == (4, 40, 24, 3) and np.isfinite(np.asarray(big)).all()
  assert float(jnp.std(full)) > 1e-3        # not a constant function


def test_psnr_is_mean_of_per_image_psnr():
  target = np.zeros((2, 4, 4, 3), np.float32)
  pred = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 0.01)]).astype(np.float32)
  psnr = jax.jit(lainr.psnr, static_argnames="clip")
  per = np.asarray(psnr(pred, target))
  np.testing.assert_allclose(per, [20.0, 40.0], rtol=1e-5)
  assert abs(per.mean() - 30.0) < 1e-4           # not -10 log10(mean MSE) = 22.97
  over = np.full((1, 2, 2, 3), 1.2, np.float32)
  np.testing.assert_allclose(np.asarray(psnr(over, np.ones_like(over))),
                             [-10 * np.log10(0.04)], rtol=1e-5)   # unclipped by default
  assert np.isinf(np.asarray(psnr(over, np.ones_like(over), clip=True))).all()


def test_pixel_subsampling_and_jitter():
  sample = jax.jit(lainr.sample_pixels, static_argnums=(0, 1, 2),
                   static_argnames=("fraction", "jitter"))
  coords, idx = sample(8, 4, 3, jax.random.key(0), fraction=0.25, jitter=True)
  idx = np.asarray(idx)
  assert coords.shape == (3, 8, 2) and idx.shape == (3, 8)
  assert all(len(set(row)) == 8 for row in idx)                   # without replacement
  grid = np.asarray(lainr_lib.pixel_grid(8, 4))
  off = np.abs(np.asarray(coords) - grid[idx])
  assert (off[..., 0] <= 1 / 8 + 1e-6).all() and (off[..., 1] <= 1 / 4 + 1e-6).all()
  assert off.max() > 0.01
  full, _ = sample(8, 4, 2, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(full[1]), grid)


def _recon_config(steps=4, batch=8):
  """glue_jax/configs/lainr.py:runlocal with the TINY model on 64 digits."""
  c = lainr_configs.get_config("runlocal")
  c.model.update({k: v for k, v in TINY.items() if k in c.model})
  c.data.num_train = 64
  c.train.update(steps=steps, batch_size=batch, log_every=2, transfer_guard="disallow")
  c.checkpoint.every = 2
  return c


def test_training_lowers_loss(tiny, digits16):
  cfg, graphdef, params = tiny
  tx = step_lib.make_optimizer(lr=3e-3, grad_clip=0.0)
  step = jax.jit(step_lib.make_step(lainr.make_loss(graphdef), tx), donate_argnums=(0,))
  state = step_lib.init_state(jax.tree.map(jnp.array, params), tx, ema=False)
  key = jax.random.key(0)
  batch = {"image": digits16[:8]}
  losses = []
  for _ in range(12):
    state, m = step(state, batch, key)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.6 * losses[0], losses


def _steps_on(job, config, devices, n):
  """Gradients at the initial state and the losses of ``n`` trainer steps on a
  mesh of ``devices`` (the same batches)."""
  s = trainer.setup(job, config, devices=devices)
  it = iter(trainer.make_dataset(job, config))
  state = s.init_state(config.seed)
  step = s.jit_step()
  losses = []
  with jax.set_mesh(s.mesh):
    key = jax.device_put(jax.random.key(config.seed), sharding.replicated(s.mesh))
    for i in range(n):
      local = next(it)
      local.pop("index")
      batch = sharding.global_batch(local, s.batch_shardings)
      if i == 0:
        grads = jax.device_get(jax.jit(jax.grad(
            lambda p, b: job.loss(p, None, b, jax.random.fold_in(key, 0), 0)[0]))(
                state["params"], batch))
      state, m = step(state, batch, key)
      losses.append(float(m["loss"]))
  return grads, np.asarray(losses)


def test_eight_devices_equal_one():
  """Data-parallel LA-INR: 8 devices (one image each) compute what 1 device
  computes: the same gradients (to float32 reduction order, relative to the
  largest gradient) and the same losses over 4 Adam steps.

  The parameters themselves are not compared element by element: the key
  bias of the decoder's cross-attention has an exactly zero gradient
  (softmax is invariant to adding q.b to every logit), so its computed
  gradient is rounding noise that Adam scales to +-lr steps, differently for
  every reduction order.  Those steps change no output, hence the losses."""
  config = _recon_config()
  job, *_ = lainr.build_job(config)
  g1, l1 = _steps_on(job, config, jax.devices()[:1], 4)
  g8, l8 = _steps_on(job, config, jax.devices(), 4)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(b / scale, a / scale, rtol=0, atol=1e-5)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert l1[-1] < l1[0]                                 # it did train


def test_resume_equals_unbroken_run(tmp_path):
  config = _recon_config()
  job, mcfg, graphdef, _ = lainr.build_job(config)
  a = trainer.train(job, config, str(tmp_path / "a"))
  short = _recon_config(steps=2)
  trainer.train(job, short, str(tmp_path / "b"))
  b = trainer.train(job, config, str(tmp_path / "b"))             # resumes 2 -> 4
  assert a["step"] == b["step"] == 4
  cfg_a, _, pa, _ = lainr.load_trained(str(tmp_path / "a"))
  cfg_b, _, pb, _ = lainr.load_trained(str(tmp_path / "b"))
  assert cfg_a == cfg_b == mcfg
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  other = _recon_config(steps=6)
  other.model.num_latents = 4
  job_o, *_ = lainr.build_job(other)
  with pytest.raises(trainer.ConfigMismatchError, match="num_latents"):
    trainer.train(job_o, other, str(tmp_path / "b"))


def test_latent_token_sit_shapes_and_errors():
  cfg = lts.LatentTokenSiTConfig(num_tokens=8, token_dim=32, hidden_size=32, depth=2,
                                 num_heads=2)
  net = nnx.eval_shape(lambda: lts.LatentTokenSiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.graphdef(net), nnx.to_pure_dict(nnx.state(net))
  f = lambda p, x, t: nnx.merge(graphdef, p)(x, t, None)
  v, vg, proj = jax.eval_shape(f, params, jax.ShapeDtypeStruct((3, 8, 32), jnp.float32),
                               jax.ShapeDtypeStruct((3,), jnp.float32))
  assert v.shape == (3, 8, 32) and vg is None and proj is None
  assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)   # SiT blocks, stacked
  with pytest.raises(ValueError, match=r"expected \(B, 8, 32\)"):
    jax.eval_shape(f, params, jax.ShapeDtypeStruct((3, 4, 32), jnp.float32),
                   jax.ShapeDtypeStruct((3,), jnp.float32))


def test_missing_tfds_dataset_is_a_clear_error(tmp_path):
  from glue_jax.projects.lainr import photo_data as photos
  with pytest.raises(FileNotFoundError, match="not prepared for random access"):
    photos.TfdsImages("imagenette", "train", 32, data_dir=str(tmp_path))
