"""Reference statistics: ADM reference batches and our own ``reference_stats``.

An ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``) holds

- ``mu``, ``sigma``: pool_3 statistics (FID),
- ``mu_s``, ``sigma_s``: spatial ``mixed_6/conv[..., :7]`` statistics (sFID),
- ``arr_0``: the reference images (uint8 NHWC; 10K for ImageNet), whose
  pool features are the reference manifold of precision/recall.

Files written by ``python -m glue_jax.tools.reference_stats`` have the same
keys plus ``pool`` (float32 reference features for precision/recall, so the
images need not be stored), ``feature_net`` (the feature space's tag) and
``num_images``.  The ADM evaluator reads their ``mu``.. keys alike.

Statistics are float64.  When a file lacks ``pool`` its ``arr_0`` images are
run through the feature network (:func:`complete`); when it lacks ``mu``
those features give the statistics.
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


def from_features(feats: dict, *, tag: str, path: str = "", num_pool: int = 10_000,
                  seed: int = 0) -> Reference:
  """Statistics of all features; ``num_pool`` random pool vectors kept for P/R."""
  pool = np.asarray(feats["pool"], np.float32)
  ref = Reference(path, tag=tag)
  ref.mu, ref.sigma = frechet.statistics(pool)
  if feats.get("spatial") is not None:
    ref.mu_s, ref.sigma_s = frechet.statistics(feats["spatial"])
  if len(pool) > num_pool:
    keep = np.sort(np.random.default_rng(seed).choice(len(pool), num_pool, replace=False))
    pool = pool[keep]
  ref.pool = pool
  return ref


def save(ref: Reference, path: str, *, images: np.ndarray | None = None,
         num_images: int | None = None) -> str:
  """Writes ``ref`` (and optionally ``arr_0`` images) atomically."""
  arrays = {k: getattr(ref, k) for k in STAT_KEYS if getattr(ref, k) is not None}
  if ref.pool is not None:
    arrays["pool"] = np.asarray(ref.pool, np.float32)
  if ref.tag is not None:
    arrays["feature_net"] = np.asarray(ref.tag)
  if num_images is not None:
    arrays["num_images"] = np.asarray(num_images, np.int64)
  if images is not None:
    arrays["arr_0"] = np.asarray(images, np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path
