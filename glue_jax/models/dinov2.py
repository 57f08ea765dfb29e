"""DINOv2 vision transformer (Flax NNX), as a frozen feature extractor.

Matches facebookresearch/dinov2 ``DinoVisionTransformer`` (torch hub models
``dinov2_vit{s,b,l,g}14[_reg]``) and HF ``Dinov2Model`` /
``Dinov2WithRegistersModel``: patch-14 convolution, cls token, optional
register tokens (no position embedding on them), pre-norm blocks with
LayerScale, LayerNorm eps 1e-6, exact-GELU MLP or (ViT-g) fused SwiGLU FFN.
The mask token of the checkpoints is only used in training and is not a
parameter here (loaders drop it explicitly).

Position embeddings are stored on the checkpoint's square grid (37x37 for the
released weights, which were trained at 518 px) and resized to the input's
patch grid with PyTorch-exact bicubic interpolation (see
:mod:`glue_jax.models.torch_resize`), computed once per input shape:

=========================  ===================================================
reference                  call to ``F.interpolate`` (bicubic, align_corners
                           False) on the ``(1, D, M, M)`` grid
=========================  ===================================================
hub, no registers          ``scale_factor=((gh + 0.1) / M, (gw + 0.1) / M)``,
                           ``antialias=False`` (``interpolate_offset=0.1``)
hub, ``_reg`` models       ``size=(gh, gw)``, ``antialias=True``
                           (``interpolate_offset=0``)
HF ``Dinov2Model``         ``size=(gh, gw)``, ``antialias=False``
HF ``Dinov2WithRegisters``  ``size=(gh, gw)``, ``antialias=True``
=========================  ===================================================

(HF as installed, transformers 5.x; older transformers releases used the
hub's 0.1-offset ``scale_factor`` form.)  So 'hub' and 'hf' only differ for
models without registers.  All four skip interpolation when the input has
``M*M`` patches and square pixels.  ``Dinov2Config.pos_interp`` selects the
convention; ``interpolate_offset`` / ``interpolate_antialias`` override it.

Images at the API are NHWC float32, already normalised with ImageNet
statistics (see :func:`preprocess_for_dinov2`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from glue_jax.models import layers
from glue_jax.models import torch_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# variant -> (width, depth, heads, ffn); every variant has 64-wide heads.
VARIANTS = {"s": (384, 12, 6, "mlp"), "b": (768, 12, 12, "mlp"),
            "l": (1024, 24, 16, "mlp"), "g": (1536, 40, 24, "swiglu")}
_VARIANT_WORDS = {"small": "s", "base": "b", "large": "l", "giant": "g"}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Hyper-parameters (all static).

  ``pos_grid`` is the side of the checkpoint's position grid (518 // 14 = 37
  for the released weights).  ``mlp_hidden`` overrides the FFN width derived
  from ``mlp_ratio`` (for SwiGLU: two thirds of it rounded up to a multiple of
  8, as the hub's ``SwiGLUFFNFused`` and HF's ``Dinov2SwiGLUFFN``).
  ``interpolate_offset``/``interpolate_antialias`` of None follow
  ``pos_interp`` (see the module docstring).
  """
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  mlp_hidden: int | None = None
  ffn: str = "mlp"                   # 'mlp' (exact GELU) | 'swiglu'
  patch_size: int = 14
  in_channels: int = 3
  pos_grid: int = 37
  num_registers: int = 0
  layerscale: bool = True
  qkv_bias: bool = True
  ln_eps: float = 1e-6
  pos_interp: str = "hub"            # 'hub' | 'hf'
  interpolate_offset: float | None = None
  interpolate_antialias: bool | None = None
  dtype: str = "float32"             # compute dtype; params stay float32
  attention_impl: str | None = None
  scan_layers: bool = True

  def __post_init__(self):
    if self.ffn not in ("mlp", "swiglu"):
      raise ValueError(f"ffn={self.ffn!r}; one of 'mlp', 'swiglu'")
    if self.pos_interp not in ("hub", "hf"):
      raise ValueError(f"pos_interp={self.pos_interp!r}; one of 'hub', 'hf'")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; one of {list(_DTYPES)}")

  @property
  def ffn_hidden(self) -> int:
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    h = int(self.dim * self.mlp_ratio)
    return (int(h * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else h

  @property
  def antialias(self) -> bool:
    if self.interpolate_antialias is not None:
      return self.interpolate_antialias
    return self.num_registers > 0

  @property
  def offset(self) -> float:
    if self.interpolate_offset is not None:
      return self.interpolate_offset
    return 0.1 if self.pos_interp == "hub" and self.num_registers == 0 else 0.0


def dinov2_config(variant: str = "b", registers: bool | None = None,
                  **overrides: Any) -> Dinov2Config:
  """Config of a released variant.

  ``variant``: 's'/'b'/'l'/'g', or names like 'vitb14', 'dinov2_vitb14_reg',
  'B/14', 'facebook/dinov2-with-registers-base'.  ``registers`` (4 register
  tokens) defaults to what the name says.
  """
  name = variant.lower().split("/")[-1] if "facebook/" in variant.lower() else variant.lower()
  m = re.fullmatch(r"(?:dinov2[_-])?(with-registers-)?(?:vit)?"
                   r"(s|b|l|g|small|base|large|giant)(?:/?14)?(_reg)?", name)
  if not m:
    raise ValueError(f"unknown DINOv2 variant {variant!r}; expected one of "
                     "s/b/l/g, 'vitb14_reg', 'facebook/dinov2-base', ...")
  size = _VARIANT_WORDS.get(m.group(2), m.group(2))
  if registers is None:
    registers = bool(m.group(1) or m.group(3))
  dim, depth, heads, ffn = VARIANTS[size]
  kw = dict(dim=dim, depth=depth, num_heads=heads, ffn=ffn,
            num_registers=4 if registers else 0)
  kw.update(overrides)
  return Dinov2Config(**kw)


def pos_interp_matrices(cfg: Dinov2Config, height: int, width: int):
  """``(wy, wx)`` float64 matrices resizing the position grid, or None.

  ``pos[gh, gw] = wy @ grid @ wx.T`` per channel, for an input of
  ``height x width`` pixels.  None when the references skip interpolation.
  """
  m, p = cfg.pos_grid, cfg.patch_size
  gh, gw = height // p, width // p
  if gh * gw == m * m and height == width:
    return None
  if cfg.offset:
    sy, sx = (gh + cfg.offset) / m, (gw + cfg.offset) / m
    got = (torch_resize.torch_output_size(m, sy), torch_resize.torch_output_size(m, sx))
    if got != (gh, gw):  # the hub code asserts the same
      raise ValueError(f"offset {cfg.offset} gives a {got} grid, not {(gh, gw)}")
  else:
    sy = sx = None
  return (torch_resize.bicubic_matrix(m, gh, antialias=cfg.antialias, scale_factor=sy),
          torch_resize.bicubic_matrix(m, gw, antialias=cfg.antialias, scale_factor=sx))


def preprocess_for_dinov2(images: jax.Array, size: int | Sequence[int] = 224
                          ) -> jax.Array:
  """REGLUE/REPA DINOv2 input pipeline on NHWC images.

  uint8 images are divided by 255 (float images must be in [0, 1]), then
  normalised with the ImageNet mean/std, then resized to ``size`` like
  ``F.interpolate(x, size, mode='bicubic')`` (align_corners False, no
  antialias; 256 -> 224 for 256 px generators, 512 -> 448 for 512 px).
  """
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  out = (size, size) if isinstance(size, int) else tuple(size)
  return torch_resize.resize_bicubic(x, out, antialias=False)


class LayerScale(nnx.Module):
  """Per-channel residual-branch scale ``x * gamma``."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, init: float = 1.0):
    self.gamma = layers.param(rngs, nnx.initializers.constant(init), (dim,),
                              ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class SwiGLU(nnx.Module):
  """Fused SwiGLU FFN: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.w12 = layers.Dense(dim, 2 * hidden, rngs=rngs, axes=("embed", "mlp"))
    self.w3 = layers.Dense(hidden, dim, rngs=rngs, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(a) * b)


class Dinov2Block(nnx.Module):
  """Pre-norm block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(ffn(norm2(x)))``."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.norm1 = layers.LayerNorm(d, rngs=rngs, eps=cfg.ln_eps)
    self.attn = layers.Attention(d, cfg.num_heads, rngs=rngs,
                                 qkv_bias=cfg.qkv_bias,
                                 implementation=cfg.attention_impl)
    self.norm2 = layers.LayerNorm(d, rngs=rngs, eps=cfg.ln_eps)
    if cfg.ffn == "swiglu":
      self.mlp = SwiGLU(d, cfg.ffn_hidden, rngs=rngs)
    else:
      self.mlp = layers.Mlp(d, cfg.ffn_hidden, rngs=rngs, approximate_gelu=False)
    self.ls1 = LayerScale(d, rngs=rngs) if cfg.layerscale else None
    self.ls2 = LayerScale(d, rngs=rngs) if cfg.layerscale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.attn(self.norm1(x))
    x = x + (self.ls1(h) if self.ls1 is not None else h)
    h = self.mlp(self.norm2(x))
    return x + (self.ls2(h) if self.ls2 is not None else h)


class Dinov2(nnx.Module):
  """DINOv2 ViT; ``model(images) -> dict`` like the hub's ``forward_features``."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.dim, cfg.patch_size
    self.patch_embed = layers.Conv(cfg.in_channels, d, p, stride=p, rngs=rngs,
                                   axes=(None, "embed"))
    self.cls_token = layers.param(rngs, layers.normal(1e-6), (1, 1, d),
                                  (None, None, "embed"))
    self.pos_embed = layers.param(rngs, layers.normal(0.02),
                                  (1, 1 + cfg.pos_grid ** 2, d),
                                  (None, None, "embed"))
    self.register_tokens = (
        layers.param(rngs, layers.normal(1e-6), (1, cfg.num_registers, d),
                     (None, None, "embed")) if cfg.num_registers else None)
    block_def = nnx.graphdef(nnx.eval_shape(lambda: Dinov2Block(cfg, rngs=nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), cfg.depth)
    stacked = jax.vmap(lambda k: nnx.state(Dinov2Block(cfg, rngs=nnx.Rngs(k))))(keys)
    self.blocks = nnx.merge(block_def, stacked)
    self.norm = layers.LayerNorm(d, rngs=rngs, eps=cfg.ln_eps)

  # -- embeddings ----------------------------------------------------------
  def interpolated_pos_embed(self, height: int, width: int) -> jax.Array:
    """``(1, 1 + gh*gw, D)`` position embedding for a ``height x width`` input."""
    pos = self.pos_embed[...]
    mats = pos_interp_matrices(self.cfg, height, width)
    if mats is None:
      return pos
    m, d = self.cfg.pos_grid, pos.shape[-1]
    wy, wx = (jnp.asarray(w, jnp.float32) for w in mats)
    grid = pos[0, 1:].reshape(m, m, d)
    grid = jnp.einsum("ym,mnd,xn->yxd", wy, grid, wx,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, -1, d)], axis=1)

  def prepare_tokens(self, x: jax.Array) -> jax.Array:
    """NHWC images -> ``(B, 1 + R + gh*gw, D)`` tokens [cls, registers, patches]."""
    dtype = _DTYPES[self.cfg.dtype]
    b, height, width, _ = x.shape
    t = self.patch_embed(x.astype(dtype))
    t = t.reshape(b, -1, t.shape[-1])
    pos = self.interpolated_pos_embed(height, width).astype(dtype)
    cls = self.cls_token[...].astype(dtype) + pos[:, :1]
    parts = [jnp.broadcast_to(cls, (b, 1, t.shape[-1]))]
    if self.register_tokens is not None:
      reg = self.register_tokens[...].astype(dtype)
      parts.append(jnp.broadcast_to(reg, (b,) + reg.shape[1:]))
    parts.append(t + pos[:, 1:])
    return jnp.concatenate(parts, axis=1)

  # -- blocks --------------------------------------------------------------
  def _run_blocks(self, x: jax.Array, start: int, stop: int, collect: bool):
    """Blocks ``start..stop-1``; with ``collect`` also every block's output."""
    if stop <= start:
      return x, None
    graphdef, state = nnx.split(self.blocks)
    state = jax.tree.map(lambda a: a[start:stop], state)

    def body(h, st):
      h = nnx.merge(graphdef, st)(h)
      return h, (h if collect else None)
    if self.cfg.scan_layers:
      return jax.lax.scan(body, x, state)
    outs = []
    for i in range(stop - start):
      x, y = body(x, jax.tree.map(lambda a: a[i], state))
      outs.append(y)
    return x, (jnp.stack(outs) if collect else None)

  def _split(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    r = self.cfg.num_registers
    return x[:, 0], x[:, 1:1 + r], x[:, 1 + r:]

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Final features of NHWC normalised images.

    Returns:
      ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D),
      ``x_norm_patchtokens`` (B, gh*gw, D) and ``x_prenorm`` (B, 1+R+N, D).
    """
    h, _ = self._run_blocks(self.prepare_tokens(x), 0, self.cfg.depth, False)
    cls, reg, patches = self._split(self.norm(h))
    return {"x_norm_clstoken": cls, "x_norm_regtokens": reg,
            "x_norm_patchtokens": patches, "x_prenorm": h}

  def intermediate_layers(self, x: jax.Array,
                          indices: Sequence[int] = (8, 9, 10, 11),
                          norm: bool = True) -> tuple[list[jax.Array], jax.Array]:
    """Patch maps after the given blocks (0-based), as REGLUE extracts them.

    Like the hub's ``get_intermediate_layers(x, n=indices, reshape=True,
    return_class_token=True, norm=norm)`` but NHWC: each output goes through
    the final LayerNorm (if ``norm``), cls and register tokens are stripped
    and the patches reshaped to ``(B, gh, gw, D)``.  Blocks after the last
    requested one are not run.

    Returns:
      ``(maps, cls)``: the maps in the order of ``indices`` and the cls token
      ``(B, D)`` of the last entry of ``indices`` (normed if ``norm``).
    """
    depth = self.cfg.depth
    idx = [i + depth if i < 0 else i for i in indices]
    if not idx or any(not 0 <= i < depth for i in idx):
      raise ValueError(f"block indices {tuple(indices)} outside 0..{depth - 1}")
    lo, hi = min(idx), max(idx)
    b, height, width, _ = x.shape
    gh, gw = height // self.cfg.patch_size, width // self.cfg.patch_size
    h, _ = self._run_blocks(self.prepare_tokens(x), 0, lo, False)
    _, outs = self._run_blocks(h, lo, hi + 1, True)
    maps, cls = [], None
    for i in idx:
      o = outs[i - lo]
      if norm:
        o = self.norm(o)
      c, _, patches = self._split(o)
      maps.append(patches.reshape(b, gh, gw, -1))
      cls = c
    return maps, cls
