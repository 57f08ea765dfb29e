"""Frechet distance between Gaussians fitted to features (host, float64).

Same formula and numerical safeguards as pytorch-fid's
``calculate_frechet_distance`` (and the ADM evaluator): ``scipy.linalg.sqrtm``
of ``sigma1 @ sigma2``, an ``eps`` offset on the diagonals when the product is
singular, and the real part when the imaginary residue is negligible.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (rows = samples), float64."""
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(f) < 2:
    raise ValueError(f"need at least 2 feature vectors, got {len(f)}")
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"statistics differ in shape: {mu1.shape}/{s1.shape} vs "
                     f"{mu2.shape}/{s2.shape}")
  diff = mu1 - mu2
  covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
