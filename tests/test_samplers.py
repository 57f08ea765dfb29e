"""Samplers with an exact Gaussian velocity field, CFG interval, batching, and
goldens of the official REGLUE/REPA samplers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glue_jax.sampling import guidance, presets, samplers

MU = jnp.array([0.5, -1.0])
STD = jnp.array([0.7, 1.3])
# Data std well below ~0.5 shows the 250-step grid's bias (std 0.3 -> -2.6%).
MU_G, STD_G = jnp.array([2.0, 0.0, -0.5]), jnp.array([0.6, 1.0, 2.0])


def exact_velocity(x, t, mu, s):
  """E[noise - x0 | x_t = x] for x0 ~ N(mu, s^2) on the linear path."""
  t = jnp.reshape(t, (-1,) + (1,) * (x.ndim - 1)) if jnp.ndim(t) else t
  var = (1 - t) ** 2 * s ** 2 + t ** 2
  r = x - (1 - t) * mu
  return t / var * r - (mu + (1 - t) * s ** 2 / var * r)


def gaussian_apply(x, t, y, g):
  v = exact_velocity(x, t, MU, STD)
  vg = None if g is None else exact_velocity(g, t, MU_G, STD_G)
  return v, vg, None


def _check(x, mu, s):
  x = np.asarray(x).reshape(-1, mu.shape[0])
  scale = np.maximum(np.abs(mu), s)
  assert np.all(np.abs(x.mean(0) - mu) < 0.01 * scale), (x.mean(0), mu)
  assert np.all(np.abs(x.std(0) / s - 1) < 0.01), (x.std(0), s)


def _init(n):
  keys = samplers.per_sample_keys(0, jnp.arange(n))
  x1, g1 = samplers.initial_noise(keys, (1, 1, 2), 3)
  return keys, x1, g1


def test_euler_maruyama_recovers_gaussian():
  n = 50_000
  keys, x1, g1 = _init(n)
  vel = guidance.conditional(gaussian_apply)
  run = jax.jit(lambda x, g, k: samplers.euler_maruyama(vel, x, g, jnp.zeros(n, jnp.int32), k))
  x0, g0 = run(x1, g1, keys)
  _check(x0, np.asarray(MU), np.asarray(STD))
  _check(g0, np.asarray(MU_G), np.asarray(STD_G))


def test_heun_recovers_gaussian():
  n = 50_000
  keys, x1, g1 = _init(n)
  vel = guidance.conditional(gaussian_apply)
  x0, g0 = jax.jit(lambda x, g: samplers.heun(vel, x, g, jnp.zeros(n, jnp.int32),
                                              num_steps=50))(x1, g1)
  _check(x0, np.asarray(MU), np.asarray(STD))
  _check(g0, np.asarray(MU_G), np.asarray(STD_G))


def test_sde_grid_is_reglue():
  grid = np.asarray(samplers.sde_time_grid())
  assert grid.shape == (251,) and grid[0] == 1.0 and grid[-1] == 0.0
  np.testing.assert_allclose(grid[249], 0.04, atol=1e-7)
  np.testing.assert_allclose(grid[0] - grid[1], 0.96 / 249, rtol=1e-5)


def label_apply(x, t, y, g):
  """Velocity = label+1 (null label 9 -> 0) for x, and 2*(label+1) for g."""
  c = jnp.where(y == 9, 0.0, y + 1.0)
  return (jnp.broadcast_to(c[:, None, None, None], x.shape),
          jnp.broadcast_to(2 * c[:, None], g.shape), None)


def test_cfg_interval_exactly_unguided_outside():
  vel = guidance.classifier_free(label_apply, null_label=9, scale=3.0,
                                 global_scale=1.5, interval=(0.0, 0.9))
  x, g, y = jnp.ones((2, 1, 1, 1)), jnp.ones((2, 4)), jnp.array([0, 4])
  v_out, vg_out = jax.jit(vel)(x, g, jnp.float32(0.95), y)
  v_ref, vg_ref, _ = label_apply(x, None, y, g)
  np.testing.assert_array_equal(v_out, v_ref)
  np.testing.assert_array_equal(vg_out, vg_ref)
  v_in, vg_in = jax.jit(vel)(x, g, jnp.float32(0.9), y)
  np.testing.assert_allclose(v_in[:, 0, 0, 0], 3.0 * np.array([1.0, 5.0]))
  np.testing.assert_allclose(vg_in[:, 0], 1.5 * 2 * np.array([1.0, 5.0]))


def test_scale_one_is_plain_conditional():
  vel = guidance.classifier_free(label_apply, null_label=9, scale=1.0)
  x, g, y = jnp.ones((2, 1, 1, 1)), jnp.ones((2, 4)), jnp.array([0, 4])
  np.testing.assert_array_equal(vel(x, g, 0.5, y)[0], label_apply(x, 0.5, y, g)[0])


def test_samples_independent_of_batching():
  keys, x1, g1 = _init(6)
  y = jnp.arange(6) % 3
  vel = guidance.classifier_free(gaussian_apply, null_label=9, scale=2.0)
  run = jax.jit(lambda x, g, yy, k: samplers.euler_maruyama(vel, x, g, yy, k, num_steps=20))
  full = run(x1, g1, y, keys)
  part = run(x1[2:5], g1[2:5], y[2:5], keys[2:5])
  np.testing.assert_allclose(full[0][2:5], part[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(full[1][2:5], part[1], rtol=1e-6, atol=1e-6)


def test_preset_roundtrip_and_nfe():
  p = presets.PRESETS["reglue"]
  assert presets.SamplerPreset.from_dict(p.to_dict()) == p
  assert presets.nfe(p) == 250 and presets.nfe(p.replace(sampler="ode", num_steps=50)) == 99
  with pytest.raises(ValueError, match="unknown sampler preset keys"):
    presets.SamplerPreset.from_dict({"cfg": 2})


# ------------------------------------------- official sampler behaviour (goldens)
#
# tests/fixtures/golden/official_samplers.npz holds numbers only, made once by
# running the official samplers unmodified (REGLUE giorgospets/reglue@90a20d4
# samplers.py euler_maruyama_sampler; REPA sihyun-yu/REPA@67f7145 samplers.py
# euler_sampler with heun=True) in float64 torch, outside this repository, on
# the analytic class-conditional field of `_toy_apply` below (official null
# label 1000 -> our null label 3), with torch.randn_like replaced by the stored
# noise queue (x then [CLS], per step).  Inputs: x1 / cls1 (NCHW), y, noise_x /
# noise_cls; outputs: one NCHW array per case in `cases_json` = (cfg_scale,
# cls_cfg_scale, guidance_low, guidance_high, vae_cfg) for SDE cases, and
# (num_steps, cfg_scale, guidance_low, guidance_high) for the Heun cases.
# Our samplers run in float32: tolerance 2e-5 absolute on outputs of size ~5
# (a few float32 ulps over 12-50 steps); every pinned rule moves the outputs
# by > 1e-2.

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "official_samplers.npz")
TOL = 2e-5


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    out = {k: f[k] for k in f.files}
  out["cases"] = json.loads(str(out.pop("cases_json")))
  return out


def _gauss_vel(x, t, mu, s):
  var = (1 - t) ** 2 * s ** 2 + t ** 2
  r = x - (1 - t) * mu
  return t / var * r - (mu + (1 - t) * s ** 2 / var * r)


def _toy_apply(gd, channels=6):
  """The golden field: per-class Gaussian velocities coupled through tanh means."""
  m, mc = jnp.asarray(gd["M"][:, :channels], jnp.float32), jnp.asarray(gd["MC"], jnp.float32)
  s, sc = jnp.asarray(gd["S"][:channels], jnp.float32), jnp.asarray(gd["SC"], jnp.float32)

  def apply(x, t, y, g):
    if g is None:
      return _gauss_vel(x, t, m[y][:, None, None, :], s), None, None
    mu = m[y][:, None, None, :] + 0.3 * jnp.tanh(g.mean(1))[:, None, None, None]
    muc = mc[y] + 0.3 * jnp.tanh(x.mean((1, 2, 3)))[:, None]
    return _gauss_vel(x, t, mu, s), _gauss_vel(g, t, muc, sc), None
  return apply


def _nhwc(a):
  return jnp.asarray(np.moveaxis(a, -3, -1), jnp.float32)


def _run_sde(gd, monkeypatch, cfg, cls_cfg, lo, hi, vae_cfg):
  nx, ng = _nhwc(gd["noise_x"]), jnp.asarray(gd["noise_cls"], jnp.float32)
  monkeypatch.setattr(samplers, "_step_noise", lambda keys, i, x, g: (nx[i], ng[i]))
  preset = presets.SamplerPreset(num_steps=len(nx) + 1, cfg_scale=cfg,
                                 global_cfg_scale=cls_cfg, interval=(lo, hi), vae_cfg=vae_cfg)
  run = presets.make_sampler(_toy_apply(gd), preset, null_label=3, latent_channels=4)
  y = jnp.asarray(gd["y"], jnp.int32)
  x0, _ = jax.jit(run)(_nhwc(gd["x1"]), jnp.asarray(gd["cls1"], jnp.float32), y,
                       samplers.per_sample_keys(0, jnp.arange(len(y))))
  return np.moveaxis(np.asarray(x0), -1, 1)


@pytest.mark.parametrize("case", ["sde_standard", "sde_cfg1_cls2", "sde_cfg07_cls2",
                                  "sde_cls0", "sde_clsneg", "sde_vae",
                                  "sde_vae_hi_interval"])
def test_sde_matches_official_reglue_sampler(golden, monkeypatch, case):
  """Issue 19 items 2-4: cfg <= 1 guides nothing ([CLS] included); [CLS]
  scale <= 0 gives the conditional [CLS]; vae_cfg guides the 4 latent
  channels as cond + w (cond - uncond), semantics conditional, and the last
  step with the standard formula (inside the interval) or not at all."""
  np.testing.assert_allclose(_run_sde(golden, monkeypatch, *golden["cases"][case]),
                             golden[case], atol=TOL, rtol=0)


def test_official_sde_goldens_distinguish_the_rules(golden):
  """The pinned rules are visible: each golden differs from its alternatives."""
  far = lambda a, b: np.abs(golden[a] - golden[b]).max() > 1e-2
  assert np.array_equal(golden["sde_cfg1_cls2"], golden["sde_cfg07_cls2"])
  assert np.array_equal(golden["sde_cls0"], golden["sde_clsneg"])
  assert far("sde_standard", "sde_cls0") and far("sde_standard", "sde_vae")
  assert far("sde_vae", "sde_vae_hi_interval") and far("sde_standard", "sde_cfg1_cls2")


def test_sde_cfg_one_is_unguided_even_for_cls(golden, monkeypatch):
  """cfg_scale <= 1 with a [CLS] scale != 1 equals plain conditional sampling."""
  want = _run_sde(golden, monkeypatch, 1.0, 1.0, 0.0, 1.0, False)
  for cfg in (1.0, 0.7, 0.0):
    np.testing.assert_array_equal(_run_sde(golden, monkeypatch, cfg, 2.0, 0.0, 0.9, False), want)


@pytest.mark.parametrize("case", ["ode_hi075", "ode_lo015", "ode_50_hi07", "ode_cfg1",
                                  "ode_cfg05"])
def test_heun_matches_official_repa_sampler(golden, case):
  """Issue 19 item 1: the corrector is guided iff t_cur is in the interval
  (REPA), and grid points equal to a bound count as inside (50 steps: t=0.7)."""
  n, cfg, lo, hi = golden["cases"][case]
  preset = presets.SamplerPreset(sampler="ode", num_steps=n, cfg_scale=cfg, interval=(lo, hi))
  run = presets.make_sampler(_toy_apply(golden, 4), preset, null_label=3)
  y = jnp.asarray(golden["y"], jnp.int32)
  x0, _ = jax.jit(run)(_nhwc(golden["x1_repa"]), None, y, None)
  np.testing.assert_allclose(np.moveaxis(np.asarray(x0), -1, 1), golden[case], atol=TOL, rtol=0)


def test_heun_corrector_guide_switch(golden):
  """'t_next' (the old rule) differs from REPA's where the interval splits a step."""
  vel = guidance.classifier_free(_toy_apply(golden, 4), null_label=3, scale=1.8,
                                 interval=(0.0, 0.75))
  y = jnp.asarray(golden["y"], jnp.int32)
  x1 = _nhwc(golden["x1_repa"])
  run = lambda mode: np.moveaxis(np.asarray(jax.jit(lambda x: samplers.heun(
      vel, x, None, y, num_steps=10, corrector_guide=mode))(x1)[0]), -1, 1)
  np.testing.assert_allclose(run("t_cur"), golden["ode_hi075"], atol=TOL, rtol=0)
  assert np.abs(run("t_next") - golden["ode_hi075"]).max() > 1e-2
  with pytest.raises(ValueError, match="corrector_guide"):
    samplers.heun(vel, x1, None, y, corrector_guide="mid")


def test_grids_follow_torch_linspace():
  """float64 torch.linspace rounded to float32: REPA's 50-step t=0.7 is 0.7."""
  np.testing.assert_array_equal(np.asarray(samplers.ode_time_grid(50))[15], np.float32(0.7))
  np.testing.assert_allclose(samplers.linspace64(1.0, 0.04, 250)[[0, 249]], [1.0, 0.04])


def test_vae_cfg_preset_and_errors():
  p = presets.PRESETS["reglue_vae_cfg"]
  assert p.vae_cfg and p.cfg_scale == 2.8 and p.interval == (0.0, 0.9)
  assert presets.SamplerPreset.from_dict(p.to_dict()) == p
  assert not presets.SamplerPreset.from_dict({"cfg_scale": 2.0}).vae_cfg   # old presets
  with pytest.raises(ValueError, match="latent_channels"):
    presets.make_sampler(gaussian_apply, p, null_label=9)
  with pytest.raises(ValueError, match="CFG mode"):
    guidance.classifier_free(gaussian_apply, null_label=9, scale=2.0, mode="semantic")
