"""Prompt conditioning of the SiT family: shapes, dropout, null prompt, params."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glue_jax.models import sit
from glue_jax.sampling import guidance

L = 5


def _cfg(**kw):
  base = dict(input_size=8, patch_size=2, latent_channels=4, hidden_size=32, depth=2,
              num_heads=4, num_classes=9, prompt_length=L, class_dropout_prob=0.5)
  base.update(kw)
  return sit.SiTConfig(**base)


def _perturbed(cfg, seed=0):
  """Random non-zero weights (host RNG: no initialiser to compile)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.map(
      lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), nnx.to_pure_dict(state))


@pytest.fixture(scope="module")
def tokens_net():
  cfg = _cfg(global_token_dim=6, projector_out_dim=7, projector_dim=16, encoder_depth=1,
             prompt_pooled=True)
  graphdef, state = _perturbed(cfg)
  f = jax.jit(lambda st, *a, **kw: nnx.merge(graphdef, st)(*a, **kw),
              static_argnames=("train",))
  return cfg, graphdef, state, lambda *a, **kw: f(state, *a, **kw)


def _inputs(cfg, b=3):
  k = jax.random.split(jax.random.key(5), 2)
  x = jax.random.normal(k[0], (b, cfg.input_size, cfg.input_size, cfg.in_channels))
  g = jax.random.normal(k[1], (b, cfg.global_token_dim)) if cfg.global_token_dim else None
  y = jnp.array([[0, 1, 2, 9, 9], [3, 4, 9, 9, 9], [9] * L])[:b]
  return x, jnp.array([0.1, 0.5, 0.9])[:b], y, g


def test_shapes_and_prompt_changes_output(tokens_net):
  cfg, _, _, net = tokens_net
  x, t, y, g = _inputs(cfg)
  v, vg, proj = net(x, t, y, g)
  assert v.shape == x.shape and vg.shape == g.shape
  # The projector and heads see image (+ global) tokens only.
  assert proj.shape == (3, cfg.num_tokens, 7) and cfg.num_tokens == 17
  v2 = net(x, t, y.at[0, 0].set(5), g)[0]
  assert float(jnp.abs(v2[0] - v[0]).max()) > 1e-4          # the prompt matters
  np.testing.assert_array_equal(v2[1:], v[1:])               # per-sample


def test_prompt_dropout_replaces_whole_prompt_by_null(tokens_net):
  cfg, _, _, net = tokens_net
  x, t, y, g = _inputs(cfg)
  np.testing.assert_array_equal(net(x, t, y, g)[0], net(x, t, y, g, key=jax.random.key(0))[0])
  key = jax.random.key(3)
  drop = np.asarray(jax.random.uniform(key, (3,)) < cfg.class_dropout_prob)
  assert drop.any() and not drop.all()                       # the key exercises both
  dropped = jnp.where(drop[:, None], cfg.null_label, y)
  a = net(x, t, y, g, train=True, key=key)[0]
  b = net(x, t, dropped, g)[0]
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="PRNG key"):
    net(x, t, y, g, train=True)


def test_null_prompt_is_full_like_null_label_and_cfg_runs(tokens_net):
  cfg, _, _, net = tokens_net
  x, t, y, g = _inputs(cfg)
  null = jnp.full_like(y, cfg.null_label)
  assert np.all(np.asarray(null) == cfg.num_classes)
  apply = lambda xx, tt, yy, gg: net(xx, tt, yy, gg)
  vel = guidance.classifier_free(apply, null_label=cfg.null_label, scale=3.0)
  v, vg = vel(x, g, jnp.float32(0.5), y)
  vc, vgc, _ = net(x, 0.5, y, g)
  vu, vgu, _ = net(x, 0.5, null, g)
  np.testing.assert_allclose(v, vu + 3.0 * (vc - vu), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vg, vgu + 3.0 * (vgc - vgu), rtol=1e-5, atol=1e-6)


def test_bad_prompt_shape_is_clear_error():
  cfg = _cfg()
  net = nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, 8, 8, 4))
  with pytest.raises(ValueError, match=r"expects \(B, 5\)"):
    net(x, 0.5, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="num_classes=0"):
    _cfg(prompt_embed_dim=4)
  with pytest.raises(ValueError, match="prompt_length"):
    _cfg(prompt_length=0, prompt_embed_dim=4)


def test_new_params_only_with_prompts():
  names = lambda cfg: {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(
      nnx.state(nnx.eval_shape(lambda: sit.SiT(cfg, rngs=nnx.Rngs(0)))))}
  plain = names(_cfg(prompt_length=0))
  assert "y_embed" in plain and not any("prompt" in n for n in plain)
  tok = names(_cfg())
  assert {"prompt_table", "prompt_pos"} <= tok and "y_embed" not in tok
  emb = names(_cfg(num_classes=0, prompt_embed_dim=4))
  assert {"prompt_in/kernel", "prompt_null", "prompt_pos"} <= emb
  assert "prompt_pool/kernel" in names(_cfg(prompt_pooled=True)) and "prompt_pool/kernel" not in tok
  # Same tree apart from the conditioning: prompts add L*d + (V+1)*d, drop (C+1)*d.
  cfg = _cfg()
  count = lambda c: sit.count_params(nnx.eval_shape(lambda: sit.SiT(c, rngs=nnx.Rngs(0))))
  d = cfg.hidden_size
  assert count(cfg) - count(dataclasses.replace(cfg, prompt_length=0)) == L * d


def test_embedding_prompts_zero_vectors_are_null():
  cfg = _cfg(num_classes=0, prompt_embed_dim=4)
  graphdef, state = _perturbed(cfg)
  f = jax.jit(lambda st, *a, **kw: nnx.merge(graphdef, st)(*a, **kw),
              static_argnames=("train",))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
  y = jax.random.normal(jax.random.key(2), (3, L, 4)).at[:, 3:].set(0.0)
  key = jax.random.key(3)
  drop = np.asarray(jax.random.uniform(key, (3,)) < cfg.class_dropout_prob)
  a = f(state, x, 0.3, y, train=True, key=key)[0]
  b = f(state, x, 0.3, jnp.where(drop[:, None, None], 0.0, y))[0]
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  null = f(state, x, 0.3, jnp.full_like(y, cfg.null_label))[0]
  assert float(jnp.abs(null - f(state, x, 0.3, y)[0]).max()) > 1e-4


def test_prompt_attention_maps(tokens_net):
  cfg, graphdef, state, _ = tokens_net
  x, t, y, g = _inputs(cfg)
  att_fn = jax.jit(lambda st, xx: nnx.merge(graphdef, st).prompt_attention(
      xx, t, y, g, blocks=(0, 1)))
  att = att_fn(state, x)
  assert att.shape == (3, cfg.grid_size ** 2, L)
  s = np.asarray(att.sum(-1))
  assert np.all(s > 0) and np.all(s < 1)       # part of the softmax mass over the sequence
  grad = jax.grad(lambda xx: att_fn(state, xx)[:, :4, 0].sum())(x)
  assert float(jnp.abs(grad).max()) > 0        # differentiable w.r.t. the state
