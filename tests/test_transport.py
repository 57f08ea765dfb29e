"""Interpolants and the multimodal velocity / alignment losses, by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glue_jax.transport import interpolants, losses


@pytest.mark.parametrize("name", ["linear", "gvp"])
def test_split_velocity_inverts_interpolation(name):
  path = interpolants.get(name)
  k = jax.random.split(jax.random.key(0), 2)
  x0 = jax.random.normal(k[0], (4, 3))
  e = jax.random.normal(k[1], (4, 3))
  t = jnp.array([0.1, 0.4, 0.7, 0.95])
  xt, v = path.interpolate(x0, e, t), path.velocity(x0, e, t)
  a, b = path.split_velocity(xt, v, t)
  np.testing.assert_allclose(a, x0, atol=1e-5)
  np.testing.assert_allclose(b, e, atol=1e-5)


def test_linear_path_is_reglue_convention():
  x0, e = jnp.array([[2.0]]), jnp.array([[-1.0]])
  p = interpolants.LINEAR
  assert float(p.interpolate(x0, e, jnp.array([0.0]))[0, 0]) == 2.0    # t=0 data
  assert float(p.interpolate(x0, e, jnp.array([1.0]))[0, 0]) == -1.0   # t=1 noise
  assert float(p.velocity(x0, e, jnp.array([0.3]))[0, 0]) == -3.0      # noise - data
  # SDE drift of REGLUE: d = (2 - t) v + x.
  x, v, t = jnp.array([0.7]), jnp.array([-0.4]), 0.3
  d = v - 0.5 * p.diffusion(t) * p.score(x, v, t)
  np.testing.assert_allclose(d, (2 - t) * v + x, rtol=1e-6)


def test_velocity_loss_hand_computed():
  # B=1, 1x1 spatial, 2 latent + 1 semantic channel, global dim 2, N=1 patch.
  batch = {"x": jnp.array([[[[1.0, 2.0, 3.0]]]]), "y": jnp.array([0]),
           "global": jnp.array([[1.0, -1.0]]),
           "align_target": jnp.array([[[1.0, 0.0]]])}
  noise = jnp.array([[[[0.0, 1.0, 1.0]]]])
  noise_g = jnp.array([[0.0, 1.0]])
  t = jnp.array([0.5])
  seen = {}

  def apply_fn(x_t, tt, y, g_t):
    seen["x_t"], seen["g_t"] = x_t, g_t
    v = jnp.array([[[[0.0, 0.0, 0.0]]]])
    vg = jnp.array([[0.0, 0.0]])
    proj = jnp.array([[[0.0, 1.0], [1.0, 1.0]]])   # token 0 = global slot
    return v, vg, proj

  cfg = losses.LossConfig(latent_channels=2, semantic_weight=0.5, global_weight=0.03,
                          align_weight=0.5)
  loss, aux = losses.velocity_loss(apply_fn, batch, t, noise, noise_g, cfg)
  np.testing.assert_allclose(seen["x_t"], [[[[0.5, 1.5, 2.0]]]])
  np.testing.assert_allclose(seen["g_t"], [[0.5, 0.0]])
  # targets u = noise - x: latent (-1, -1) -> 1.0; semantic (-2) -> 4.0;
  # global (-1, 2) -> 2.5; align: global slot cos((0,1),(1,-1)) = -1/sqrt2,
  # patch cos((1,1),(1,0)) = 1/sqrt2 -> mean(-cos) = 0.
  assert float(aux["latent"]) == pytest.approx(1.0)
  assert float(aux["semantic"]) == pytest.approx(4.0)
  assert float(aux["global"]) == pytest.approx(2.5)
  assert float(aux["align"]) == pytest.approx(0.0, abs=1e-7)
  assert float(loss) == pytest.approx(1.0 + 0.5 * 4.0 + 0.03 * 2.5 + 0.0)


def test_separate_means_not_one_mean_over_channels():
  batch = {"x": jnp.zeros((1, 2, 2, 5)), "y": jnp.zeros((1,), jnp.int32)}
  noise = jnp.zeros((1, 2, 2, 5)).at[..., 0].set(1.0)
  apply_fn = lambda x, t, y, g: (jnp.zeros_like(x), None, None)
  cfg = losses.LossConfig(latent_channels=1, align_weight=0.0)
  loss, aux = losses.velocity_loss(apply_fn, batch, jnp.array([0.5]), noise, None, cfg)
  assert float(aux["latent"]) == 1.0 and float(aux["semantic"]) == 0.0
  assert float(loss) == 1.0          # one mean over 5 channels would give 0.2


def test_semantic_weight_schedule_of_xl():
  cfg = losses.LossConfig(semantic_weight_schedule=((250_000, 0.5), (500_000, 0.25)))
  got = [float(losses.semantic_weight_at(cfg, s)) for s in (0, 249_999, 250_000, 500_000)]
  assert got == [1.0, 1.0, 0.5, 0.25]


def test_alignment_selection_and_errors():
  proj = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
  patches = jnp.array([[[0.0, 2.0], [0.0, -3.0]]])
  glob = jnp.array([[5.0, 0.0]])
  only_g = losses.alignment_loss(proj, patches, glob, align_patches=False, align_global=True)
  only_p = losses.alignment_loss(proj, patches, glob, align_patches=True, align_global=False)
  both = losses.alignment_loss(proj, patches, glob, align_patches=True, align_global=True)
  np.testing.assert_allclose([only_g[0], only_p[0], both[0]], [-1.0, 0.0, -1 / 3], atol=1e-6)
  with pytest.raises(ValueError, match="global"):
    losses.alignment_loss(proj[:, 1:], patches, None, align_patches=False, align_global=True)


def test_time_sampling_ranges():
  for kind in ("uniform", "logit_normal", "lognormal"):
    t = interpolants.sample_time(jax.random.key(0), (1000,), kind)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
  with pytest.raises(ValueError, match="unknown time distribution"):
    interpolants.sample_time(jax.random.key(0), (2,), "beta")
