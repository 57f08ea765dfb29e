"""A SiT over a set of R latent tokens (no patchify): generation in INR latent space.

LA-INR encodes an image into R tokens Z (R, d); a diffusion/flow model over
Z, decoded by the frozen INR decoder, generates images at any resolution.
This network is SiT with the patch embedding replaced by a per-token Linear
(d -> hidden) and the unpatchify by a per-token Linear (hidden -> d): the
transformer blocks are ``glue_jax.models.sit.SiTBlock`` (adaLN-Zero), stacked
and run with ``lax.scan`` exactly as in ``sit.SiT``.

Token r of Z always comes from learned latent slot r of the encoder, so the
slot index is an identity: tokens get a fixed 1-D sin-cos embedding of r.

Call signature matches ``sit.SiT`` so the samplers, guidance and the
velocity loss work unchanged:
``net(x (B, R, d), t (B,), y (B,), None, train=, key=) -> (v, None, None)``.
Time convention t=0 data, t=1 noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models import layers, sit


@dataclasses.dataclass(frozen=True)
class LatentTokenSiTConfig:
  num_tokens: int = 256          # R
  token_dim: int = 256           # d (the INR's latent width)
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0           # 0: unconditional (labels ignored)
  class_dropout_prob: float = 0.1
  attention_impl: str | None = None

  def block_config(self) -> sit.SiTConfig:
    """The ``SiTConfig`` that sizes the reused SiT blocks."""
    return sit.SiTConfig(hidden_size=self.hidden_size, num_heads=self.num_heads,
                         mlp_ratio=self.mlp_ratio, depth=self.depth,
                         attention_impl=self.attention_impl, input_size=2, patch_size=1)


class LatentTokenSiT(nnx.Module):
  """Velocity network over latent token sets."""

  def __init__(self, cfg: LatentTokenSiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    bcfg = cfg.block_config()
    self.token_embed = layers.Dense(cfg.token_dim, d, rngs=rngs, axes=(None, "embed"))
    self.t_embed = layers.TimestepEmbedder(d, rngs=rngs)
    n_rows = max(cfg.num_classes, 0) + 1          # last row: null / unconditional
    self.y_embed = layers.param(rngs, layers.normal(0.02), (n_rows, d), ("vocab", "embed"))
    block_def = nnx.graphdef(nnx.eval_shape(lambda: sit.SiTBlock(bcfg, rngs=nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), cfg.depth)
    self.blocks = nnx.merge(block_def, jax.vmap(
        lambda k: nnx.state(sit.SiTBlock(bcfg, rngs=nnx.Rngs(k))))(keys))
    self.final_adaln = layers.Dense(d, 2 * d, rngs=rngs, axes=("embed", "mlp"),
                                    kernel_init=layers.zeros)
    self.final_linear = layers.Dense(d, cfg.token_dim, rngs=rngs, axes=("embed", None),
                                     kernel_init=layers.zeros)

  def pos_embed(self) -> jax.Array:
    table = layers.sincos_1d(self.cfg.hidden_size, np.arange(self.cfg.num_tokens))
    return jnp.asarray(table, jnp.float32)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
               global_token=None, *, train: bool = False, key: jax.Array | None = None):
    cfg = self.cfg
    if x.shape[1:] != (cfg.num_tokens, cfg.token_dim):
      raise ValueError(f"x has shape {x.shape}; expected (B, {cfg.num_tokens}, {cfg.token_dim})")
    if global_token is not None:
      raise ValueError("LatentTokenSiT has no global token")
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    null = max(cfg.num_classes, 0)
    y = jnp.full((b,), null, jnp.int32) if (y is None or not cfg.num_classes) else y
    if train and cfg.num_classes and cfg.class_dropout_prob > 0:
      if key is None:
        raise ValueError("train=True with label dropout needs a PRNG key")
      y = jnp.where(jax.random.uniform(key, (b,)) < cfg.class_dropout_prob, null, y)
    h = self.token_embed(x.astype(jnp.float32)) + self.pos_embed()[None]
    c = self.t_embed(t) + self.y_embed[...][y]
    graphdef, state = nnx.split(self.blocks)

    def body(hh, st):
      return nnx.merge(graphdef, st)(hh, c), None
    h, _ = jax.lax.scan(body, h, state)
    shift, scale = jnp.split(self.final_adaln(jax.nn.silu(c)), 2, axis=-1)
    h = layers.modulate(layers.layer_norm(h, 1e-6), shift, scale)
    return self.final_linear(h).astype(jnp.float32), None, None


def init(cfg: LatentTokenSiTConfig, seed: int = 0):
  """``(graphdef, pure param dict)`` created inside jit."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LatentTokenSiT(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
      LatentTokenSiT(cfg, rngs=nnx.Rngs(seed)))))()
  return graphdef, params
