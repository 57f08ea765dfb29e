"""REGLUE's semantic compressor: a deterministic conv autoencoder (spec b).

Encoder: Conv3x3(C_in -> hidden) -> ResidualBlock(hidden) -> Conv3x3(hidden ->
C_out), no output activation; the decoder mirrors it (training only).
ResidualBlock: conv -> BN -> ReLU -> conv -> BN -> + input -> ReLU.  All convs
3x3, stride 1, padding 1, with bias; BatchNorm with PyTorch semantics
(eps 1e-5, momentum 0.1).  Default channels 3072 -> 256 -> 16 (16.6M
parameters, 8.3M in the encoder).  At diffusion time only the encoder runs,
frozen, with BatchNorm in inference mode.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from glue_jax.models import layers


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
  in_channels: int = 3072
  hidden: int = 256
  out_channels: int = 16
  num_res_blocks: int = 1


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
  """Conv -> residual blocks -> conv (used for both directions)."""

  def __init__(self, c_in: int, hidden: int, c_out: int, n_res: int, *, rngs: nnx.Rngs):
    self.conv_in = layers.Conv(c_in, hidden, 3, padding=1, rngs=rngs)
    self.res = nnx.List([ResidualBlock(hidden, rngs=rngs) for _ in range(n_res)])
    self.conv_out = layers.Conv(hidden, c_out, 3, padding=1, rngs=rngs)

  def __call__(self, x, train: bool = False):
    h = self.conv_in(x)
    for blk in self.res:
      h = blk(h, train)
    return self.conv_out(h)


class Compressor(nnx.Module):
  def __init__(self, cfg: CompressorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Coder(cfg.in_channels, cfg.hidden, cfg.out_channels,
                         cfg.num_res_blocks, rngs=rngs)
    self.decoder = Coder(cfg.out_channels, cfg.hidden, cfg.in_channels,
                         cfg.num_res_blocks, rngs=rngs)

  def encode(self, x, train: bool = False):
    """Standardized features (B, h, w, C_in) -> compressed (B, h, w, C_out)."""
    return self.encoder(x, train)

  def __call__(self, x, train: bool = False):
    """Reconstruction of ``x`` through the bottleneck."""
    return self.decoder(self.encoder(x, train), train)


def standardize(features, mean, std, eps: float = 0.0):
  """Per-channel ``(f - mean) / std`` (released REGLUE stats or our own)."""
  return (features - mean) / (std + eps)
