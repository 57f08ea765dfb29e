"""GLoD composition: CFG limit, locality of local terms, batching, variants, masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glue_jax.models import sit
from glue_jax.sampling import compose, guidance, samplers

L, NULL = 4, 7


def random_params(cfg, seed=0, std=0.1):
  """A prompt SiT with random (non-zero-head) weights, built without compiling init."""
  abstract = nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(std * rng.standard_normal(a.shape), a.dtype),
                        nnx.to_pure_dict(state))
  return graphdef, params


@pytest.fixture(scope="module")
def model():
  """REGLUE-like state: 4 latent + 2 semantic channels and a global token."""
  cfg = sit.SiTConfig(input_size=8, patch_size=2, latent_channels=4, semantic_channels=2,
                      global_token_dim=3, hidden_size=16, depth=1, num_heads=2,
                      num_classes=NULL, prompt_length=L)
  graphdef, params = random_params(cfg)
  apply = lambda x, t, y, g: nnx.merge(graphdef, params)(x, t, y, g)
  return cfg, apply, batch_invariant(apply)


def batch_invariant(apply):
  """The model run one sample at a time: its rounding no longer depends on the
  batch size (XLA CPU's matmul blocking does), so equalities can be exact."""
  def run(x, t, y, g):
    def one(args):
      xx, yy, gg = args
      v, vg, _ = apply(xx[None], t, yy[None], gg[None])
      return v[0], vg[0]
    v, vg = jax.lax.map(one, (x, y, g))
    return v, vg, None
  return run


def _scene(b=2, nl=2):
  rng = np.random.default_rng(1)
  null = np.full((b, L), NULL, np.int32)
  glob = rng.integers(0, NULL, (b, 1, L)).astype(np.int32)
  loc = rng.integers(0, NULL, (b, nl, L)).astype(np.int32)
  boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 0.75]])[:nl]
  masks = np.broadcast_to(compose.box_masks(boxes, 8, 8), (b, nl, 8, 8))
  return null, glob, loc, masks


def _state(cfg, b=2):
  k = jax.random.split(jax.random.key(0), 2)
  return (jax.random.normal(k[0], (b, 8, 8, cfg.in_channels)),
          jax.random.normal(k[1], (b, cfg.global_token_dim)))


def test_zero_local_weights_is_exactly_cfg(model):
  cfg, _, apply = model
  null, glob, loc, masks = _scene()
  x, g = _state(cfg)
  cfg_vel = guidance.classifier_free(apply, null_label=NULL, scale=2.5)
  vel = compose.composed_velocity(apply)
  keys = samplers.per_sample_keys(0, jnp.arange(2))
  x1, g1 = samplers.initial_noise(keys, (8, 8, cfg.in_channels), cfg.global_token_dim)

  @jax.jit
  def run(c):
    y = c.globals_[:, 0]
    return (vel(x, g, jnp.float32(0.6), c), cfg_vel(x, g, jnp.float32(0.6), y),
            # whole SDE trajectories from the same per-sample keys
            samplers.euler_maruyama(vel, x1, g1, c, keys, num_steps=3),
            samplers.euler_maruyama(cfg_vel, x1, g1, y, keys, num_steps=3))
  for variant in "ABC":      # the variant is data: one compiled function
    conds = compose.make_conditions(null, glob, loc, masks, global_weights=2.5,
                                    local_weights=0.0, variant=variant)
    (v, vg), (v_ref, vg_ref), (x0, g0), (x0_ref, g0_ref) = run(conds)
    for got, want in ((v, v_ref), (vg, vg_ref), (x0, x0_ref), (g0, g0_ref)):
      np.testing.assert_array_equal(got, want)


def test_local_term_changes_nothing_outside_its_mask_and_batching(model):
  cfg, apply, _ = model
  null, glob, loc, masks = _scene()
  x, g = _state(cfg)
  with_local = compose.make_conditions(null, glob, loc, masks, global_weights=2.0,
                                       local_weights=[3.0, 0.0], variant="B")
  without = with_local._replace(local_weights=jnp.zeros_like(with_local.local_weights))
  batched = compose.composed_velocity(apply)
  separate = compose.composed_velocity(apply, batch_conditions=False)
  run = jax.jit(lambda c: (batched(x, g, jnp.float32(0.5), c),
                           separate(x, g, jnp.float32(0.5), c)))
  (v, vg), (v_sep, vg_sep) = run(with_local)
  (v0, vg0), _ = run(without)
  outside = masks[:, 0] == 0
  np.testing.assert_array_equal(np.asarray(v)[outside], np.asarray(v0)[outside])
  assert float(np.abs(np.asarray(v - v0)[~outside]).min()) > 0   # every masked cell moves
  np.testing.assert_array_equal(vg, vg0)          # the global token ignores locals
  # One batched call over all conditions == one call per condition.
  np.testing.assert_allclose(v, v_sep, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vg, vg_sep, rtol=1e-6, atol=1e-6)


def table_apply(x, t, y, g):
  """Velocity = (first token id + 1) * pattern(x): a per-pixel model; null -> 0."""
  c = jnp.where(y[:, 0] == NULL, 0.0, y[:, 0] + 1.0)
  v = c[:, None, None, None] * (1.0 + 0.1 * x)
  vg = None if g is None else 10.0 * c[:, None] + 0 * g
  return v, vg, None


def test_variant_formulas_overlap_and_interval():
  b, h = 1, 4
  null = np.full((b, L), NULL, np.int32)
  glob = np.array([[[1] + [NULL] * 3, [2] + [NULL] * 3]], np.int32)     # v_g = 2, 3
  loc = np.array([[[4] + [NULL] * 3, [5] + [NULL] * 3]], np.int32)      # v_l = 5, 6
  m = np.zeros((b, 2, h, h), np.float32)
  m[0, 0, :2, :] = 1                       # rows 0-1
  m[0, 1, 1:3, :] = 1                      # rows 1-2 (row 1 overlaps)
  x = jnp.zeros((b, h, h, 1))
  g = jnp.zeros((b, 2))
  wg, wl = np.array([1.5, 0.5]), np.array([2.0, 3.0])
  parents = np.array([0, 1])

  vels = {iv: jax.jit(compose.composed_velocity(table_apply, local_interval=iv))
          for iv in ((0.0, 1.0), (0.0, 0.9))}

  def run(variant, overlap="sum", t=0.5, interval=(0.0, 1.0)):
    c = compose.make_conditions(null, glob, loc, m, global_weights=wg, local_weights=wl,
                                parents=parents, variant=variant, overlap=overlap)
    v, vg = vels[interval](x, g, jnp.float32(t), c)
    return np.asarray(v)[0, :, 0, 0], np.asarray(vg)[0]

  vgl, vl = np.array([2.0, 3.0]), np.array([5.0, 6.0])
  glob_term = 1.5 * 2 + 0.5 * 3
  masks = [m[0, j, :, 0].astype(float) for j in range(2)]
  # A: ref = v_0 = 0.
  want_a = glob_term + wl[0] * masks[0] * vl[0] + wl[1] * masks[1] * vl[1]
  np.testing.assert_allclose(run("A")[0], want_a, rtol=1e-6)
  # B: ref = the parent global's velocity.
  want_b = glob_term + wl[0] * masks[0] * (vl[0] - vgl[0]) + wl[1] * masks[1] * (vl[1] - vgl[1])
  np.testing.assert_allclose(run("B")[0], want_b, rtol=1e-6)
  # C: each global term removed inside its own children's masks.
  want_c = (1.5 * 2 * (1 - masks[0]) + 0.5 * 3 * (1 - masks[1])
            + wl[0] * masks[0] * vl[0] + wl[1] * masks[1] * vl[1])
  np.testing.assert_allclose(run("C")[0], want_c, rtol=1e-6)
  # Overlap rules on row 1 (both masks).
  avg = run("B", "average")[0]
  np.testing.assert_allclose(avg[1], glob_term + 0.5 * (2 * 3 + 3 * 3), rtol=1e-6)
  pri = run("B", "priority")[0]
  np.testing.assert_allclose(pri[1], glob_term + 3 * 3, rtol=1e-6)     # the later local wins
  np.testing.assert_allclose(pri[[0, 2]], want_b[[0, 2]], rtol=1e-6)
  # Outside the local interval: plain guidance with the globals only, everywhere.
  np.testing.assert_allclose(run("C", t=0.95, interval=(0.0, 0.9))[0], [glob_term] * h)
  # The global token is guided by the globals only.
  np.testing.assert_allclose(run("A")[1], [10 * glob_term] * 2, rtol=1e-6)


def test_sampling_trajectory_outside_masks_unchanged_for_local_model():
  """With a per-pixel model, a local term cannot leak out of its hard mask."""
  null = np.full((2, L), NULL, np.int32)
  glob = np.full((2, 1, L), 1, np.int32)
  loc = np.full((2, 1, L), 4, np.int32)
  masks = compose.box_masks(np.array([[[0.25, 0.25, 0.75, 0.6]]] * 2), 4, 4)
  keys = samplers.per_sample_keys(3, jnp.arange(2))
  run = jax.jit(lambda c: compose.sample(table_apply, c, keys, (4, 4, 1), num_steps=10)[0])
  out = {}
  for w in (0.0, 2.0):
    c = compose.make_conditions(null, glob, loc, masks, global_weights=1.5, local_weights=w)
    out[w] = np.asarray(run(c))
  inside = masks[:, 0] > 0
  np.testing.assert_array_equal(out[0.0][~inside], out[2.0][~inside])
  assert np.abs(out[0.0][inside] - out[2.0][inside]).min() > 0


def test_box_masks_feather_and_errors():
  m = compose.box_masks(np.array([[0.0, 0.0, 0.5, 0.25], [0.6, 0.6, 0.62, 0.62]]), 4, 4)
  np.testing.assert_array_equal(m[0], [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  assert m[1].sum() == 1 and m[1][2, 2] == 1            # tiny box keeps one cell
  # A box over cells 1.3..3.7: its corner cells are only 0.7*0.7 = 0.49
  # covered, yet the mask is the full 3x3 rectangle (not a plus shape).
  c = compose.box_masks(np.array([1.3, 1.3, 3.7, 3.7]) / 8, 8, 8)
  np.testing.assert_array_equal(np.argwhere(c), [(i, j) for i in (1, 2, 3) for j in (1, 2, 3)])
  soft = compose.feather(m[:1], 1.0)
  assert np.all(soft[0][m[0] > 0] == 1.0)               # inside stays 1
  assert 0 < soft[0][1, 0] < 1 and soft[0][3, 3] < soft[0][1, 0]
  null = np.full((1, L), NULL)
  with pytest.raises(ValueError, match="variant"):
    compose.make_conditions(null, null[:, None], null[:, None], m[None, :1],
                            global_weights=1, local_weights=1, variant="D")
  with pytest.raises(ValueError, match="masks"):
    compose.make_conditions(null, null[:, None], null[:, None], m[:1],
                            global_weights=1, local_weights=1)
  with pytest.raises(ValueError, match="parents"):
    compose.make_conditions(null, null[:, None], null[:, None], m[None, :1],
                            global_weights=1, local_weights=1, parents=[1])


def test_layout_guidance_descends_the_energy():
  """grad term added to v moves x (dt < 0) towards attention inside the box."""
  b, grid = 1, 4
  rng = np.random.default_rng(0)
  proj = jnp.asarray(rng.standard_normal((L,)), jnp.float32)

  def attention_fn(x, t, y, g):      # (B, 16, L) softmax over tokens of x-dependent logits
    logits = x.reshape(x.shape[0], grid * grid, 1) * proj[None, None]
    return jax.nn.softmax(logits, axis=1) * 0.5
  null = np.full((b, L), NULL)
  glob = np.array([[[1, 2, NULL, NULL]]])
  masks = compose.box_masks(np.array([[[0.0, 0.0, 0.5, 0.5]]]), grid, grid)
  c = compose.make_conditions(null, glob, glob, masks, global_weights=1.0, local_weights=1.0,
                              object_tokens=np.array([[[True, False, False, False]]]))
  layout = compose.LayoutGuidance(attention_fn, scale=1.0, t_min=0.5)
  x = jnp.asarray(rng.standard_normal((b, grid, grid, 1)), jnp.float32)
  zero = lambda x, t, y, g: (jnp.zeros_like(x), None, None)
  vel = jax.jit(compose.composed_velocity(zero, layout=layout))
  energy = lambda xx: compose.layout_energy(attention_fn(xx, 0, 0, 0)[None], c, grid)[0]
  v, _ = vel(x, None, jnp.float32(0.9), c)
  assert float(jnp.abs(v).max()) > 0
  assert float(energy(x + (-0.1) * v)) < float(energy(x))
  v_late, _ = vel(x, None, jnp.float32(0.3), c)        # after t_min: no guidance
  np.testing.assert_array_equal(v_late, 0.0)
