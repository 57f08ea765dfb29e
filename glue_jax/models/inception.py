"""The FID Inception v3 of pytorch-fid (``fid_inception_v3()``), in Flax NNX.

This is the network of TensorFlow's ``inception-2015-12-05`` graph as ported by
pytorch-fid: torchvision's ``Inception3`` (1008 classes, no aux head) with the
FID patches of ``pytorch_fid.inception``:

- ``FIDInceptionA/C/E_1``: the 3x3 average pool of the pool branch ignores the
  zero padding (``count_include_pad=False``, TensorFlow's behaviour);
- ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch uses a 3x3 MAX pool
  (stride 1, padding 1) instead of an average pool;
- ``BasicConv2d`` = conv (no bias) + BatchNorm (eps 1e-3, running statistics
  only) + ReLU.

Inputs are NHWC images in [0, 1]; like ``pytorch_fid.InceptionV3`` they are
resized to 299x299 with ``F.interpolate(mode='bilinear', align_corners=False)``
(no antialiasing) and mapped to [-1, 1].  Outputs (see :meth:`FIDInception.__call__`):
``pool3`` (B, 2048), ``logits`` (B, 1008) and ``spatial`` (B, 17, 17, 7), the
sFID features of the ADM evaluator.

Weights: see :mod:`glue_jax.models.inception_weights` (``load_inception``,
``save_npz``, ``random_inception``).  Nothing is ever downloaded implicitly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models.layers import BatchNorm, Conv, Dense, normal

INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


# --------------------------------------------------------------------- resize

def _linear_taps(n_in: int, n_out: int, half_pixel: bool):
  """Source indices and weights of 1-D bilinear resampling ``n_in -> n_out``."""
  scale = np.float32(n_in) / np.float32(n_out)
  if half_pixel:  # torch align_corners=False: float scale, double arithmetic
    dst = np.arange(n_out, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
  else:  # TF1 ResizeBilinear, align_corners=False, half_pixel_centers=False
    src = scale * np.arange(n_out, dtype=np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, np.float32(1) - w1, w1


def resize_bilinear(x: jax.Array, size: tuple[int, int], *,
                    half_pixel: bool = True) -> jax.Array:
  """Bilinear resize of NHWC images without antialiasing.

  Args:
    x: (B, H, W, C) images.
    size: output (height, width).
    half_pixel: True matches ``F.interpolate(mode='bilinear',
      align_corners=False)`` (pytorch-fid); False matches TF1's legacy
      ``ResizeBilinear`` (``half_pixel_centers=False``) used inside the
      TensorFlow Inception graph of the ADM evaluator.

  Returns:
    (B, size[0], size[1], C) in the dtype of ``x``.
  """
  for axis, n_out in ((1, size[0]), (2, size[1])):
    n_in = x.shape[axis]
    if n_in == n_out:
      continue
    i0, i1, w0, w1 = _linear_taps(n_in, n_out, half_pixel)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    x = jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1
  return x


# -------------------------------------------------------------------- pooling

def _window(x, init, op, k, stride, pad):
  return jax.lax.reduce_window(x, init, op, (1, k, k, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def max_pool(x: jax.Array, k: int = 3, stride: int = 2, pad: int = 0) -> jax.Array:
  """``F.max_pool2d`` (padding counts as -inf; floor mode)."""
  return _window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, k, stride, pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3/stride 1/padding 1 average pool with ``count_include_pad=False``."""
  total = _window(x, jnp.array(0, x.dtype), jax.lax.add, 3, 1, 1)
  h, w = x.shape[1], x.shape[2]
  rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
  cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
  count = np.outer(rows, cols).astype(np.float32)[None, :, :, None]
  return total / jnp.asarray(count, x.dtype)


# --------------------------------------------------------------------- blocks

class BasicConv(nnx.Module):
  """torchvision ``BasicConv2d``: conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *,
               rngs: nnx.Rngs, stride: int = 1,
               padding: int | tuple[int, int] = 0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    # He-normal; real weights are loaded (see load_inception, random_inception).
    self.conv = Conv(cin, cout, kernel, rngs=rngs, stride=stride,
                     padding=padding, use_bias=False,
                     kernel_init=normal(math.sqrt(2.0 / (kh * kw * cin))))
    self.bn = BatchNorm(cout, rngs=rngs, eps=1e-3)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  """``FIDInceptionA`` (Mixed_5b/c/d); pool branch excludes padding."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, rngs=rngs, padding=2)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, rngs=rngs, padding=1)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, rngs=rngs, padding=1)
    self.branch_pool = BasicConv(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """torchvision ``InceptionB`` (Mixed_6a), the 35 -> 17 reduction."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(cin, 384, 3, rngs=rngs, stride=2)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, rngs=rngs, padding=1)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, rngs=rngs, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
  """``FIDInceptionC`` (Mixed_6b..6e); pool branch excludes padding."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), rngs=rngs, padding=(0, 3))
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), rngs=rngs, padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), rngs=rngs, padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), rngs=rngs, padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), rngs=rngs, padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), rngs=rngs, padding=(0, 3))
    self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

  def branches(self, x: jax.Array) -> list[jax.Array]:
    """The four branch outputs, in concatenation order."""
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = layer(d)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return [self.branch1x1(x), b7, d, bp]

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
  """torchvision ``InceptionD`` (Mixed_7a), the 17 -> 8 reduction."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, rngs=rngs, stride=2)
    self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), rngs=rngs, padding=(0, 3))
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), rngs=rngs, padding=(3, 0))
    self.branch7x7x3_4 = BasicConv(192, 192, 3, rngs=rngs, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
  """``FIDInceptionE_1`` (``pool='avg'``, Mixed_7b) / ``_2`` (``'max'``, Mixed_7c)."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs, pool: str = "avg"):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), rngs=rngs, padding=(0, 1))
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), rngs=rngs, padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, rngs=rngs, padding=1)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), rngs=rngs, padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), rngs=rngs, padding=(1, 0))
    self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = (avg_pool_exclude_pad(x) if self.pool == "avg"
              else max_pool(x, 3, 1, 1))
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(t), self.branch3x3_2b(t),
        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
        self.branch_pool(pooled)], axis=-1)



# ---------------------------------------------------------------------- model

class FIDInception(nnx.Module):
  """pytorch-fid's FID Inception v3 (inference only), attribute names as torch.

  Args:
    rngs: initialiser keys (weights are meant to be loaded, see
      :func:`glue_jax.models.inception_weights.load_inception`).
    num_classes: width of ``fc`` (1008 for the FID weights).
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  """

  def __init__(self, *, rngs: nnx.Rngs, num_classes: int = 1008,
               dtype=jnp.float32):
    self.dtype = dtype
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, rngs=rngs, stride=2)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, rngs=rngs, padding=1)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, rngs=rngs, pool="avg")
    self.Mixed_7c = InceptionE(2048, rngs=rngs, pool="max")
    self.fc = Dense(2048, num_classes, rngs=rngs, axes=(None, None),
                    kernel_init=normal(0.01))

  def preprocess(self, x: jax.Array, *, resize: str | None = "torch",
                 normalize: bool = True) -> jax.Array:
    """Images in [0, 1] (or uint8 in [0, 255]) -> network input.

    ``resize``: 'torch' (pytorch-fid, half-pixel bilinear), 'tf1' (legacy TF
    ``ResizeBilinear`` of the TF graph) or None (keep the size).
    ``normalize``: ``2 x - 1`` as pytorch-fid.  (The ADM evaluator instead
    feeds [0, 255] pixels that the TF graph maps with ``(x - 128) / 128``;
    to reproduce that pass ``normalize=False`` and already mapped pixels.)
    """
    if jnp.issubdtype(x.dtype, jnp.integer):
      x = x.astype(jnp.float32) / 255.0
    x = x.astype(jnp.float32)
    if resize is not None:
      if resize not in ("torch", "tf1"):
        raise ValueError(f"resize must be 'torch', 'tf1' or None, got {resize!r}")
      x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE),
                          half_pixel=(resize == "torch"))
    if normalize:
      x = 2 * x - 1
    return x.astype(self.dtype)

  def __call__(self, x: jax.Array, *, resize: str | None = "torch",
               normalize: bool = True) -> dict[str, jax.Array]:
    """Features of NHWC images ``x`` in [0, 1].

    Returns:
      dict with float32 arrays
      - ``pool3`` (B, 2048): the final adaptive average pool, i.e.
        ``pytorch_fid.InceptionV3([3])`` (TF ``pool_3:0``), for FID;
      - ``logits`` (B, 1008): ``fc(pool3)`` with bias (TF ``softmax/logits``);
        the ADM evaluator's Inception Score uses ``pool3 @ fc.kernel`` without
        the bias, see :meth:`logits_without_bias`;
      - ``spatial`` (B, 17, 17, 7): channels 0..6 of the ReLU output of
        ``Mixed_6d.branch1x1``, which are also channels 0..6 of ``Mixed_6d``'s
        output.  ``Mixed_6d`` is the TF graph's 7th mixed block ``mixed_6``
        and its 1x1 branch is ``mixed_6/conv`` (the pytorch-fid/torch-fidelity
        weight ports map ``mixed_6/conv`` -> ``Mixed_6d.branch1x1``), so this is
        the ADM evaluator's sFID tensor ``mixed_6/conv:0[..., :7]``; flattened
        with ``reshape(B, -1)`` (H, W, C order) it has ADM's 2023-d layout.
        Spatially 17x17 only for 299x299 network input (the default resize).
    """
    h = self.preprocess(x, resize=resize, normalize=normalize)
    h = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(h)))
    h = max_pool(h)
    h = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(h)))
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c):
      h = block(h)
    parts = self.Mixed_6d.branches(h)
    spatial = parts[0][..., :SPATIAL_CHANNELS]
    h = jnp.concatenate(parts, axis=-1)
    for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      h = block(h)
    pool3 = h.astype(jnp.float32).mean(axis=(1, 2))
    logits = jnp.dot(pool3, self.fc.kernel[...]) + self.fc.bias[...]
    return {"pool3": pool3, "logits": logits,
            "spatial": spatial.astype(jnp.float32)}

  def logits_without_bias(self, pool3: jax.Array) -> jax.Array:
    """``pool3 @ W`` without the fc bias, as the ADM evaluator's IS graph."""
    return jnp.dot(pool3, self.fc.kernel[...])
