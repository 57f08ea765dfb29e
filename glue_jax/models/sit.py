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
  the network in training mode (an explicit PRNG key is passed);
- or, with ``prompt_length`` L > 0, a *prompt* instead of a class label: L
  token ids from a vocabulary of ``num_classes`` words (id ``num_classes`` is
  the null/padding token; the null prompt is all null), or L embedding
  vectors of width ``prompt_embed_dim`` from any text encoder (then
  ``num_classes`` must be 0 and an all-zero vector is the null token).  The
  prompt enters as in-context tokens appended after the image tokens (learned
  positions) and leaves before the heads and the REPA projector; prompt
  dropout replaces the whole prompt by the null prompt.  ``y`` keeps its
  role, so ``jnp.full_like(y, null_label)`` is still the null condition.
  ``prompt_pooled`` adds a projection of the mean word embedding to the adaLN
  vector as well (like a pooled text embedding; the null prompt pools to the
  null word), which speeds up learning of small models.
  With ``prompt_length=0`` (the default) nothing of this exists.

Initialisation follows the official code exactly (adaLN-Zero, zero heads,
Xavier-uniform linears, N(0, 0.02) label table and timestep MLP).

The blocks are stacked along a leading 'layers' axis and run with
``jax.lax.scan`` (``scan_layers=False`` unrolls the same weights in Python).
"""

from __future__ import annotations

import dataclasses
import logging
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
  prompt_length: int = 0             # 0: class labels; L: y is an L-token prompt
  prompt_embed_dim: int = 0          # 0: token ids; E: y is (B, L, E) vectors
  prompt_pooled: bool = False        # also add the pooled prompt to the adaLN vector

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
    if self.prompt_length < 0 or self.prompt_embed_dim < 0:
      raise ValueError(f"prompt_length={self.prompt_length}, "
                       f"prompt_embed_dim={self.prompt_embed_dim} must be >= 0")
    if (self.prompt_embed_dim or self.prompt_pooled) and not self.prompt_length:
      raise ValueError("prompt_embed_dim / prompt_pooled need prompt_length > 0")
    if self.prompt_embed_dim and self.num_classes:
      raise ValueError("embedding prompts need num_classes=0 (null label 0 = the "
                       f"all-zero vector), got num_classes={self.num_classes}")

  @property
  def in_channels(self) -> int:
    return self.latent_channels + self.semantic_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Image (+ global) tokens: what the heads and the projector see."""
    return self.grid_size ** 2 + (1 if self.global_token_dim else 0)

  @property
  def null_label(self) -> int:
    """The null class / null prompt token (0 for embedding prompts)."""
    return self.num_classes


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


_WARNED: set = set()   # (hidden_size, values per token) pairs already warned about


class SiT(nnx.Module):
  """Velocity network ``(x, t, y, g) -> (v_spatial, v_global, projections)``."""

  def __init__(self, cfg: SiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    token_values = p * p * cfg.in_channels
    if d < token_values and (d, token_values) not in _WARNED:
      # The final linear layer maps d features to p*p*C outputs per token, so the
      # velocity of a token lies in a d-dim affine subspace: the noise of x_1 in
      # the other p*p*C - d directions is never removed by any sampler.
      _WARNED.add((d, token_values))      # once per process: networks are built many times
      logging.warning(
          "SiT: hidden_size %d < patch_size^2 x in_channels = %d; %d output directions "
          "per token cannot be denoised (samples keep that part of the noise). Use "
          "hidden_size >= %d.", d, token_values, token_values - d, token_values)
    out_c = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    self.patch_embed = layers.Dense(token_values, d, rngs=rngs,
                                    axes=(None, "embed"))
    self.t_embed = layers.TimestepEmbedder(d, rngs=rngs)
    if cfg.prompt_length:
      self.y_embed = None
      self._init_prompt(cfg, rngs)
    else:
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

  def _init_prompt(self, cfg: SiTConfig, rngs: nnx.Rngs):
    """Prompt parameters (only built when ``prompt_length > 0``)."""
    d = cfg.hidden_size
    if cfg.prompt_embed_dim:
      self.prompt_in = layers.Dense(cfg.prompt_embed_dim, d, rngs=rngs,
                                    axes=(None, "embed"))
      self.prompt_null = layers.param(rngs, layers.normal(0.02), (d,), ("embed",))
    else:
      self.prompt_table = layers.param(rngs, layers.normal(0.02),
                                       (cfg.num_classes + 1, d), ("vocab", "embed"))
    self.prompt_pos = layers.param(rngs, layers.normal(0.02),
                                   (cfg.prompt_length, d), (None, "embed"))
    self.prompt_pool = (layers.Dense(d, d, rngs=rngs, axes=("embed", "mlp"))
                        if cfg.prompt_pooled else None)

  # -- helpers -------------------------------------------------------------
  def check_prompt(self, y: jax.Array) -> None:
    cfg = self.cfg
    want = (cfg.prompt_length,) + ((cfg.prompt_embed_dim,) if cfg.prompt_embed_dim else ())
    if y.ndim != 1 + len(want) or tuple(y.shape[1:]) != want:
      raise ValueError(f"y has shape {y.shape}; the prompt-conditioned network "
                       f"expects (B, {', '.join(map(str, want))})")

  def _prompt_words(self, y: jax.Array, dtype):
    """Token embeddings without positions (B, L, hidden) and the null mask (B, L)."""
    cfg = self.cfg
    if cfg.prompt_embed_dim:
      y = y.astype(dtype)
      null = jnp.all(y == 0, axis=-1)
      e = jnp.where(null[..., None], self.prompt_null[...].astype(dtype), self.prompt_in(y))
    else:
      null = y == cfg.num_classes
      e = self.prompt_table[...][y].astype(dtype)
    return e, null

  def embed_prompt(self, y: jax.Array, dtype) -> jax.Array:
    """(B, L[, E]) prompt -> (B, L, hidden) in-context tokens."""
    e, _ = self._prompt_words(y, dtype)
    return e + self.prompt_pos[...].astype(dtype)[None]

  def pooled_prompt(self, y: jax.Array, dtype) -> jax.Array:
    """(B, hidden) adaLN term: a projection of the mean non-null word embedding
    (the null word's embedding for the null prompt)."""
    e, null = self._prompt_words(y, dtype)
    keep = (~null).astype(dtype)[..., None]
    count = keep.sum(1)
    mean = jnp.where(count > 0, (e * keep).sum(1) / jnp.maximum(count, 1), e[:, 0])
    return self.prompt_pool(mean)

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
      y: (B,) int labels; ``num_classes`` is the null label.  With prompt
        conditioning: (B, L) int token ids (null id ``num_classes``) or
        (B, L, E) float embeddings (null token = zero vector).
      global_token: (B, global_token_dim) noisy global token, or None when
        the network has none.
      train: enables label/prompt dropout (needs ``key``).
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
    if cfg.prompt_length:
      self.check_prompt(y)
    if train and cfg.class_dropout_prob > 0:
      if key is None:
        raise ValueError("train=True with label dropout needs a PRNG key")
      drop = jax.random.uniform(key, (b,)) < cfg.class_dropout_prob
      y = jnp.where(drop.reshape((b,) + (1,) * (y.ndim - 1)), cfg.num_classes, y)

    h = self.patch_embed(layers.patchify(x.astype(dtype), cfg.patch_size))
    if cfg.global_token_dim:
      g = self.global_norm(self.global_in(global_token.astype(dtype)))
      h = jnp.concatenate([g[:, None], h], axis=1)
    h = h + self.pos_embed().astype(dtype)[None]
    if cfg.prompt_length:
      h = jnp.concatenate([h, self.embed_prompt(y, dtype)], axis=1)
    h = sharding.constrain(h, ("batch", "seq", "embed"))
    c = self.t_embed(t, dtype)
    if not cfg.prompt_length:
      c = c + self.y_embed[...][y].astype(dtype)
    elif cfg.prompt_pooled:
      c = c + self.pooled_prompt(y, dtype)

    projections = None
    if self.projector is not None:
      h = self._run_blocks(h, c, 0, cfg.encoder_depth)
      projections = self.projector(h[:, :cfg.num_tokens]).astype(jnp.float32)
      h = self._run_blocks(h, c, cfg.encoder_depth, cfg.depth)
    else:
      h = self._run_blocks(h, c, 0, cfg.depth)
    if cfg.prompt_length:
      h = h[:, :cfg.num_tokens]          # the prompt tokens leave here

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

  def _prompt_sequence(self, x, t, y, global_token, dtype):
    """The forward pass's input sequence and adaLN vector (prompt networks)."""
    cfg = self.cfg
    h = self.patch_embed(layers.patchify(x.astype(dtype), cfg.patch_size))
    if cfg.global_token_dim:
      g = self.global_norm(self.global_in(global_token.astype(dtype)))
      h = jnp.concatenate([g[:, None], h], axis=1)
    h = h + self.pos_embed().astype(dtype)[None]
    h = jnp.concatenate([h, self.embed_prompt(y, dtype)], axis=1)
    c = self.t_embed(t, dtype)
    if cfg.prompt_pooled:
      c = c + self.pooled_prompt(y, dtype)
    return h, c

  def prompt_attention(self, x: jax.Array, t: jax.Array, y: jax.Array,
                       global_token: jax.Array | None = None, *,
                       blocks: tuple[int, ...] | None = None) -> jax.Array:
    """Attention of the image tokens on the prompt tokens (for layout guidance).

    Softmax attention probabilities (over the whole sequence, as in the
    forward pass) of each image-patch query on each prompt key, averaged over
    heads and over ``blocks`` (0-based; default the middle block).

    Returns:
      (B, grid*grid, L) float32.
    """
    cfg = self.cfg
    if not cfg.prompt_length:
      raise ValueError("prompt_attention needs a prompt-conditioned network")
    self.check_prompt(y)
    blocks = (cfg.depth // 2,) if blocks is None else tuple(blocks)
    if not blocks or not all(0 <= i < cfg.depth for i in blocks):
      raise ValueError(f"blocks={blocks} outside 0..{cfg.depth - 1}")
    dtype = _DTYPES[cfg.dtype]
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    if cfg.time_convention == "noise_at_0":
      t = 1.0 - t
    h, c = self._prompt_sequence(x, t, y, global_token, dtype)
    graphdef, state = nnx.split(self.blocks)
    n_global = 1 if cfg.global_token_dim else 0
    maps, done = [], 0
    for i in sorted(blocks):
      if i > done:
        h = self._run_blocks(h, c, done, i)
        done = i
      blk = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
      shift1, scale1 = jnp.split(blk.adaln(jax.nn.silu(c)), 6, axis=-1)[:2]
      hn = layers.modulate(layers.layer_norm(h, 1e-6), shift1, scale1)
      n, d, heads = h.shape[1], h.shape[2], cfg.num_heads
      qkv = blk.attn.qkv(hn).reshape(b, n, 3, heads, d // heads)
      q, k = qkv[:, :, 0].astype(jnp.float32), qkv[:, :, 1].astype(jnp.float32)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(float(d // heads))
      probs = jax.nn.softmax(logits, axis=-1).mean(axis=1)
      maps.append(probs[:, n_global:cfg.num_tokens, cfg.num_tokens:])
    return jnp.mean(jnp.stack(maps), axis=0)


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
