"""Stable Diffusion's KL autoencoder (``sd-vae-ft-mse`` / ``-ema``) in Flax NNX.

A faithful port of diffusers' ``AutoencoderKL`` with its ``Encoder``
(``DownEncoderBlock2D`` stages), ``Decoder`` (``UpDecoderBlock2D`` stages) and
``UNetMidBlock2D`` (resnet, single-head self-attention, resnet).  The module
tree mirrors diffusers' parameter names (``encoder/down_blocks/0/resnets/1/
conv2/kernel`` <-> ``encoder.down_blocks.0.resnets.1.conv2.weight``), which
keeps the weight mapping in :mod:`glue_jax.models.vae_weights` mechanical.

Latent spaces: :meth:`AutoencoderKL.encode_moments` and
:meth:`AutoencoderKL.decode` work in the *raw posterior* space, exactly like
diffusers' ``encode(x).latent_dist`` and ``decode(z)``.  Diffusion models are
trained on ``(z - shift_factor) * scaling_factor``
(:meth:`AutoencoderKL.to_model_space`); undo that with
:meth:`AutoencoderKL.from_model_space` before :meth:`decode`.

Images are NHWC float32 in ``[-1, 1]``; latents are NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from glue_jax.models import layers

_NONE2 = (None, None)
_DOWN_TYPE, _UP_TYPE = "DownEncoderBlock2D", "UpDecoderBlock2D"
# diffusers config keys with no effect on the network computed here.
_IGNORED_KEYS = ("sample_size", "force_upcast", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Mirror of diffusers' ``AutoencoderKL`` config; defaults = SD's VAE.

  Attributes:
    in_channels: image channels fed to the encoder.
    out_channels: image channels produced by the decoder.
    latent_channels: channels of the latent (posterior mean).
    block_out_channels: width of each resolution stage; ``len - 1``
      downsamplings (factor 8 for the default four stages).
    layers_per_block: resnets per encoder stage (decoder stages get one more).
    norm_num_groups: groups of every GroupNorm (eps 1e-6 throughout).
    scaling_factor: latent scale used by diffusion models (0.18215 for SD).
    shift_factor: latent shift (None for SD; used by newer VAEs).
    use_quant_conv: 1x1 conv on the encoder moments.
    use_post_quant_conv: 1x1 conv on the latents before decoding.
    mid_block_add_attention: self-attention inside the mid blocks.
    dtype: compute dtype (parameters stay float32; GroupNorm statistics and
      the attention softmax run in float32; outputs are float32).
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block width {c} is not divisible by "
                         f"norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "VAEConfig":
    """Builds a config from diffusers' ``config.json`` contents.

    Keys absent from ``config`` take diffusers' ``AutoencoderKL`` defaults
    (e.g. ``block_out_channels=(64,)``), as ``from_pretrained`` would; keys
    that do not change the network (``sample_size``, ``force_upcast``, ...)
    are ignored, unknown keys are logged.

    Raises:
      ValueError: for settings this port does not implement (other block
        types, activations or up/down block counts).
    """
    cfg = dict(config)
    cls_name = cfg.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
      raise ValueError(f"config describes a {cls_name}, not an AutoencoderKL")
    n = len(cfg.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", _DOWN_TYPE), ("up_block_types", _UP_TYPE)):
      types = list(cfg.pop(key, [want]))
      if len(types) != n or any(t != want for t in types):
        raise ValueError(f"{key}={types} unsupported: need {n} x {want!r}")
    act = cfg.pop("act_fn", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"act_fn={act!r} unsupported (only silu)")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {}
    for key, value in cfg.items():
      if key in fields:
        kwargs[key] = tuple(value) if isinstance(value, list) else value
      elif not key.startswith("_") and key not in _IGNORED_KEYS:
        logging.warning("VAEConfig: ignoring unknown diffusers key %r=%r", key, value)
    # diffusers' own defaults where SD's config.json omits a key.
    kwargs.setdefault("block_out_channels", (64,))
    kwargs.setdefault("layers_per_block", 1)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict describing this network."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != "dtype"}
    out["block_out_channels"] = list(self.block_out_channels)
    n = len(self.block_out_channels)
    out.update(_class_name="AutoencoderKL", act_fn="silu",
               down_block_types=[_DOWN_TYPE] * n, up_block_types=[_UP_TYPE] * n)
    return out


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, **kw) -> layers.Conv:
  return layers.Conv(cin, cout, k, rngs=rngs, padding=k // 2, axes=_NONE2, **kw)


class ResnetBlock(nnx.Module):
  """diffusers ``ResnetBlock2D`` without time embedding (pre-norm, SiLU)."""

  def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
    self.norm1 = layers.GroupNorm(cin, groups, rngs=rngs, eps=1e-6)
    self.conv1 = _conv(cin, cout, 3, rngs)
    self.norm2 = layers.GroupNorm(cout, groups, rngs=rngs, eps=1e-6)
    self.conv2 = _conv(cout, cout, 3, rngs)
    self.conv_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class SpatialSelfAttention(nnx.Module):
  """Single-head self-attention over all pixels with GroupNorm and residual.

  diffusers' ``Attention(..., _from_deprecated_attn_block=True)`` as used by
  the VAE mid block: ``x + to_out(softmax(q k^T / sqrt(C)) v)`` where q, k, v
  are linear maps of ``group_norm(x)`` flattened to ``(B, H*W, C)``.
  """

  def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
    self.group_norm = layers.GroupNorm(channels, groups, rngs=rngs, eps=1e-6)
    dense = lambda: layers.Dense(channels, channels, rngs=rngs, axes=_NONE2)
    self.to_q, self.to_k, self.to_v, self.to_out = dense(), dense(), dense(), dense()

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    out = jax.nn.dot_product_attention(q, k, v)  # softmax in float32
    return x + self.to_out(out.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  """diffusers ``UNetMidBlock2D`` (one layer): resnet, attention, resnet."""

  def __init__(self, channels: int, groups: int, add_attention: bool, *,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs)
                             for _ in range(2)])
    self.attentions = nnx.List(
        [SpatialSelfAttention(channels, groups, rngs=rngs)] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after padding (0, 1) bottom/right, as diffusers does."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = layers.Conv(channels, channels, 3, rngs=rngs, stride=2,
                            padding=0, axes=_NONE2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Stage(nnx.Module):
  """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: resnets then resampling."""

  def __init__(self, cin: int, cout: int, n: int, groups: int, *,
               rngs: nnx.Rngs, down: bool = False, up: bool = False):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups,
                                         rngs=rngs) for i in range(n)])
    self.downsamplers = nnx.List([Downsample(cout, rngs=rngs)] if down else [])
    self.upsamplers = nnx.List([Upsample(cout, rngs=rngs)] if up else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.resnets:
      x = block(x)
    for resample in (*self.downsamplers, *self.upsamplers):
      x = resample(x)
    return x


class Encoder(nnx.Module):
  """Image -> ``2 * latent_channels`` moments (mean, logvar) before quant."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = _conv(cfg.in_channels, ch[0], 3, rngs)
    self.down_blocks = nnx.List([
        Stage(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, rngs=rngs,
              down=i < len(ch) - 1) for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, rngs=rngs)
    self.conv_norm_out = layers.GroupNorm(ch[-1], g, rngs=rngs, eps=1e-6)
    self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for stage in self.down_blocks:
      x = stage(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent (after ``post_quant_conv``) -> image."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = _conv(cfg.latent_channels, ch[0], 3, rngs)
    self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, rngs=rngs)
    self.up_blocks = nnx.List([
        Stage(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, rngs=rngs,
              up=i < len(ch) - 1) for i, c in enumerate(ch)])
    self.conv_norm_out = layers.GroupNorm(ch[-1], g, rngs=rngs, eps=1e-6)
    self.conv_out = _conv(ch[-1], cfg.out_channels, 3, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for stage in self.up_blocks:
      x = stage(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """SD's KL-regularised autoencoder; see the module docstring for spaces."""

  def __init__(self, cfg: VAEConfig = VAEConfig(), *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    lc = cfg.latent_channels
    self.quant_conv = _conv(2 * lc, 2 * lc, 1, rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = (_conv(lc, lc, 1, rngs) if cfg.use_post_quant_conv
                            else None)

  def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(mean, logvar)`` of the posterior, logvar clamped to [-30, 20]."""
    h = self.encoder(images.astype(self.cfg.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior ``(mean, std)``, NHWC float32, raw (unscaled) latent space.

    Args:
      images: ``(B, H, W, in_channels)`` in ``[-1, 1]``; H and W multiples of
        :attr:`VAEConfig.downsample_factor`.
    """
    mean, logvar = self.posterior(images)
    return mean, jnp.exp(0.5 * logvar)

  def encode(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """A posterior sample ``mean + std * eps`` (raw latent space)."""
    mean, std = self.encode_moments(images)
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Raw-space latents -> images NHWC float32 (nominally ``[-1, 1]``).

    ``latents`` are in the posterior's own space: divide diffusion-model
    latents by ``scaling_factor`` first (:meth:`from_model_space`).  The
    output is not clipped, as in diffusers.
    """
    z = latents.astype(self.cfg.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def to_model_space(self, z: jax.Array) -> jax.Array:
    """Raw latents -> diffusion-model latents ``(z - shift) * scale``."""
    shift = self.cfg.shift_factor or 0.0
    return (z - shift) * self.cfg.scaling_factor

  def from_model_space(self, z: jax.Array) -> jax.Array:
    """Diffusion-model latents -> raw latents (inverse of to_model_space)."""
    shift = self.cfg.shift_factor or 0.0
    return z / self.cfg.scaling_factor + shift


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_method(graphdef: nnx.GraphDef, name: str, state: nnx.State, *args):
  return getattr(nnx.merge(graphdef, state), name)(*args)


def jit_method(model: nnx.Module, name: str) -> Callable[..., Any]:
  """``jax.jit`` of ``model.<name>`` with the weights bound (plain JAX jit).

  The parameters are an argument of the compiled program (not constants), so
  models of the same structure share compilations.  The returned function
  uses the weights the model holds at the time of this call.
  """
  graphdef, state = nnx.split(model)
  return functools.partial(_run_method, graphdef, name, state)
