"""Frechet distance equals pytorch-fid's on the same statistics."""
import numpy as np
import pytest

from glue_jax.eval import frechet


def test_matches_pytorch_fid():
  fid = pytest.importorskip("pytorch_fid.fid_score")
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 16))
  b = rng.normal(loc=0.3, scale=1.2, size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.3
  m1, s1 = frechet.statistics(a)
  m2, s2 = frechet.statistics(b)
  ours = frechet.frechet_distance(m1, s1, m2, s2)
  ref = fid.calculate_frechet_distance(m1, s1, m2, s2)
  assert ours == pytest.approx(float(ref), rel=1e-9)


def test_known_gaussians_and_errors():
  # N(0, I) vs N(mu, 4I) in d dims: |mu|^2 + d (1 + 4 - 2*2) = |mu|^2 + d.
  d = 3
  got = frechet.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), 4 * np.eye(d))
  assert got == pytest.approx(3.0 + d)
  with pytest.raises(ValueError, match="shape"):
    frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("n,d", [(10, 24), (2048, 64)])
def test_matches_pytorch_fid_singular_and_wide(n, d):
  """Rank-deficient covariances (n < d, as sFID on few samples) and a wide case."""
  fid = pytest.importorskip("pytorch_fid.fid_score")
  rng = np.random.default_rng(n)
  a = rng.normal(size=(n, d)).astype(np.float32)
  b = (rng.normal(size=(n + 5, d)) * 1.5 + 0.2).astype(np.float32)
  m1, s1 = frechet.statistics(a)
  m2, s2 = frechet.statistics(b)
  assert m1.dtype == s1.dtype == np.float64 and s1.shape == (d, d)
  ref = float(fid.calculate_frechet_distance(m1, s1, m2, s2))
  assert frechet.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-7)
  from glue_jax.eval import metrics
  assert metrics.fid_from_features(b, m1, s1) == pytest.approx(ref, rel=1e-7)
  assert frechet.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-6 * np.trace(s1))
