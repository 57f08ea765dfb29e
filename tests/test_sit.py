"""The SiT family: parameter counts, layout, scan/remat/dropout behaviour."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glue_jax import models, sharding
from glue_jax.models import layers, sit

REGLUE_EXTRAS = dict(semantic_channels=16, global_token_dim=768, projector_out_dim=768)


@pytest.mark.parametrize("model,extras,expected", [
    ("B/2", REGLUE_EXTRAS, 131_584_592),   # spec: REGLUE B/2 131.58M
    ("XL/2", REGLUE_EXTRAS, 676_737_488),  # spec: REGLUE XL/2 676.74M
    ("B/2", {}, 130_303_504),              # spec: SiT B/2 130.3M
    ("XL/2", {}, 674_816_272),             # spec: SiT XL/2 674.8M
])
def test_parameter_counts(model, extras, expected):
  cfg = sit.config_for(model, **extras)
  net = nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))
  # Excluding the REPA projector (dropped at inference) as the papers do.
  assert sit.count_params(net, exclude="projector") == expected


def test_projector_size_matches_official():
  cfg = sit.config_for("B/2", **REGLUE_EXTRAS)
  net = nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))
  total = sit.count_params(net)
  assert total - sit.count_params(net, exclude="projector") == 7_344_896


def _tiny(**kw):
  base = dict(input_size=8, patch_size=2, latent_channels=4, semantic_channels=2,
              hidden_size=32, depth=3, num_heads=4, num_classes=5,
              global_token_dim=6, projector_out_dim=7, projector_dim=16,
              encoder_depth=2)
  base.update(kw)
  return sit.SiTConfig(**base)


class Jitted:
  """Runs a network's forward under jax.jit (eager NNX is slow on CPU)."""

  def __init__(self, graphdef, state):
    self.graphdef, self.state = graphdef, state
    self._f = jax.jit(lambda st, *a, **kw: nnx.merge(graphdef, st)(*a, **kw),
                      static_argnames=("train",))

  def __call__(self, *args, **kw):
    return self._f(self.state, *args, **kw)


def _perturbed(cfg, seed=0):
  graphdef, state = models.init("sit", cfg, seed=seed)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return Jitted(graphdef, jax.tree.unflatten(tree, leaves))


def _inputs(cfg, b=3):
  k = jax.random.split(jax.random.key(5), 2)
  x = jax.random.normal(k[0], (b, cfg.input_size, cfg.input_size, cfg.in_channels))
  g = jax.random.normal(k[1], (b, cfg.global_token_dim)) if cfg.global_token_dim else None
  return x, jnp.array([0.1, 0.5, 0.9][:b]), jnp.array([0, 3, cfg.num_classes][:b]), g


def test_output_shapes_and_init_zero_heads():
  cfg = _tiny()
  net = Jitted(*models.init("sit", cfg))
  x, t, y, g = _inputs(cfg)
  v, vg, proj = net(x, t, y, g)
  assert v.shape == x.shape and vg.shape == g.shape
  assert proj.shape == (3, cfg.num_tokens, cfg.projector_out_dim)
  # adaLN-Zero + zero heads: outputs are exactly zero at initialisation.
  assert float(jnp.abs(v).max()) == 0.0 and float(jnp.abs(vg).max()) == 0.0


def test_scan_equals_unrolled_and_remat():
  cfg = _tiny()
  x, t, y, g = _inputs(cfg)
  base = _perturbed(cfg)
  ref = base(x, t, y, g)
  for kw in (dict(scan_layers=False), dict(remat="full")):
    graphdef = nnx.graphdef(models.build("sit", dataclasses.replace(cfg, **kw),
                                         abstract=True))
    out = Jitted(graphdef, base.state)(x, t, y, g)
    for a, b in zip(out, ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_label_dropout_only_in_training_and_matches_null_class():
  cfg = _tiny(class_dropout_prob=0.5)
  net = _perturbed(cfg)
  x, t, y, g = _inputs(cfg)
  y = jnp.array([0, 1, 2])
  a = net(x, t, y, g)[0]
  b = net(x, t, y, g, train=False, key=jax.random.key(0))[0]
  np.testing.assert_array_equal(a, b)
  key = jax.random.key(3)
  drop = jax.random.uniform(key, (3,)) < 0.5
  c = net(x, t, y, g, train=True, key=key)[0]
  d = net(x, t, jnp.where(drop, cfg.num_classes, y), g)[0]
  np.testing.assert_allclose(c, d, rtol=1e-6)
  with pytest.raises(ValueError, match="PRNG key"):
    net(x, t, y, g, train=True)


def test_bad_inputs_are_clear_errors():
  cfg = _tiny()
  net = nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))
  x, t, y, g = _inputs(cfg)
  with pytest.raises(ValueError, match=r"expects \(B, 8, 8, 6\)"):
    net(x[..., :4], t, y, g)
  with pytest.raises(ValueError, match="global_token"):
    net(x, t, y, None)


def test_patchify_roundtrip_and_layout():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  p = layers.patchify(x, 2)
  assert p.shape == (2, 6, 12)
  # token 1 = row 0, col 1 (row-major); vector layout (p_row, p_col, C).
  np.testing.assert_array_equal(p[0, 1, :3], x[0, 0, 2])
  np.testing.assert_array_equal(p[0, 1, 6:9], x[0, 1, 2])
  np.testing.assert_array_equal(layers.unpatchify(p, 2, 3, (2, 3)), x)


def test_sincos_first_half_encodes_column():
  emb = layers.sincos_2d(8, 3, extra_tokens=1)
  assert emb.shape == (10, 8) and not emb[0].any()
  tab = emb[1:].reshape(3, 3, 8)
  np.testing.assert_array_equal(tab[0, :, :4], tab[2, :, :4])   # same column
  np.testing.assert_array_equal(tab[:, 0, 4:], tab[:, 2, 4:])   # same row


def test_logical_axes_on_every_param_and_specs():
  cfg = _tiny()
  net = nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(net)
  specs = sharding.param_specs(state, sharding.DEFAULT_RULES)
  flat = dict(nnx.to_flat_state(specs))
  assert flat[("blocks", "attn", "qkv", "kernel")] == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  for path, var in nnx.to_flat_state(state):
    assert var.get_metadata().get("logical_axes") is not None, path


def test_bfloat16_compute_close_to_float32():
  cfg = _tiny()
  base = _perturbed(cfg)
  x, t, y, g = _inputs(cfg)
  ref = base(x, t, y, g)
  graphdef = nnx.graphdef(models.build("sit", dataclasses.replace(cfg, dtype="bfloat16"),
                                       abstract=True))
  out = Jitted(graphdef, base.state)(x, t, y, g)
  for a, b in zip(out, ref):
    assert a.dtype == jnp.float32                      # outputs and params stay fp32
    rel = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    assert rel < 5e-2, rel


def test_narrow_hidden_size_warns_and_outputs_span_only_hidden_dims(caplog):
  """hidden_size < patch^2 x channels: a warning, and indeed every token's
  velocity lies in a hidden_size-dim affine subspace (so that part of the noise
  can never be removed by a sampler)."""
  import logging
  with caplog.at_level(logging.WARNING):
    models.init("sit", _tiny())                               # 32 >= 4 * 6: silent
  assert "cannot be denoised" not in caplog.text
  cfg = _tiny(hidden_size=8, num_heads=2, projector_dim=8)    # 8 < 4 * 6 = 24
  with caplog.at_level(logging.WARNING):
    graphdef, state = models.init("sit", cfg)
  assert "16 output directions per token cannot be denoised" in caplog.text
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape, a.dtype)
                                       if jnp.issubdtype(a.dtype, jnp.floating) else a
                                       for a, k in zip(leaves, keys)])   # non-zero heads
  x, t, y, g = _inputs(cfg)
  v = Jitted(graphdef, state)(x, t, y, g)[0]
  p = cfg.patch_size
  tokens = v.reshape(3, 4, p, 4, p, cfg.in_channels).transpose(0, 1, 3, 2, 4, 5)
  tokens = np.asarray(tokens.reshape(-1, p * p * cfg.in_channels), np.float64)
  assert tokens.shape[0] > 2 * cfg.hidden_size
  s = np.linalg.svd(tokens - tokens.mean(0), compute_uv=False)
  assert s[cfg.hidden_size] < 1e-5 * s[0] and s[cfg.hidden_size - 1] > 1e-3 * s[0]
