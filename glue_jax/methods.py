"""Methods (SiT, REPA, REG, ReDi, REGLUE and REGLUE Table 1's ablations) as switches.

A method decides which modalities the network models jointly and which
alignment terms the loss has.  Rows of REGLUE Table 1:

| row | local | multi-layer | global joint | align patches | align [CLS] |
|-----|-------|-------------|--------------|---------------|-------------|
| a SiT      | -          | - | - | - | - |
| b REPA     | -          | - | - | x | - |
| c          | -          | - | x | - | - |
| d ReDi     | linear     | - | - | - | - |
| e          | linear     | - | - | x | - |
| f          | -          | - | x | - | x |
| g          | -          | - | x | x | - |
| h REG      | -          | - | x | x | x |
| i          | non-linear | - | - | - | - |
| j          | non-linear | - | - | x | - |
| k          | non-linear | - | x | x | x |
| l          | non-linear | x | - | - | - |
| m REGLUE   | non-linear | x | x | x | x |

'local' is the semantic grid concatenated to the latent channels: 'linear' =
PCA of standardized last-layer features (ReDi, 8 components), 'nonlinear' =
the conv compressor (16 channels), on the last layer only or on blocks 8-11
('multi-layer').  Which features feed the grid is a data-side choice (the
feature store's ``semantic`` entry); the method records it for checking.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  local: str = "none"            # 'none' | 'linear' | 'nonlinear'
  multi_layer: bool = False      # local features from several encoder blocks
  global_joint: bool = False     # model the [CLS] token jointly
  align_patches: bool = False
  align_global: bool = False
  semantic_channels: int = 0     # 16 (compressor) / 8 (PCA)
  semantic_weight: float = 1.0   # lambda_s
  global_weight: float = 0.03    # lambda_cls
  align_weight: float = 0.5      # lambda_REPA

  def __post_init__(self):
    if self.local not in ("none", "linear", "nonlinear"):
      raise ValueError(f"method {self.name}: local={self.local!r}")
    if (self.local == "none") != (self.semantic_channels == 0):
      raise ValueError(f"method {self.name}: local={self.local!r} with "
                       f"semantic_channels={self.semantic_channels}")
    if self.align_global and not self.global_joint:
      raise ValueError(f"method {self.name}: aligning [CLS] needs the global token")

  @property
  def aligns(self) -> bool:
    return self.align_patches or self.align_global

  def network_overrides(self, *, encoder_dim: int) -> dict:
    """SiTConfig fields this method sets."""
    return dict(semantic_channels=self.semantic_channels,
                global_token_dim=encoder_dim if self.global_joint else 0,
                projector_out_dim=encoder_dim if self.aligns else 0)

  def loss_overrides(self) -> dict:
    return dict(semantic_weight=self.semantic_weight, global_weight=self.global_weight,
                align_weight=self.align_weight if self.aligns else 0.0,
                align_patches=self.align_patches, align_global=self.align_global)

  def required_features(self) -> set[str]:
    need = set()
    if self.local != "none":
      need.add("semantic")
    if self.global_joint:
      need.add("cls")
    if self.align_patches:
      need.add("align_target")
    return need


def _m(name, **kw):
  return Method(name, **kw)


_NL = dict(local="nonlinear", semantic_channels=16)
_LIN = dict(local="linear", semantic_channels=8)
METHODS = {m.name: m for m in [
    _m("sit"),
    _m("repa", align_patches=True),
    _m("global_only", global_joint=True),                                  # (c)
    _m("redi", **_LIN),                                                    # (d)
    _m("redi_repa", **_LIN, align_patches=True),                           # (e)
    _m("global_align_cls", global_joint=True, align_global=True),          # (f)
    _m("global_align_patches", global_joint=True, align_patches=True),     # (g)
    _m("reg", global_joint=True, align_patches=True, align_global=True),   # (h)
    _m("local", **_NL),                                                    # (i)
    _m("local_repa", **_NL, align_patches=True),                           # (j)
    _m("local_reg", **_NL, global_joint=True, align_patches=True,
       align_global=True),                                                 # (k)
    _m("local_multilayer", **_NL, multi_layer=True),                       # (l)
    _m("reglue", **_NL, multi_layer=True, global_joint=True, align_patches=True,
       align_global=True),                                                 # (m)
]}
TABLE1_ROWS = {"a": "sit", "b": "repa", "c": "global_only", "d": "redi", "e": "redi_repa",
               "f": "global_align_cls", "g": "global_align_patches", "h": "reg",
               "i": "local", "j": "local_repa", "k": "local_reg",
               "l": "local_multilayer", "m": "reglue", "n": "reglue"}


def get(name: str, **overrides) -> Method:
  if name in TABLE1_ROWS:
    name = TABLE1_ROWS[name]
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; one of {sorted(METHODS)} or a "
                     f"Table 1 row {sorted(TABLE1_ROWS)}")
  return dataclasses.replace(METHODS[name], **overrides)


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC bilinear resize with half-pixel centres (PyTorch align_corners=False).

  For integer upsampling factors ``jax.image.resize`` (no antialiasing when
  upsampling) equals ``F.interpolate(mode='bilinear', align_corners=False)``.
  """
  b, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  return jax.image.resize(x, (b, size[0], size[1], c), "bilinear")


def prepare_batch(method: Method, batch: dict, key: jax.Array, *,
                  latent_scale: float, latent_shift: float = 0.0) -> dict:
  """Data batch -> loss batch (``x``, ``y``, ``global``, ``align_target``).

  ``batch`` holds either ``latent_moments`` (B,h,w,2C: posterior mean then
  std; a fresh posterior sample is drawn every step, as REGLUE does) or
  deterministic ``latents`` (B,h,w,C); ``semantic`` (B,hs,ws,S) is
  bilinearly upsampled to the latent grid and concatenated after the latent
  channels; ``cls`` (B,G) raw; ``align_target`` (B,N,Z) raw; ``label`` (B,).
  """
  missing = sorted(method.required_features() - set(batch))
  if missing:
    raise KeyError(f"method {method.name} needs batch entries {missing}; "
                   f"batch has {sorted(batch)}")
  if "latent_moments" in batch:
    mom = batch["latent_moments"].astype(jnp.float32)
    c = mom.shape[-1] // 2
    mean, std = mom[..., :c], mom[..., c:]
    z = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
  elif "latents" in batch:
    z = batch["latents"].astype(jnp.float32)
  else:
    raise KeyError(f"batch needs 'latent_moments' or 'latents'; has {sorted(batch)}")
  x = (z - latent_shift) * latent_scale
  if method.local != "none":
    s = batch["semantic"].astype(jnp.float32)
    if s.shape[-1] != method.semantic_channels:
      raise ValueError(f"method {method.name} expects {method.semantic_channels} "
                       f"semantic channels, batch has {s.shape[-1]}")
    x = jnp.concatenate([x, upsample_bilinear(s, x.shape[1:3])], axis=-1)
  out = {"x": x, "y": batch["label"].astype(jnp.int32)}
  if method.global_joint:
    out["global"] = batch["cls"].astype(jnp.float32)
  if method.align_patches:
    out["align_target"] = batch["align_target"].astype(jnp.float32)
  return out
