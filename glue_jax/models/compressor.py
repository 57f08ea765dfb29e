"""REGLUE's semantic compressor: a conv autoencoder over DINOv2 features (REGLUE paper).

The official ``--encoder_channel_list`` (default ``3072,256,16``) builds the
encoder as Conv3x3(c0 -> c1) -> ResidualBlock(c1) -> Conv3x3(c1 -> c2) ...,
a residual block after every conv but the last, no output activation; the
decoder mirrors the list (training only).  ResidualBlock: conv -> BN -> ReLU
-> conv -> BN -> + input -> ReLU.  All convs 3x3, stride 1, padding 1, with
bias; BatchNorm with PyTorch semantics (eps 1e-5, momentum 0.1).  The default
has 16,595,472 parameters.  At diffusion time only the encoder runs, frozen,
with BatchNorm in inference mode.

The layers of each coder sit in one list in the official ``nn.Sequential``
order, so ``encoder.model.<i>`` of an official state dict is ``encoder/layers/<i>``
here (``compressor_weights``).

Losses (``compressor_loss``): 'mse' (the paper's default, REGLUE Table 7) and
'mse_kl' (the VAE-style alternative of Table 7: the last encoder conv emits a
mean and a log-variance, training decodes a posterior sample and adds
``kl_weight`` x KL to N(0, I); inference uses the mean).  The GAN variant of
Table 7 is not implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from glue_jax.models import layers


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
  channels: tuple[int, ...] = (3072, 256, 16)   # official --encoder_channel_list
  variational: bool = False                     # 'mse_kl': encoder emits mean, logvar

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    if len(self.channels) < 2 or min(self.channels) <= 0:
      raise ValueError(f"compressor channels={self.channels}: need >= 2 positive sizes")

  @property
  def in_channels(self) -> int:
    return self.channels[0]

  @property
  def out_channels(self) -> int:
    return self.channels[-1]


class ResidualBlock(nnx.Module):
  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.conv1 = layers.Conv(c, c, 3, padding=1, rngs=rngs)
    self.bn1 = layers.BatchNorm(c, rngs=rngs)
    self.conv2 = layers.Conv(c, c, 3, padding=1, rngs=rngs)
    self.bn2 = layers.BatchNorm(c, rngs=rngs)

  def __call__(self, x, train: bool = False):
    h = jax.nn.relu(self.bn1(self.conv1(x), train))
    h = self.bn2(self.conv2(h), train)
    return jax.nn.relu(h + x)


class Coder(nnx.Module):
  """Conv, residual block, conv, ... over a channel list (one direction)."""

  def __init__(self, channels: tuple[int, ...], *, rngs: nnx.Rngs, last_out: int | None = None):
    mods = []
    for i in range(len(channels) - 1):
      out = channels[i + 1]
      if i == len(channels) - 2 and last_out is not None:
        out = last_out
      mods.append(layers.Conv(channels[i], out, 3, padding=1, rngs=rngs))
      if i < len(channels) - 2:
        mods.append(ResidualBlock(out, rngs=rngs))
    self.layers = nnx.List(mods)

  def __call__(self, x, train: bool = False):
    for m in self.layers:
      x = m(x, train) if isinstance(m, ResidualBlock) else m(x)
    return x


class Compressor(nnx.Module):
  def __init__(self, cfg: CompressorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    last = 2 * cfg.out_channels if cfg.variational else None
    self.encoder = Coder(cfg.channels, rngs=rngs, last_out=last)
    self.decoder = Coder(cfg.channels[::-1], rngs=rngs)

  def moments(self, x, train: bool = False):
    """``(mean, logvar)``; logvar is None for the deterministic compressor."""
    h = self.encoder(x, train)
    if not self.cfg.variational:
      return h, None
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, x, train: bool = False):
    """Standardized features (B, h, w, C_in) -> compressed (B, h, w, C_out)."""
    return self.moments(x, train)[0]

  def __call__(self, x, train: bool = False, key: jax.Array | None = None):
    """Reconstruction of ``x`` through the bottleneck (a posterior sample
    when variational and ``key`` is given)."""
    mean, logvar = self.moments(x, train)
    z = mean
    if logvar is not None and key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return self.decoder(z, train)


def standardize(features, mean, std, eps: float = 0.0):
  """Per-channel ``(f - mean) / std`` (released REGLUE stats or our own)."""
  return (features - mean) / (std + eps)


def compressor_loss(model: Compressor, x: jax.Array, key: jax.Array, *,
                    kind: str = "mse", kl_weight: float = 1e-6, train: bool = True):
  """``(loss, {'mse', 'kl'})`` of one batch of standardized features.

  'mse': mean squared reconstruction error over all elements (official
  ``nn.MSELoss``).  'mse_kl': MSE of a posterior sample's reconstruction plus
  ``kl_weight`` x the KL to N(0, I), summed over channels and averaged over
  positions (the weight is a choice: REGLUE does not give it).
  """
  if kind not in ("mse", "mse_kl"):
    raise ValueError(f"compressor loss {kind!r}: 'mse' or 'mse_kl'")
  if (kind == "mse_kl") != model.cfg.variational:
    raise ValueError(f"compressor loss {kind!r} needs variational="
                     f"{kind == 'mse_kl'} (config has {model.cfg.variational})")
  mean, logvar = model.moments(x, train)
  z = mean
  kl = jnp.zeros((), jnp.float32)
  if logvar is not None:
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, -1))
  mse = jnp.mean(jnp.square(model.decoder(z, train) - x))
  return mse + kl_weight * kl, {"mse": mse, "kl": kl}
