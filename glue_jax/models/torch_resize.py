"""PyTorch-exact bicubic resizing, written as interpolation matrices.

``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`` is
separable: along each spatial axis the output is a fixed linear combination
of the input samples.  This module builds that ``(out, in)`` matrix in numpy
(float64, once per shape) for the two CPU/GPU kernels PyTorch has:

* ``antialias=False``: Keys cubic convolution with ``A = -0.75`` (OpenCV's
  choice), source coordinate ``(i + 0.5) * scale - 0.5`` and the four taps
  clamped to the border (replicate padding);
* ``antialias=True``: the PIL-style separable filter with ``a = -0.5``, its
  support widened by ``scale`` when downsampling, taps outside the image
  dropped and the remaining weights renormalised to sum to one.

``scale`` is ``in / out`` unless ``scale_factor`` is passed, in which case it
is ``1 / scale_factor`` exactly as PyTorch does when ``interpolate`` is called
with ``scale_factor=`` (and ``recompute_scale_factor`` unset).  Only the
``align_corners=False`` convention is implemented.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def torch_output_size(in_size: int, scale_factor: float) -> int:
  """Output length PyTorch picks for ``scale_factor`` (``floor(in * s)``)."""
  return int(math.floor(in_size * float(scale_factor)))


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel with parameter ``a``, for ``|x|``."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _scale(in_size: int, out_size: int, scale_factor: float | None) -> float:
  if scale_factor is not None and scale_factor > 0:
    return 1.0 / float(scale_factor)
  return in_size / out_size


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False,
                   scale_factor: float | None = None) -> np.ndarray:
  """The ``(out_size, in_size)`` float64 matrix of PyTorch's bicubic resize.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.
    antialias: PyTorch's ``antialias`` flag.
    scale_factor: the ``scale_factor`` PyTorch was called with, if any; it
      only changes the coordinate mapping, ``out_size`` stays as given.

  Returns:
    A read-only matrix ``W`` with ``out = W @ in`` along that axis.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"cannot resize {in_size} -> {out_size}")
  scale = _scale(in_size, out_size, scale_factor)
  w = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    # PyTorch's CPU kernel evaluates the source coordinate in float32 as one
    # fused multiply-add, fma(scale, i + 0.5, -0.5); the float64 product of
    # two float32 numbers is exact, so rounding it once to float32 matches.
    # This keeps e.g. 512->448 resizes within 1e-6 of PyTorch.
    f32 = np.float32
    half = (np.arange(out_size, dtype=f32) + f32(0.5)).astype(np.float64)
    src = (np.float64(f32(scale)) * half - 0.5).astype(f32)  # no clamp for cubic
    base = np.floor(src)
    t = (src - base).astype(np.float64)
    coeffs = np.stack([_keys_cubic(t + 1.0, -0.75), _keys_cubic(t, -0.75),
                       _keys_cubic(1.0 - t, -0.75), _keys_cubic(2.0 - t, -0.75)],
                      axis=1)
    for k in range(4):
      idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
      np.add.at(w, (np.arange(out_size), idx), coeffs[:, k])
  else:
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
      center = scale * (i + 0.5)
      # C++ casts truncate toward zero; the max() makes that equal to floor
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      j = np.arange(lo, hi, dtype=np.float64)
      wt = _keys_cubic((j - center + 0.5) * invscale, -0.5)
      total = wt.sum()
      if total != 0.0:
        wt = wt / total
      w[i, lo:hi] = wt
  w.setflags(write=False)
  return w


def resize_bicubic(x: jax.Array, size: Sequence[int], *, antialias: bool = False,
                   scale_factor: Sequence[float] | None = None,
                   axes: tuple[int, int] = (1, 2)) -> jax.Array:
  """Resizes two spatial axes of ``x`` like ``F.interpolate(mode='bicubic')``.

  Args:
    x: array whose ``axes`` are (height, width); NHWC by default.
    size: output ``(height, width)``.
    antialias: PyTorch's ``antialias`` flag.
    scale_factor: optional ``(sy, sx)`` PyTorch was called with instead of
      ``size`` (see :func:`bicubic_matrix`).
    axes: positions of the height and width axes in ``x``.

  Returns:
    The resized array in the dtype of ``x`` (float inputs) or float32.
  """
  ah, aw = (a % x.ndim for a in axes)
  out_h, out_w = (int(s) for s in size)
  sy, sx = scale_factor if scale_factor is not None else (None, None)
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  x = x.astype(dtype)
  if x.shape[ah] != out_h or sy is not None:
    wy = jnp.asarray(bicubic_matrix(x.shape[ah], out_h, antialias=antialias,
                                    scale_factor=sy), dtype)
    x = jnp.moveaxis(jnp.tensordot(wy, x, axes=[[1], [ah]],
                                   precision=jax.lax.Precision.HIGHEST), 0, ah)
  if x.shape[aw] != out_w or sx is not None:
    wx = jnp.asarray(bicubic_matrix(x.shape[aw], out_w, antialias=antialias,
                                    scale_factor=sx), dtype)
    x = jnp.moveaxis(jnp.tensordot(wx, x, axes=[[1], [aw]],
                                   precision=jax.lax.Precision.HIGHEST), 0, aw)
  return x
