"""The SiT family generalised to REGLUE's multimodal inputs (Flax NNX).

One network serves SiT, REPA, REG, ReDi and REGLUE:
- the spatial input is the channel concat of ``latent_channels`` VAE channels
  and ``semantic_channels`` compressed semantic channels (4 + 16 for REGLUE,
  4 + 8 for ReDi, 4 + 0 otherwise), embedded by one patch projection;
- an optional *global token* (DINOv2 [CLS], ``global_token_dim`` = 768) goes
  through Linear -> LayerNorm(affine) and is prepended with a zero positional
  slot; its own zero-initialised head predicts its velocity (REG/REGLUE);
- an optional REPA projector (3-layer MLP) taps the tokens after block
  ``encoder_depth`` (1-based) and is applied to all tokens;
- class labels with null class ``num_classes``; label dropout happens inside
  the network in training mode (an explicit PRNG key is passed).

Initialisation follows the official code exactly (adaLN-Zero, zero heads,
Xavier-uniform linears, N(0, 0.02) label table and timestep MLP).

The blocks are stacked along a leading 'layers' axis and run with
``jax.lax.scan`` (``scan_layers=False`` unrolls the same weights in Python).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glue_jax import sharding
from glue_jax.models import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# name -> (depth, hidden, heads, default REPA tap)
ARCHS = {"S": (12, 384, 6, 4), "B": (12, 768, 12, 4), "L": (24, 1024, 16, 8),
         "XL": (28, 1152, 16, 8)}


@dataclasses.dataclass(frozen=True)
class SiTConfig:
  """Hyper-parameters of the network (all static)."""
  input_size: int = 32
  patch_size: int = 2
  latent_channels: int = 4
  semantic_channels: int = 0
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  global_token_dim: int = 0          # 0: no global token (SiT, REPA, ReDi)
  projector_dim: int = 2048
  projector_out_dim: int = 0         # 0: no REPA projector
  encoder_depth: int = 8             # projector tap after this block (1-based)
  learn_sigma: bool = False          # official SiT doubles the output; extra half ignored
  time_convention: str = "data_at_0"  # 'noise_at_0' for original SiT/ReDi weights
  dtype: str = "float32"             # compute dtype; params stay float32
  attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
  scan_layers: bool = True
  remat: str = "none"                # 'none' | 'full' | 'dots'

  def __post_init__(self):
    if self.time_convention not in ("data_at_0", "noise_at_0"):
      raise ValueError(f"time_convention={self.time_convention!r}")
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; one of {list(_REMAT_POLICIES)}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; one of {list(_DTYPES)}")
    if self.projector_out_dim and not 1 <= self.encoder_depth <= self.depth:
      raise ValueError(f"encoder_depth={self.encoder_depth} outside 1..{self.depth}")
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} % patch {self.patch_size}")

  @property
  def in_channels(self) -> int:
    return self.latent_channels + self.semantic_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2 + (1 if self.global_token_dim else 0)


def config_for(model: str, **overrides: Any) -> SiTConfig:
  """``config_for('SiT-XL/2', semantic_channels=16, ...)``."""
  m = re.fullmatch(r"(?:SiT-)?(S|B|L|XL)/(\d+)", model)
  if not m:
    raise ValueError(f"unknown model {model!r}; expected e.g. 'SiT-XL/2' "
                     f"with size in {list(ARCHS)} and patch 2/4/8")
  depth, hidden, heads, tap = ARCHS[m.group(1)]
  kw = dict(depth=depth, hidden_size=hidden, num_heads=heads,
            encoder_depth=tap, patch_size=int(m.group(2)))
  kw.update(overrides)
  return SiTConfig(**kw)


class SiTBlock(nnx.Module):
  """adaLN-Zero transformer block."""

  def __init__(self, cfg: SiTConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.attn = layers.Attention(d, cfg.num_heads, rngs=rngs,
                                 implementation=cfg.attention_impl)
    self.mlp = layers.Mlp(d, int(d * cfg.mlp_ratio), rngs=rngs)
    self.adaln = layers.Dense(d, 6 * d, rngs=rngs, axes=("embed", "mlp"),
                              kernel_init=layers.zeros)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = self.adaln(jax.nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    h = layers.modulate(layers.layer_norm(x, 1e-6), shift1, scale1)
    x = x + gate1[:, None] * self.attn(h)
    h = layers.modulate(layers.layer_norm(x, 1e-6), shift2, scale2)
    x = x + gate2[:, None] * self.mlp(h)
    return sharding.constrain(x, ("batch", "seq", "embed"))


class Projector(nnx.Module):
  """REPA projector: Linear-SiLU-Linear-SiLU-Linear."""

  def __init__(self, d: int, width: int, out: int, *, rngs: nnx.Rngs):
    self.fc1 = layers.Dense(d, width, rngs=rngs, axes=("embed", "mlp"))
    self.fc2 = layers.Dense(width, width, rngs=rngs, axes=("mlp", "mlp2"))
    self.fc3 = layers.Dense(width, out, rngs=rngs, axes=("mlp2", None))

  def __call__(self, x):
    return self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x)))))


class SiT(nnx.Module):
  """Velocity network ``(x, t, y, g) -> (v_spatial, v_global, projections)``."""

  def __init__(self, cfg: SiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    out_c = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    self.patch_embed = layers.Dense(p * p * cfg.in_channels, d, rngs=rngs,
                                    axes=(None, "embed"))
    self.t_embed = layers.TimestepEmbedder(d, rngs=rngs)
    n_rows = cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)
    self.y_embed = layers.param(rngs, layers.normal(0.02), (n_rows, d),
                                ("vocab", "embed"))
    if cfg.global_token_dim:
      self.global_in = layers.Dense(cfg.global_token_dim, d, rngs=rngs,
                                    axes=(None, "embed"))
      self.global_norm = layers.LayerNorm(d, rngs=rngs, eps=1e-6, affine=True)
      self.global_out = layers.Dense(d, cfg.global_token_dim, rngs=rngs,
                                     axes=("embed", None),
                                     kernel_init=layers.zeros)
    else:
      self.global_in = self.global_norm = self.global_out = None
    self.projector = (Projector(d, cfg.projector_dim, cfg.projector_out_dim,
                                rngs=rngs) if cfg.projector_out_dim else None)
    block_def = nnx.graphdef(nnx.eval_shape(lambda: SiTBlock(cfg, rngs=nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), cfg.depth)
    stacked = jax.vmap(lambda k: nnx.state(SiTBlock(cfg, rngs=nnx.Rngs(k))))(keys)
    self.blocks = nnx.merge(block_def, stacked)
    self.final_adaln = layers.Dense(d, 2 * d, rngs=rngs, axes=("embed", "mlp"),
                                    kernel_init=layers.zeros)
    self.final_linear = layers.Dense(d, p * p * out_c, rngs=rngs,
                                     axes=("embed", None),
                                     kernel_init=layers.zeros)

  # -- helpers -------------------------------------------------------------
  def pos_embed(self) -> jax.Array:
    cfg = self.cfg
    return jnp.asarray(layers.sincos_2d(cfg.hidden_size, cfg.grid_size,
                                        1 if cfg.global_token_dim else 0))

  def _run_blocks(self, x, c, start: int, stop: int):
    graphdef, state = nnx.split(self.blocks)
    state = jax.tree.map(lambda a: a[start:stop], state)
    policy = _REMAT_POLICIES[self.cfg.remat]

    def body(h, st):
      return nnx.merge(graphdef, st)(h, c), None
    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=policy)
    if self.cfg.scan_layers:
      x, _ = jax.lax.scan(body, x, state)
    else:
      for i in range(stop - start):
        x, _ = body(x, jax.tree.map(lambda a: a[i], state))
    return x

  # -- forward -------------------------------------------------------------
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array,
               global_token: jax.Array | None = None, *, train: bool = False,
               key: jax.Array | None = None):
    """Velocity prediction.

    Args:
      x: (B, H, W, latent+semantic channels) noisy spatial state.
      t: (B,) or scalar time in [0, 1]; t=0 data, t=1 noise.
      y: (B,) int labels; ``num_classes`` is the null label.
      global_token: (B, global_token_dim) noisy global token, or None when
        the network has none.
      train: enables label dropout (needs ``key``).
      key: PRNG key for label dropout.
    Returns:
      ``(v_spatial (B,H,W,C), v_global (B,G) or None, projections (B,T,Z) or
      None)``, all float32.
    """
    cfg = self.cfg
    b = x.shape[0]
    if x.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
      raise ValueError(f"x has shape {x.shape}; the network expects "
                       f"(B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels})")
    if (global_token is None) != (not cfg.global_token_dim):
      raise ValueError("global_token must be given exactly when the network "
                       f"has one (global_token_dim={cfg.global_token_dim})")
    dtype = _DTYPES[cfg.dtype]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if cfg.time_convention == "noise_at_0":
      t = 1.0 - t
    if train and cfg.class_dropout_prob > 0:
      if key is None:
        raise ValueError("train=True with label dropout needs a PRNG key")
      drop = jax.random.uniform(key, (b,)) < cfg.class_dropout_prob
      y = jnp.where(drop, cfg.num_classes, y)

    h = self.patch_embed(layers.patchify(x.astype(dtype), cfg.patch_size))
    if cfg.global_token_dim:
      g = self.global_norm(self.global_in(global_token.astype(dtype)))
      h = jnp.concatenate([g[:, None], h], axis=1)
    h = h + self.pos_embed().astype(dtype)[None]
    h = sharding.constrain(h, ("batch", "seq", "embed"))
    c = self.t_embed(t, dtype) + self.y_embed[...][y].astype(dtype)

    projections = None
    if self.projector is not None:
      h = self._run_blocks(h, c, 0, cfg.encoder_depth)
      projections = self.projector(h).astype(jnp.float32)
      h = self._run_blocks(h, c, cfg.encoder_depth, cfg.depth)
    else:
      h = self._run_blocks(h, c, 0, cfg.depth)

    shift, scale = jnp.split(self.final_adaln(jax.nn.silu(c)), 2, axis=-1)
    h = layers.modulate(layers.layer_norm(h, 1e-6), shift, scale)
    v_global = None
    if cfg.global_token_dim:
      v_global = self.global_out(h[:, 0]).astype(jnp.float32)
      h = h[:, 1:]
    out = self.final_linear(h).astype(jnp.float32)
    out_c = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    v = layers.unpatchify(out, cfg.patch_size, out_c,
                          (cfg.grid_size, cfg.grid_size))[..., :cfg.in_channels]
    if cfg.time_convention == "noise_at_0":
      v = -v
      v_global = None if v_global is None else -v_global
    return v, v_global, projections


def count_params(module: nnx.Module, exclude: str | None = None) -> int:
  """Number of parameters, optionally excluding paths matching a regex."""
  state = nnx.state(module, nnx.Param)
  total = 0
  for path, leaf in jax.tree.leaves_with_path(state):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if exclude and re.search(exclude, name):
      continue
    total += leaf.size
  return total
