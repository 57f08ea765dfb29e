"""An exact, invertible first stage: pixels -> space-to-depth "latents".

Used by the demo when no SD-VAE weights are given.  ``encode`` maps uint8 (or
[0, 1] float) NHWC images to [-1, 1] and folds ``factor`` x ``factor`` pixel
blocks into channels: (B, H, W, C) -> (B, H/f, W/f, f*f*C).  ``decode`` is the
exact inverse (up to float rounding), back to [-1, 1] pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def latent_shape(image_size: int, channels: int, factor: int) -> tuple[int, int, int]:
  if image_size % factor:
    raise ValueError(f"image size {image_size} not divisible by factor {factor}")
  return image_size // factor, image_size // factor, channels * factor * factor


def to_signed(images) -> jax.Array:
  """uint8 -> [-1, 1]; float input is taken as [0, 1]."""
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32) * 2.0 - 1.0


def encode(images, factor: int) -> jax.Array:
  x = to_signed(images)
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"images {x.shape} not divisible by factor {factor}")
  x = x.reshape(b, h // factor, factor, w // factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // factor, w // factor, factor * factor * c)


def decode(latents: jax.Array, factor: int, channels: int = 3) -> jax.Array:
  b, h, w, cc = latents.shape
  if cc != factor * factor * channels:
    raise ValueError(f"latents {latents.shape} do not hold {factor}x{factor}x{channels} pixels")
  x = latents.reshape(b, h, w, factor, factor, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * factor, w * factor, channels)


def to_uint8(images_signed: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 by truncation, as REGLUE's sampler writes images."""
  x = jnp.clip((images_signed + 1.0) * 127.5, 0, 255)
  return x.astype(jnp.uint8)
