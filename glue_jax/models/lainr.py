"""LA-INR: a locality-aware generalizable implicit neural representation (Flax NNX).

An instance (an image, or a few posed views of an object) is encoded in one
forward pass into R latent tokens Z (B, R, d); a shared INR decoder maps a
coordinate v (and Z) to a value (RGB, or RGB + density for novel views).

Encoder (TransINR-style): zero-padded patches -> linear embedding + learned
positional embedding (shared by all views of an instance), R learnable latent
tokens appended *after* the patch tokens, pre-LN transformer, the last R
positions -> LayerNorm + Linear -> Z.

Decoder (locality-aware), with Fourier features gamma_sigma(v) whose
frequencies are ``exp(linspace(0, ln sigma, n))`` per axis, applied as
``[cos(pi w v), sin(pi w v)]`` (sigma = cycles per side of [-1, 1]):
  spatial locality: q(v) = ReLU(W_q gamma_{sigma_q}(v)); m(v) = cross-attention
    of q(v) over Z (plain dot products, no positional bias);
  spectral locality: L bands sigma_1 >= ... >= sigma_L >= sigma_q,
    h_F^l = ReLU(W_F^l gamma_{sigma_l}(v)),  h_m^l = ReLU(h_F^l + W_m^l m(v)),
    h^1 = h_m^1,  h^l = ReLU(W^l (h_m^l + h^{l-1})),  y = sum_l W_o^l h^l.
Every level emits an output and the outputs are summed (each partial sum is a
coarse-to-fine reconstruction).

Baselines are switches (``variant``):
  'lainr'       the model above;
  'no_select'   multi-band decoder, but m is one vector per instance (a learned
                query attends over Z: coordinate independent);
  'single_band' selective aggregation kept; ``single_band_mode='same_sigma'``
                gives every level the bandwidth sigma_1 (same parameters, no
                coarse-to-fine), 'one_level' keeps only level 1;
  'global'      TransINR-like: a plain Fourier-feature MLP (bandwidth sigma_1,
                L + 1 hidden layers) shifted at every layer by one global
                modulation vector (the learned-query pooling), one output head.

Decoding in chunks (``decode_chunked``) runs ``lax.map`` over coordinate
chunks after computing the keys/values of Z once, so memory is bounded by the
chunk size (B * heads * chunk * R attention logits), at any output resolution.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models import layers

VARIANTS = ("lainr", "global", "single_band", "no_select")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LAINRConfig:
  """Hyper-parameters (defaults: ImageNette/CelebA 178 as in the LA-INR paper)."""
  image_size: int = 178
  in_channels: int = 3            # 9 for NVS support views (RGB, ray origin, ray dir)
  coord_dim: int = 2              # 3 for NVS points (6 with view directions)
  out_dim: int = 3                # 4 for NVS (RGB, density)
  patch_size: int = 9
  patch_padding: int = 1
  enc_width: int = 768
  enc_depth: int = 6
  enc_heads: int = 12
  mlp_ratio: float = 4.0
  # IPC's transformer config has residual dropout 0.1 [V]; 0 by default here
  # (short runs); set 0.1 to reproduce.
  dropout: float = 0.0
  num_latents: int = 256          # R (LA-INR's value uncertain; IPC uses 256)
  # IPC initialises the latent tokens and the positional embedding N(0, 1) [V].
  token_init_std: float = 1.0
  pos_init_std: float = 1.0
  dec_width: int = 256
  attn_heads: int = 2
  sigma_q: float = 16.0
  sigmas: tuple[float, ...] = (128.0, 32.0)
  num_freqs: int = 64             # per axis (IPC ff_dim 128 -> 64 per axis)
  ff_pi: bool = True              # multiply by pi (IPC images); False: IPC NeRF style
  # Not fixed by the LA-INR paper: a Linear+ReLU before the attention's query
  # projection (re-implementation) or gamma fed straight into it (False).
  query_mlp: bool = True
  output_bias: float = 0.5        # IPC adds +0.5 to the linear RGB output [V]; LA-INR [?]
  variant: str = "lainr"
  single_band_mode: str = "same_sigma"   # 'same_sigma' | 'one_level'
  dtype: str = "float32"

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"LAINRConfig.variant={self.variant!r}; one of {VARIANTS}")
    if self.single_band_mode not in ("same_sigma", "one_level"):
      raise ValueError(f"LAINRConfig.single_band_mode={self.single_band_mode!r}")
    if not self.sigmas:
      raise ValueError("LAINRConfig.sigmas is empty")
    s = tuple(float(x) for x in self.sigmas)
    if any(a < b for a, b in zip(s, s[1:])) or s[-1] < self.sigma_q:
      raise ValueError(f"LAINRConfig: bands must satisfy sigma_1 >= ... >= sigma_L >= "
                       f"sigma_q; got sigmas={s}, sigma_q={self.sigma_q}")
    if min(s + (self.sigma_q,)) < 1.0:
      raise ValueError(f"LAINRConfig: bandwidths below 1 ({s}, {self.sigma_q})")
    if (self.image_size + 2 * self.patch_padding) % self.patch_size:
      raise ValueError(f"LAINRConfig: image_size {self.image_size} + 2*padding "
                       f"{self.patch_padding} is not divisible by patch {self.patch_size}")
    if self.dec_width % self.attn_heads or self.enc_width % self.enc_heads:
      raise ValueError("LAINRConfig: widths must be divisible by their head counts")
    if self.dtype not in _DTYPES:
      raise ValueError(f"LAINRConfig.dtype={self.dtype!r}; one of {list(_DTYPES)}")

  @property
  def num_patches(self) -> int:
    return ((self.image_size + 2 * self.patch_padding) // self.patch_size) ** 2

  @property
  def selective(self) -> bool:
    return self.variant in ("lainr", "single_band")

  @property
  def bands(self) -> tuple[float, ...]:
    """Input bandwidth of each decoder level (shallowest first)."""
    s = tuple(float(x) for x in self.sigmas)
    if self.variant == "single_band":
      return (s[0],) * (len(s) if self.single_band_mode == "same_sigma" else 1)
    return s


def frequencies(sigma: float, n: int) -> np.ndarray:
  """Log-spaced frequencies from 1 to sigma (float32 constants)."""
  return np.exp(np.linspace(0.0, math.log(sigma), n)).astype(np.float32)


def fourier_features(v: jax.Array, sigma: float, n: int, use_pi: bool = True) -> jax.Array:
  """(..., D) coords -> (..., 2*n*D): per axis [cos(pi w v) x n, sin(pi w v) x n]."""
  w = jnp.asarray(frequencies(sigma, n)) * (math.pi if use_pi else 1.0)
  arg = v.astype(jnp.float32)[..., :, None] * w          # (..., D, n)
  feats = jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)
  return feats.reshape(*v.shape[:-1], -1)


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block (exact GELU, optional residual dropout)."""

  def __init__(self, cfg: LAINRConfig, *, rngs: nnx.Rngs):
    w = cfg.enc_width
    self.dropout = cfg.dropout
    self.norm1 = layers.LayerNorm(w, rngs=rngs, eps=1e-5)
    self.attn = layers.Attention(w, cfg.enc_heads, rngs=rngs)
    self.norm2 = layers.LayerNorm(w, rngs=rngs, eps=1e-5)
    self.mlp = layers.Mlp(w, int(w * cfg.mlp_ratio), rngs=rngs, approximate_gelu=False)

  def _drop(self, x, key, which):
    if key is None or not self.dropout:
      return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, which), 1 - self.dropout, x.shape)
    return jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)

  def __call__(self, x, key=None):
    x = x + self._drop(self.attn(self.norm1(x)), key, 0)
    return x + self._drop(self.mlp(self.norm2(x)), key, 1)


class Encoder(nnx.Module):
  """Views (B, V, H, W, C) -> latent tokens Z (B, R, dec_width)."""

  def __init__(self, cfg: LAINRConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, w = cfg.patch_size, cfg.enc_width
    self.patch_embed = layers.Dense(p * p * cfg.in_channels, w, rngs=rngs,
                                    axes=(None, "embed"))
    self.pos_embed = layers.param(rngs, layers.normal(cfg.pos_init_std),
                                  (cfg.num_patches, w), (None, "embed"))
    self.latents = layers.param(rngs, layers.normal(cfg.token_init_std),
                                (cfg.num_latents, w), (None, "embed"))
    block_def = nnx.graphdef(nnx.eval_shape(lambda: EncoderBlock(cfg, rngs=nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), cfg.enc_depth)
    self.blocks = nnx.merge(block_def, jax.vmap(
        lambda k: nnx.state(EncoderBlock(cfg, rngs=nnx.Rngs(k))))(keys))
    self.out_norm = layers.LayerNorm(w, rngs=rngs, eps=1e-5)
    self.out_proj = layers.Dense(w, cfg.dec_width, rngs=rngs, axes=("embed", "mlp"))

  def __call__(self, views: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    if views.ndim == 4:
      views = views[:, None]
    b, nv, h, w, c = views.shape
    if (h, w, c) != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(f"encoder input {views.shape}: expected (B, V, {cfg.image_size}, "
                       f"{cfg.image_size}, {cfg.in_channels})")
    dtype = _DTYPES[cfg.dtype]
    pad = cfg.patch_padding
    x = jnp.pad(views.reshape(b * nv, h, w, c).astype(dtype),
                ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    tok = self.patch_embed(layers.patchify(x, cfg.patch_size))
    tok = tok + self.pos_embed[...].astype(dtype)[None]
    tok = tok.reshape(b, nv * cfg.num_patches, -1)
    lat = jnp.broadcast_to(self.latents[...].astype(dtype)[None], (b,) + self.latents.shape)
    hidden = jnp.concatenate([tok, lat], axis=1)
    graphdef, state = nnx.split(self.blocks)
    use_drop = key is not None and cfg.dropout > 0
    layer_keys = (jax.random.split(key, cfg.enc_depth) if use_drop
                  else jnp.zeros((cfg.enc_depth,), jnp.uint32))

    def body(hh, xs):
      st, k = xs
      return nnx.merge(graphdef, st)(hh, k if use_drop else None), None
    hidden, _ = jax.lax.scan(body, hidden, (state, layer_keys))
    z = self.out_proj(self.out_norm(hidden[:, -cfg.num_latents:]))
    return z.astype(jnp.float32)


class CrossAttention(nnx.Module):
  """Multi-head attention of coordinate queries over the latent tokens."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs, query_in: int | None = None):
    self.heads = heads
    self.q = layers.Dense(query_in or d, d, rngs=rngs, axes=("embed", "heads"))
    self.k = layers.Dense(d, d, rngs=rngs, axes=("embed", "heads"))
    self.v = layers.Dense(d, d, rngs=rngs, axes=("embed", "heads"))
    self.out = layers.Dense(d, d, rngs=rngs, axes=("heads", "embed"))

  def keys_values(self, z):
    b, r, d = z.shape
    split = lambda t: t.reshape(b, r, self.heads, d // self.heads)
    return split(self.k(z)), split(self.v(z))

  def attend(self, query, k, v):
    b, n, _ = query.shape
    q = self.q(query).reshape(b, n, self.heads, -1)
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype))
    return self.out(out.reshape(b, n, -1))


class Decoder(nnx.Module):
  """(Z, coords) -> values; ``prepare`` once per instance, ``query`` per chunk."""

  def __init__(self, cfg: LAINRConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, ff = cfg.dec_width, 2 * cfg.num_freqs * cfg.coord_dim
    dense = lambda i, o: layers.Dense(i, o, rngs=rngs, axes=("embed", "mlp"),
                                      kernel_init=nnx.initializers.lecun_normal())
    if cfg.selective:
      self.query_mlp = dense(ff, d) if cfg.query_mlp else None
      self.attn = CrossAttention(d, cfg.attn_heads, rngs=rngs,
                                 query_in=None if cfg.query_mlp else ff)
      self.pool_query = None
    else:
      self.query_mlp = None
      self.attn = CrossAttention(d, cfg.attn_heads, rngs=rngs)
      self.pool_query = layers.param(rngs, layers.normal(1.0), (1, d), (None, "embed"))
    bands = cfg.bands
    if cfg.variant == "global":
      self.feat = nnx.List([dense(ff, d)])
      self.mod = nnx.List([dense(d, d) for _ in range(len(bands) + 1)])
      self.hidden = nnx.List([dense(d, d) for _ in range(len(bands))])
      self.heads = nnx.List([dense(d, cfg.out_dim)])
    else:
      self.feat = nnx.List([dense(ff, d) for _ in bands])
      self.mod = nnx.List([dense(d, d) for _ in bands])
      self.hidden = nnx.List([dense(d, d) for _ in bands[1:]])
      self.heads = nnx.List([dense(d, cfg.out_dim) for _ in bands])

  def prepare(self, z: jax.Array) -> dict:
    """Per-instance work shared by all coordinates (keys/values or global m)."""
    dtype = _DTYPES[self.cfg.dtype]
    k, v = self.attn.keys_values(z.astype(dtype))
    if self.cfg.selective:
      return {"k": k, "v": v}
    q = jnp.broadcast_to(self.pool_query[...].astype(dtype)[None], (z.shape[0], 1, z.shape[-1]))
    return {"m": self.attn.attend(q, k, v)}               # (B, 1, d)

  def modulation(self, prepared: dict, coords: jax.Array) -> jax.Array:
    cfg = self.cfg
    if not cfg.selective:
      return prepared["m"]
    g = fourier_features(coords, cfg.sigma_q, cfg.num_freqs, cfg.ff_pi)
    g = g.astype(_DTYPES[cfg.dtype])
    q = jax.nn.relu(self.query_mlp(g)) if self.query_mlp is not None else g
    return self.attn.attend(q, prepared["k"], prepared["v"])

  def query(self, prepared: dict, coords: jax.Array):
    """coords (B, N, coord_dim) -> (sum of level outputs (B, N, out), [levels])."""
    cfg = self.cfg
    if coords.shape[-1] != cfg.coord_dim:
      raise ValueError(f"coords {coords.shape}: last axis must be coord_dim={cfg.coord_dim}")
    dtype = _DTYPES[cfg.dtype]
    m = self.modulation(prepared, coords)
    ff = lambda s: fourier_features(coords, s, cfg.num_freqs, cfg.ff_pi).astype(dtype)
    if cfg.variant == "global":
      h = jax.nn.relu(self.feat[0](ff(cfg.bands[0])) + self.mod[0](m))
      for lin, mod in zip(self.hidden, list(self.mod)[1:]):
        h = jax.nn.relu(lin(h) + mod(m))
      levels = [self.heads[0](h)]
    else:
      levels, h = [], None
      for i, sigma in enumerate(cfg.bands):
        h_m = jax.nn.relu(jax.nn.relu(self.feat[i](ff(sigma))) + self.mod[i](m))
        h = h_m if i == 0 else jax.nn.relu(self.hidden[i - 1](h_m + h))
        levels.append(self.heads[i](h))
    levels = [y.astype(jnp.float32) for y in levels]
    bias = jnp.zeros((cfg.out_dim,), jnp.float32).at[:3].set(cfg.output_bias)
    return sum(levels) + bias, levels

  def __call__(self, z, coords):
    return self.query(self.prepare(z), coords)[0]


class LAINR(nnx.Module):
  """Encoder + decoder: ``model(views, coords) -> values``."""

  def __init__(self, cfg: LAINRConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def encode(self, views, *, key=None):
    return self.encoder(views, key=key)

  def decode(self, z, coords):
    return self.decoder(z, coords)

  def __call__(self, views, coords, *, key=None):
    return self.decode(self.encode(views, key=key), coords)


def decode_chunked(decoder: Decoder, z: jax.Array, coords: jax.Array, chunk: int,
                   fn=None) -> jax.Array:
  """Decodes (B, N, D) coords ``chunk`` at a time with ``lax.map``.

  ``fn(decoder, prepared, coords_chunk) -> (B, chunk, ...)`` defaults to the
  summed output; the keys/values of Z are computed once.
  """
  fn = fn or (lambda dec, prep, c: dec.query(prep, c)[0])
  prepared = decoder.prepare(z)
  b, n, d = coords.shape
  chunk = max(1, min(int(chunk), n))
  n_chunks = -(-n // chunk)
  padded = jnp.pad(coords, ((0, 0), (0, n_chunks * chunk - n), (0, 0)))
  chunks = padded.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
  out = jax.lax.map(lambda c: fn(decoder, prepared, c), chunks)    # (n_chunks, B, chunk, ...)
  out = out.swapaxes(0, 1)
  return out.reshape(b, n_chunks * chunk, *out.shape[3:])[:, :n]


def pixel_grid(height: int, width: int) -> jax.Array:
  """(H*W, 2) pixel-centre coordinates in [-1, 1], (row, col) order."""
  r = (2 * jnp.arange(height, dtype=jnp.float32) + 1) / height - 1
  c = (2 * jnp.arange(width, dtype=jnp.float32) + 1) / width - 1
  return jnp.stack(jnp.meshgrid(r, c, indexing="ij"), -1).reshape(-1, 2)


def decode_image(decoder: Decoder, z: jax.Array, height: int, width: int,
                 chunk: int = 4096) -> jax.Array:
  """Renders the INR of each instance at any resolution: (B, H, W, out)."""
  coords = jnp.broadcast_to(pixel_grid(height, width)[None], (z.shape[0], height * width, 2))
  return decode_chunked(decoder, z, coords, chunk).reshape(z.shape[0], height, width, -1)


def init(cfg: LAINRConfig, seed: int = 0):
  """``(graphdef, pure param dict)`` with the parameters created inside jit."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LAINR(cfg, rngs=nnx.Rngs(0))))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(LAINR(cfg, rngs=nnx.Rngs(seed)))))()
  return graphdef, params
