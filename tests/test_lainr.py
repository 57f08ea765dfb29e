"""LA-INR: band order, shapes, chunked decoding, PSNR, training, checkpoint resume."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lainr as lainr_configs
from glue_jax import lainr
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


def _tiny_config(tmp_steps=4):
  c = lainr_configs.get_config("fast")
  c.model.update({k: v for k, v in TINY.items() if k in c.model})
  c.optim.lr = 3e-3
  c.train.update(steps=tmp_steps, log_every=2, ckpt_every=2)
  return c


@pytest.fixture(scope="module")
def recon_step(tiny):
  """One jitted (donating) step shared by the training and resume tests."""
  _, graphdef, _ = tiny
  tx = lainr.make_optimizer(lr=3e-3)
  return tx, jax.jit(lainr.make_recon_step(graphdef, tx), donate_argnums=(0,))


def test_training_lowers_loss(tiny, digits16, recon_step):
  cfg, graphdef, params = tiny
  tx, step = recon_step
  # committed copy, like train_loop's state (same compilation; donation-safe)
  state = jax.device_put(lainr.init_state(params, tx), jax.devices()[0], may_alias=False)
  key = jax.random.key(0)
  batch = digits16[:8]
  losses = []
  for _ in range(12):
    state, m = step(state, batch, key)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.6 * losses[0], losses


def test_checkpoint_resume_equals_unbroken_run(tiny, digits16, recon_step, tmp_path):
  cfg, graphdef, params = tiny
  config = _tiny_config()
  tx, step = recon_step
  batch_fn = lambda s: digits16[np.random.default_rng([0, s]).choice(64, 8)]
  meta = {"task": "reconstruct", "model": dataclasses.asdict(cfg)}
  state0 = lainr.init_state(params, tx)
  a, last = lainr.train_loop(str(tmp_path / "a"), config, state0, step, batch_fn, 4, meta)
  lainr.train_loop(str(tmp_path / "b"), config, state0, step, batch_fn, 2, meta)
  b, _ = lainr.train_loop(str(tmp_path / "b"), config, state0, step, batch_fn, 4, meta)
  assert last["step"] == 4 and int(b["step"]) == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  diff = max(np.abs(np.asarray(x) - np.asarray(y)).max() for x, y in
             zip(jax.tree.leaves(a["params"]), jax.tree.leaves(params)))
  assert diff > 1e-4                                    # it did train
  loaded_cfg, _, loaded, _ = lainr.load_trained(str(tmp_path / "b"))
  assert loaded_cfg == cfg
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(b["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  other = {**meta, "model": {**meta["model"], "num_latents": 4}}
  with pytest.raises(lainr.ConfigMismatchError, match="num_latents"):
    lainr.train_loop(str(tmp_path / "b"), config, state0, step, batch_fn, 6, other)


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
  from glue_jax.data import photos
  with pytest.raises(FileNotFoundError, match="not prepared for random access"):
    photos.TfdsImages("imagenette", "train", 32, data_dir=str(tmp_path))
