"""Images -> REGLUE's semantic features, as one frozen module (REGLUE paper).

:class:`SemanticEncoder` bundles the frozen vision foundation model (DINOv2,
or the demo's small ViT of the same class), the released/own per-channel
standardization statistics and the local projection: the conv compressor
(REGLUE, multi-layer or last-layer), ReDi's PCA, or none.  Its output is the
feature dict the trainer consumes (``methods.prepare_batch``):

- ``semantic`` (B, gh, gw, S): compressed local semantics (compressor in
  inference mode; not re-normalized), or PCA coordinates;
- ``cls`` (B, D): last-layer [CLS] after the final norm, raw;
- ``align_target`` (B, gh*gw, D): last-layer normed patch tokens, raw (REPA).

The same module runs in ``tools/precompute`` (feature store) and inside the
train step (``online`` features), so both paths see identical numbers.
Everything is one forward pass: the requested blocks are taken from
``Dinov2.intermediate_layers`` and the last block's outputs double as the
[CLS]/patch targets (the requested layers must end at the last block).
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models import compressor as compressor_lib
from glue_jax.models import compressor_weights
from glue_jax.models import dinov2
from glue_jax.models import dinov2_weights
from glue_jax.models import pca as pca_lib


class Frozen(nnx.Variable):
  """A constant of a frozen module (statistics, projections): never trained."""


@dataclasses.dataclass(frozen=True)
class SemanticSpec:
  layers: tuple[int, ...] = (8, 9, 10, 11)   # 0-based blocks; multi-layer REGLUE
  input_size: int | None = 224               # resize before the ViT; None keeps the size
  local: str = "compressor"                  # 'compressor' | 'pca' | 'none'
  stats_eps: float = 0.0                     # official: (f - mean) / std, no eps

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    if self.local not in ("compressor", "pca", "none"):
      raise ValueError(f"semantic local={self.local!r}: 'compressor', 'pca' or 'none'")


class SemanticEncoder(nnx.Module):
  def __init__(self, vit: dinov2.Dinov2, spec: SemanticSpec, *,
               stats: tuple[np.ndarray, np.ndarray] | None = None,
               compressor: compressor_lib.Compressor | None = None,
               pca: pca_lib.PCAProjection | None = None):
    depth, dim = vit.cfg.depth, vit.cfg.dim
    idx = [i + depth if i < 0 else i for i in spec.layers]
    if not idx or idx[-1] != depth - 1 or sorted(idx) != idx:
      raise ValueError(f"semantic layers {spec.layers} must be increasing and end at the "
                       f"last block ({depth - 1}) of the encoder")
    self.vit, self.spec = vit, spec
    stack = dim * len(idx)
    if spec.local == "compressor":
      if compressor is None or stats is None:
        raise ValueError("local='compressor' needs the compressor and the feature statistics")
      if compressor.cfg.in_channels != stack:
        raise ValueError(f"compressor takes {compressor.cfg.in_channels} channels; layers "
                         f"{spec.layers} of a {dim}-d encoder give {stack}")
      if tuple(np.shape(stats[0])) != (stack,) or tuple(np.shape(stats[1])) != (stack,):
        raise ValueError(f"feature statistics have shapes {np.shape(stats[0])}, "
                         f"{np.shape(stats[1])}; expected ({stack},)")
    if spec.local == "pca":
      if pca is None:
        raise ValueError("local='pca' needs a PCA projection")
      if pca.components.shape[0] != dim:
        raise ValueError(f"PCA over {pca.components.shape[0]} dims; the encoder's last "
                         f"layer has {dim}")
    self.compressor = compressor if spec.local == "compressor" else None
    self.mean = Frozen(jnp.asarray(stats[0], jnp.float32)) if stats is not None else None
    self.std = Frozen(jnp.asarray(stats[1], jnp.float32)) if stats is not None else None
    self.pca = nnx.Dict({f.name: Frozen(jnp.asarray(getattr(pca, f.name), jnp.float32))
                         for f in dataclasses.fields(pca)}) if spec.local == "pca" else None

  @property
  def semantic_channels(self) -> int:
    if self.spec.local == "compressor":
      return self.compressor.cfg.out_channels
    if self.spec.local == "pca":
      return int(self.pca["components"].shape[1])
    return 0

  def local_stack(self, images) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(stack (B,gh,gw,L*D) raw, cls (B,D), patches (B,N,D))``."""
    x = dinov2.preprocess_for_dinov2(images, self.spec.input_size) \
        if self.spec.input_size else _normalize_only(images)
    maps, cls = self.vit.intermediate_layers(x, self.spec.layers, norm=True)
    b, gh, gw, d = maps[-1].shape
    return jnp.concatenate(maps, -1), cls, maps[-1].reshape(b, gh * gw, d)

  def standardize(self, stack):
    return compressor_lib.standardize(stack, self.mean[...], self.std[...], self.spec.stats_eps)

  def __call__(self, images) -> dict[str, jax.Array]:
    """uint8 NHWC images (or float in [0, 1]) -> the feature dict."""
    stack, cls, patches = self.local_stack(images)
    out = {"cls": cls.astype(jnp.float32), "align_target": patches.astype(jnp.float32)}
    if self.spec.local == "compressor":
      out["semantic"] = self.compressor.encode(self.standardize(stack), False)
    elif self.spec.local == "pca":
      p = self.pca
      last = stack[..., -self.vit.cfg.dim:]
      proj = pca_lib.PCAProjection(p["feature_mean"][...], p["feature_std"][...],
                                   p["pca_mean"][...], p["components"][...],
                                   p["explained_variance"][...])
      out["semantic"] = pca_lib.project(last, proj)
    if "semantic" in out:
      out["semantic"] = out["semantic"].astype(jnp.float32)
    return out


def _normalize_only(images):
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  return (x - jnp.asarray(dinov2.IMAGENET_MEAN)) / jnp.asarray(dinov2.IMAGENET_STD)


def load_stats(path: str, expected_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel ``(mean, std)`` from an ``.npz`` (keys mean/std) or the
  official ``.pth`` (a torch zip whose pickle is ``{'mean', 'std'}``)."""
  import os
  if not os.path.exists(path):
    raise FileNotFoundError(f"feature statistics not found: {path}")
  if path.endswith(".npz"):
    with np.load(path) as f:
      if not {"mean", "std"} <= set(f.files):
        raise KeyError(f"{path}: needs 'mean' and 'std', has {f.files}")
      mean, std = f["mean"], f["std"]
  else:
    import torch
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or not {"mean", "std"} <= set(obj):
      raise KeyError(f"{path}: expected a dict with 'mean' and 'std'")
    mean, std = (np.asarray(obj[k].cpu().numpy() if hasattr(obj[k], "cpu") else obj[k])
                 for k in ("mean", "std"))
  mean, std = np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1)
  if expected_dim is not None and mean.shape != (expected_dim,):
    raise ValueError(f"{path}: statistics have {mean.shape[0]} channels, expected {expected_dim}")
  if not np.all(std > 0):
    raise ValueError(f"{path}: non-positive std in {int((std <= 0).sum())} channels")
  return mean, std


def identity(module: nnx.Module) -> str:
  """A short hash of a module's arrays (recorded in feature-store manifests)."""
  import hashlib
  h = hashlib.sha256()
  for path, v in sorted(nnx.to_flat_state(nnx.state(module)),
                        key=lambda kv: "/".join(map(str, kv[0]))):
    h.update("/".join(map(str, path)).encode())
    h.update(np.ascontiguousarray(np.asarray(v.value)).tobytes())
  return h.hexdigest()[:16]



def _load_dinov2(path: str):
  return dinov2_weights.load_dinov2(path)


# Vision foundation models by name: ``loader(weights_path) -> module``.  A
# module qualifies if it has ``cfg.depth``, ``cfg.dim`` and
# ``intermediate_layers(x, indices, norm) -> (maps (B,gh,gw,D) list, cls)`` on
# ImageNet-normalised NHWC input (as ``dinov2.Dinov2``).  Other encoders
# (DINOv3, SigLIP, ...) plug in with :func:`register_encoder`.
ENCODERS = {"dinov2": _load_dinov2}


def register_encoder(name: str, loader) -> None:
  if name in ENCODERS:
    raise ValueError(f"semantic encoder {name!r} is already registered")
  ENCODERS[name] = loader


def from_config(cfg) -> SemanticEncoder:
  """The frozen feature module a config names (``config.features``):

  ``encoder`` (a name in :data:`ENCODERS`, default 'dinov2') with weights at
  ``dinov2`` (any format ``dinov2_weights.load_dinov2`` reads), ``layers``,
  ``input_size`` (0: no resize), ``local`` ('compressor' | 'pca' | 'none'),
  ``stats`` (npz/pth of the stack's mean/std), ``compressor`` (official
  ``.pth`` or ours), ``pca`` (a ``PCAProjection`` npz).
  """
  if not cfg.get("dinov2"):
    raise ValueError("features.dinov2: path to the encoder weights is required for "
                     "online features / precompute")
  name = cfg.get("encoder", "dinov2")
  if name not in ENCODERS:
    raise ValueError(f"features.encoder={name!r}; registered: {sorted(ENCODERS)}")
  vit = ENCODERS[name](cfg.dinov2)
  spec = SemanticSpec(tuple(cfg.layers), cfg.get("input_size") or None, cfg.local)
  stats = comp = proj = None
  if spec.local == "compressor":
    stats = load_stats(cfg.stats, vit.cfg.dim * len(spec.layers))
    comp = compressor_weights.load_compressor(cfg.compressor)
  elif spec.local == "pca":
    proj = pca_lib.PCAProjection.load(cfg.pca)
  return SemanticEncoder(vit, spec, stats=stats, compressor=comp, pca=proj)
