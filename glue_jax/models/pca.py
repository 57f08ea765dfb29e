"""ReDi's linear semantic grid: PCA of standardized last-layer features.

ReDi (spec, baselines) standardizes DINOv2 last-layer patch tokens per
dimension, subtracts the PCA mean and projects on the top-k principal
components (k = 8), with no re-whitening.  :class:`PCAFitter` accumulates
the statistics in float64 over any number of batches (so it scales to a
dataset streamed from disk); :func:`project` is the pure map used at
feature-extraction time.

Sign convention (PCA is defined up to the sign of each component): each
component is flipped so that its largest-magnitude loading is positive, so
fits on the same data agree exactly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PCAProjection:
  feature_mean: np.ndarray     # (D,) per-dimension standardization
  feature_std: np.ndarray      # (D,)
  pca_mean: np.ndarray         # (D,) mean of the standardized features
  components: np.ndarray       # (D, k) top-k eigenvectors, descending variance
  explained_variance: np.ndarray  # (k,)

  @property
  def k(self) -> int:
    return self.components.shape[1]

  def save(self, path: str) -> None:
    import os
    tmp = path + ".tmp.npz"
    np.savez(tmp, **dataclasses.asdict(self))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "PCAProjection":
    with np.load(path) as f:
      missing = [k.name for k in dataclasses.fields(cls) if k.name not in f.files]
      if missing:
        raise KeyError(f"{path}: not a PCA projection file, missing {missing}")
      return cls(**{k.name: f[k.name] for k in dataclasses.fields(cls)})


def project(features, proj: PCAProjection, eps: float = 1e-6):
  """(..., D) raw features -> (..., k) PCA coordinates (jnp, jittable)."""
  x = (features - jnp.asarray(proj.feature_mean)) / (jnp.asarray(proj.feature_std) + eps)
  return (x - jnp.asarray(proj.pca_mean)) @ jnp.asarray(proj.components, features.dtype)


class PCAFitter:
  """Two passes over the data: per-dimension moments, then the covariance of
  the standardized features (float64 accumulators)."""

  def __init__(self, dim: int, eps: float = 1e-6):
    self.dim, self.eps = dim, eps
    self.n = 0
    self.s1 = np.zeros(dim, np.float64)
    self.s2 = np.zeros(dim, np.float64)
    self._mean = self._std = None
    self.m = 0
    self.c1 = np.zeros(dim, np.float64)
    self.c2 = np.zeros((dim, dim), np.float64)

  def _flat(self, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.shape[-1] != self.dim:
      raise ValueError(f"PCA features have {x.shape[-1]} dims, expected {self.dim}")
    return x.reshape(-1, self.dim)

  def add_moments(self, x) -> None:
    """Pass 1: per-dimension mean / std."""
    x = self._flat(x)
    self.n += len(x)
    self.s1 += x.sum(0)
    self.s2 += np.square(x).sum(0)

  def add_covariance(self, x) -> None:
    """Pass 2: covariance of the standardized features."""
    if self._mean is None:
      if not self.n:
        raise RuntimeError("PCAFitter: add_moments over the data first")
      self._mean = self.s1 / self.n
      self._std = np.sqrt(np.maximum(self.s2 / self.n - np.square(self._mean), 0.0))
    z = (self._flat(x) - self._mean) / (self._std + self.eps)
    self.m += len(z)
    self.c1 += z.sum(0)
    self.c2 += z.T @ z

  def finish(self, k: int) -> PCAProjection:
    if not self.m:
      raise RuntimeError("PCAFitter: add_covariance over the data first")
    if not 1 <= k <= self.dim:
      raise ValueError(f"PCA k={k} outside 1..{self.dim}")
    mu = self.c1 / self.m
    cov = self.c2 / self.m - np.outer(mu, mu)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:k]
    vecs, vals = vecs[:, order], vals[order]
    flip = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(k)])
    vecs = vecs * np.where(flip == 0, 1.0, flip)
    return PCAProjection(self._mean.astype(np.float32), self._std.astype(np.float32),
                         mu.astype(np.float32), vecs.astype(np.float32),
                         vals.astype(np.float32))


def fit(features, k: int = 8) -> PCAProjection:
  """One-shot fit on an in-memory array (..., D)."""
  f = PCAFitter(np.shape(features)[-1])
  f.add_moments(features)
  f.add_covariance(features)
  return f.finish(k)
