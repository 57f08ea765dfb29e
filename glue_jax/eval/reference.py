"""Reference statistics: ADM reference batches and our own ``reference_stats``.

Keys (any subset; statistics float64):

- ``mu``, ``sigma``: pool_3 statistics (FID);
- ``mu_s``, ``sigma_s``: spatial ``mixed_6/conv[..., :7]`` statistics (sFID);
- ``arr_0``: reference images (uint8 NHWC);
- ``pool``: float32 reference features for precision/recall (glue_jax only);
- ``feature_net`` (feature-space tag), ``num_images`` (images behind the
  statistics), ``pool_indices`` (which source images ``pool``/``arr_0`` are,
  when they are a subset) (glue_jax only).

What the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``) does
with a reference file: it ALWAYS opens ``arr_0`` first and runs its Inception
on every image (a file without ``arr_0`` fails: "missing arr_0"); it takes
FID/sFID statistics from ``mu``.. when present (else from those activations),
and computes precision/recall (k=3) against the activations of ALL ``arr_0``
images (no subsampling).  We do the same.  The layouts:

1. ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``: ``arr_0``
   = 10K images + ``mu``..): ADM: all metrics.  glue_jax: all metrics; FID/sFID
   from the stored statistics, P/R on features of all ``arr_0`` images
   (:func:`complete` computes them, cannot be skipped).
2. ``reference_stats`` default (``arr_0`` + ``mu``.. + ``pool`` + tags):
   a complete ADM reference batch.  ADM: all metrics.  glue_jax: all metrics
   without re-extracting features; ``pool`` holds the features of exactly the
   ``arr_0`` images, so both evaluators compute P/R on the same images.
3. ``reference_stats --num_pool=M`` (M < N images): ``mu``.. from all N
   images; ``pool`` and ``arr_0`` hold the same random M (``pool_indices``).
   ADM and glue_jax then agree (P/R on those M), but neither equals P/R on all
   N (ADM's own rule for an N-image ``arr_0``).
4. ``reference_stats --no-include_images`` (no ``arr_0``): glue_jax only (all
   metrics, P/R on ``pool``); the ADM evaluator cannot read it.
5. Statistics only (``mu``.. without ``pool`` or ``arr_0``): glue_jax FID/sFID
   only; not readable by ADM.

Only Inception features (``feature_net`` ``inception-adm``) are comparable
with ADM's numbers; other tags (digits) are glue_jax's own feature spaces.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from glue_jax.eval import frechet
from glue_jax.eval import sample_store

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class ReferenceError(ValueError):
  pass


@dataclasses.dataclass
class Reference:
  path: str
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool: np.ndarray | None = None         # reference features for precision/recall
  tag: str | None = None                 # feature space; None: ADM file (Inception)
  num_images: int | None = None          # images in arr_0 (None: no images)
  pool_indices: np.ndarray | None = None  # source indices of pool (None: all)


def load(path: str) -> Reference:
  """Reads statistics and features of a reference ``.npz`` (not its images)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference batch not found: {path}")
  with np.load(path) as f:
    keys = set(f.files)
    ref = Reference(path)
    for k in STAT_KEYS:
      if k in keys:
        setattr(ref, k, np.asarray(f[k], np.float64))
    if "pool" in keys:
      ref.pool = np.asarray(f["pool"], np.float32)
    if "feature_net" in keys:
      ref.tag = str(f["feature_net"])
    if "pool_indices" in keys:
      ref.pool_indices = np.asarray(f["pool_indices"], np.int64)
  if (ref.mu is None) != (ref.sigma is None) or (ref.mu_s is None) != (ref.sigma_s is None):
    raise ReferenceError(f"{path}: has only one of mu/sigma or mu_s/sigma_s ({sorted(keys)})")
  for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
    mu, sigma = getattr(ref, m), getattr(ref, s)
    if mu is not None and (mu.ndim != 1 or sigma.shape != (len(mu), len(mu))):
      raise ReferenceError(f"{path}: {m} {mu.shape} and {s} {sigma.shape} are not "
                           "(D,) and (D, D)")
  if "arr_0" in keys:
    shape, dtype = sample_store.npz_array_info(path, "arr_0")
    if len(shape) != 4 or dtype != np.uint8:
      raise ReferenceError(f"{path}: arr_0 is {dtype} {shape}, want uint8 NHWC")
    ref.num_images = int(shape[0])
    if ref.pool is not None and len(ref.pool) != ref.num_images:
      raise ReferenceError(f"{path}: pool has {len(ref.pool)} rows but arr_0 "
                           f"{ref.num_images} images (ADM computes precision/recall "
                           "on all arr_0 images)")
  if ref.mu is None and ref.pool is None and ref.num_images is None:
    raise ReferenceError(f"{path}: no statistics (mu, sigma), features (pool) or "
                         f"images (arr_0); has {sorted(keys)}")
  return ref


def check_tag(ref: Reference, tag: str) -> None:
  """Refuses statistics of another feature space."""
  if ref.tag is not None and ref.tag != tag:
    raise ReferenceError(f"{ref.path}: statistics of feature net {ref.tag!r}, but "
                         f"the samples use {tag!r}")


def complete(ref: Reference, extractor, *, batch_size: int = 500,
             progress=None) -> Reference:
  """Fills missing features/statistics from the file's ``arr_0`` images."""
  check_tag(ref, extractor.net.tag)
  need_feats = ref.pool is None or ref.mu is None or ref.mu_s is None
  if not need_feats or ref.num_images is None:
    return ref
  feats = extractor(sample_store.iter_npz_batches(ref.path, "arr_0", batch_size),
                    progress=progress)
  out = dataclasses.replace(ref)
  if out.pool is None:
    out.pool = feats["pool"]
  if out.mu is None:
    out.mu, out.sigma = frechet.statistics(feats["pool"])
  if out.mu_s is None and "spatial" in feats:
    out.mu_s, out.sigma_s = frechet.statistics(feats["spatial"])
  return out


def pool_subset(n: int, num_pool: int = 0, seed: int = 0) -> np.ndarray | None:
  """Sorted random ``num_pool`` of ``n`` indices; ``None`` (all) when
  ``num_pool`` is 0 or at least ``n``."""
  if num_pool <= 0 or num_pool >= n:
    return None
  return np.sort(np.random.default_rng(seed).choice(n, num_pool, replace=False))


def from_features(feats: dict, *, tag: str, path: str = "", num_pool: int = 0,
                  seed: int = 0) -> Reference:
  """Statistics of all features; P/R features of all (ADM), or of
  :func:`pool_subset` when ``num_pool`` is smaller than the set."""
  pool = np.asarray(feats["pool"], np.float32)
  ref = Reference(path, tag=tag)
  ref.mu, ref.sigma = frechet.statistics(pool)
  if feats.get("spatial") is not None:
    ref.mu_s, ref.sigma_s = frechet.statistics(feats["spatial"])
  keep = pool_subset(len(pool), num_pool, seed)
  ref.pool = pool if keep is None else pool[keep]
  ref.pool_indices = keep
  return ref


def arrays(ref: Reference, num_images: int | None = None) -> dict:
  """The ``.npz`` arrays of ``ref`` (all but images)."""
  out = {k: getattr(ref, k) for k in STAT_KEYS if getattr(ref, k) is not None}
  if ref.pool is not None:
    out["pool"] = np.asarray(ref.pool, np.float32)
  if ref.pool_indices is not None:
    out["pool_indices"] = np.asarray(ref.pool_indices, np.int64)
  if ref.tag is not None:
    out["feature_net"] = np.asarray(ref.tag)
  if num_images is not None:
    out["num_images"] = np.asarray(num_images, np.int64)
  return out


def save(ref: Reference, path: str, *, images: np.ndarray | None = None,
         num_images: int | None = None) -> str:
  """Writes ``ref`` (and optionally ``arr_0`` images) atomically.

  ``images`` must be the images of ``ref.pool`` (layouts 2-3 above) for the
  two evaluators to agree on precision/recall.
  """
  with sample_store.NpzWriter(path) as w:
    for k, v in arrays(ref, num_images).items():
      w.add(k, v)
    if images is not None:
      w.add("arr_0", np.asarray(images, np.uint8))
  return path
