"""Shared building blocks for the networks of glue_jax (Flax NNX).

Conventions used by every network in ``glue_jax.models``:
- images and feature maps are NHWC;
- every ``nnx.Param`` carries ``logical_axes`` metadata (see
  ``glue_jax.sharding``); kernels of dense layers are ``(in, out)``;
- parameters live in float32; a layer computes in the dtype of its input
  (parameters are cast to it), while normalisation statistics and softmax run
  in float32.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[..., jax.Array]
xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def normal(stddev: float) -> Initializer:
  return nnx.initializers.normal(stddev)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32),
                   logical_axes=tuple(axes))


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` with a ``(in, out)`` kernel."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               axes: tuple[str | None, str | None] = ("embed", "mlp"),
               kernel_init: Initializer = xavier_uniform,
               bias_init: Initializer = zeros, use_bias: bool = True):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes)
    self.bias = (param(rngs, bias_init, (out_features,), axes[1:])
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, statistics in float32."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; ``affine=False`` has no parameters."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-6,
               affine: bool = True, axis_name: str | None = "embed"):
    self.eps = eps
    self.scale = param(rngs, ones, (features,), (axis_name,)) if affine else None
    self.bias = param(rngs, zeros, (features,), (axis_name,)) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x, self.eps)
    if self.scale is not None:
      y = (y.astype(jnp.float32) * self.scale[...] + self.bias[...]).astype(x.dtype)
    return y


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation ``x * (1 + scale) + shift`` with per-sample vectors."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nnx.Module):
  """Multi-head self-attention with a fused ``qkv`` projection.

  The fused kernel's output is laid out ``(3, heads, head_dim)`` like timm's
  ``Attention``, so PyTorch checkpoints map by a transpose.
  ``implementation`` is passed to ``jax.nn.dot_product_attention`` (None lets
  XLA choose; 'cudnn' selects the fused flash kernel on GPU).
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs,
               qkv_bias: bool = True, implementation: str | None = None):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.implementation = implementation
    self.qkv = Dense(dim, 3 * dim, rngs=rngs, axes=("embed", "heads"),
                     use_bias=qkv_bias)
    self.proj = Dense(dim, dim, rngs=rngs, axes=("heads", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v,
                                       implementation=self.implementation)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """Two dense layers with an activation in between (timm ``Mlp``)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs,
               approximate_gelu: bool = True):
    self.approximate_gelu = approximate_gelu
    self.fc1 = Dense(dim, hidden, rngs=rngs, axes=("embed", "mlp"))
    self.fc2 = Dense(hidden, dim, rngs=rngs, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu))


def timestep_frequencies(t: jax.Array, dim: int = 256,
                         max_period: float = 10000.0) -> jax.Array:
  """GLIDE sinusoidal features of ``t`` (not rescaled), ordered [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nnx.Module):
  """Sinusoidal features -> Linear -> SiLU -> Linear (weights N(0, 0.02))."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs, freq_dim: int = 256):
    self.freq_dim = freq_dim
    self.fc1 = Dense(freq_dim, hidden, rngs=rngs, axes=(None, "embed"),
                     kernel_init=normal(0.02))
    self.fc2 = Dense(hidden, hidden, rngs=rngs, axes=("mlp", "embed"),
                     kernel_init=normal(0.02))

  def __call__(self, t: jax.Array, dtype=jnp.float32) -> jax.Array:
    f = timestep_frequencies(t, self.freq_dim).astype(dtype)
    return self.fc2(jax.nn.silu(self.fc1(f)))


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE 1-D sin-cos embedding, [sin, cos] halves (float64 math)."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, extra_tokens: int = 0) -> np.ndarray:
  """MAE 2-D sin-cos table ``(extra + grid**2, dim)``; extra slots are zero.

  The grid is built with ``meshgrid(w, h)`` as in MAE, so the first half of
  the channels encodes the column index and the second half the row index.
  """
  coords = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(coords, coords), axis=0)  # (2, h, w); [0]=col
  emb = np.concatenate([sincos_1d(dim // 2, grid[0]),
                        sincos_1d(dim // 2, grid[1])], axis=1)
  if extra_tokens:
    emb = np.concatenate([np.zeros((extra_tokens, dim)), emb], axis=0)
  return emb.astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """NHWC -> (B, (H/p)*(W/p), p*p*C), per-token layout (p_row, p_col, C)."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"input {x.shape} is not divisible by patch size {p}")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, c: int, grid_hw: tuple[int, int]) -> jax.Array:
  """Inverse of :func:`patchify`: (B, N, p*p*C) -> NHWC."""
  b = x.shape[0]
  gh, gw = grid_hw
  x = x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)


class Conv(nnx.Module):
  """2-D convolution, NHWC, HWIO kernel; ``padding`` as in ``lax.conv``.

  An int padding pads symmetrically like PyTorch's ``padding=`` argument.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int | tuple[int, int],
               *, rngs: nnx.Rngs, stride: int | tuple[int, int] = 1,
               padding: int | tuple[int, int] | str = 0, use_bias: bool = True,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               axes: tuple[str | None, str | None] = (None, None)):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if isinstance(padding, str):
      self.padding = padding
    else:
      ph, pw = (padding, padding) if isinstance(padding, int) else padding
      self.padding = ((ph, ph), (pw, pw))
    self.kernel = param(rngs, kernel_init, (kh, kw, in_ch, out_ch),
                        (None, None) + tuple(axes))
    self.bias = param(rngs, zeros, (out_ch,), axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), self.stride, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class GroupNorm(nnx.Module):
  """GroupNorm over NHWC (statistics in float32), PyTorch semantics."""

  def __init__(self, channels: int, groups: int = 32, *, rngs: nnx.Rngs,
               eps: float = 1e-6):
    if channels % groups:
      raise ValueError(f"{channels} channels not divisible into {groups} groups")
    self.groups, self.eps = groups, eps
    self.scale = param(rngs, ones, (channels,), (None,))
    self.bias = param(rngs, zeros, (channels,), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = xf.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class BatchNorm(nnx.Module):
  """BatchNorm over all but the last axis with PyTorch semantics.

  Running statistics are ``nnx.BatchStat`` variables (``mean``, ``var``).
  ``__call__(x, train)``: in training mode the batch statistics normalise and
  the method returns the updated running statistics through the variables
  (momentum as PyTorch: ``new = (1 - m) * old + m * batch``, unbiased batch
  variance for the running estimate).
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
               momentum: float = 0.1, affine: bool = True):
    self.eps, self.momentum = eps, momentum
    self.scale = param(rngs, ones, (channels,), (None,)) if affine else None
    self.bias = param(rngs, zeros, (channels,), (None,)) if affine else None
    self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), logical_axes=(None,))
    self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), logical_axes=(None,))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      n = np.prod([x.shape[a] for a in axes])
      unbiased = var * n / max(n - 1, 1)
      m = self.momentum
      self.mean.value = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var.value = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = self.mean[...], self.var[...]
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)
