"""First stages by name: what maps images to the diffusion state and back.

- ``pixel``: the exact space-to-depth tokenizer (``factor``), no weights.
- ``vae``: the SD AutoencoderKL (``path`` to converted or upstream weights).

``decode_uint8(latents)`` takes latents in *model space* (after the
``scale``/``shift`` of the trainer) and returns uint8 NHWC images.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from glue_jax.models import pixel_tokenizer, vae_weights


@dataclasses.dataclass
class FirstStage:
  name: str
  scale: float
  shift: float
  factor: int = 1
  channels: int = 3
  vae: object = None

  def encode(self, images, key=None):
    """uint8 images -> model-space latents (posterior mean for the VAE)."""
    if self.name == "pixel":
      z = pixel_tokenizer.encode(images, self.factor)
    else:
      mean, _ = self.vae.encode_moments(pixel_tokenizer.to_signed(images))
      z = mean
    return (z - self.shift) * self.scale

  def decode(self, latents):
    z = latents / self.scale + self.shift
    if self.name == "pixel":
      return pixel_tokenizer.decode(z, self.factor, self.channels)
    return self.vae.decode(z)

  def decode_uint8(self, latents):
    return pixel_tokenizer.to_uint8(self.decode(jnp.asarray(latents, jnp.float32)))


def build(cfg: dict) -> FirstStage:
  name = cfg.get("name", "pixel")
  if name == "pixel":
    return FirstStage("pixel", float(cfg.get("scale", 1.0)), float(cfg.get("shift", 0.0)),
                      factor=int(cfg.get("factor", 2)), channels=int(cfg.get("channels", 3)))
  if name == "vae":
    model = vae_weights.load_vae(cfg["path"])
    return FirstStage("vae", float(cfg.get("scale", 0.18215)), float(cfg.get("shift", 0.0)),
                      vae=model)
  raise ValueError(f"unknown first stage {name!r}; 'pixel' or 'vae'")

