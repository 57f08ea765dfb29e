"""Samplers with an exact Gaussian velocity field, CFG interval, batching."""
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
