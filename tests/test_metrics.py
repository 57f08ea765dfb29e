"""Inception Score and improved precision/recall: known answers and ADM's definitions."""
import numpy as np
import pytest

from glue_jax.eval import metrics


# ------------------------------------------------------------ inception score

def test_inception_score_known_answers():
  c = 10
  confident_uniform = 50.0 * np.eye(c)[np.arange(1000) % c]
  assert metrics.inception_score(confident_uniform) == pytest.approx(c, rel=1e-9)
  one_class = np.tile(np.arange(c, dtype=float), (500, 1))
  assert metrics.inception_score(one_class) == pytest.approx(1.0, abs=1e-12)
  # Two classes, p = (a, 1-a) for half the samples and (1-a, a) for the
  # other half: p(y) = 1/2, KL = a log 2a + (1-a) log 2(1-a).
  a = 0.8
  half = np.log([[a, 1 - a], [1 - a, a]])
  logits = np.tile(half, (50, 1))          # alternating rows: every split balanced
  want = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
  assert metrics.inception_score(logits, num_splits=10) == pytest.approx(want, rel=1e-12)


def _adm_inception_score(probs, split_size):
  """ADM evaluator's compute_inception_score on softmax outputs."""
  scores = []
  for i in range(0, len(probs), split_size):
    part = probs[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


@pytest.mark.parametrize("n", [1000, 1005])
def test_inception_score_n_over_10_option(n):
  """``num_splits=10``: the N/10-row rule (not ADM's unless N = 50,000)."""
  logits = np.random.default_rng(n).normal(scale=3.0, size=(n, 37))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  split = -(-n // 10)
  assert len(metrics.inception_score_splits(logits, num_splits=10)) == 10
  assert metrics.inception_score(logits, num_splits=10) == pytest.approx(
      _adm_inception_score(probs, split), rel=1e-10)


def _is_logits(n, k, seed):
  """Class-structured logits (also the generator of the ADM goldens below)."""
  rng = np.random.default_rng(seed)
  cls = rng.integers(0, k, n)
  return rng.normal(scale=1.5, size=(n, k)) + 4.0 * np.eye(k)[cls] * rng.uniform(0.2, 1.0, (n, 1))


# Issue 19 item 5.  Goldens: the ADM evaluator's compute_inception_score
# (openai/guided-diffusion evaluations/evaluator.py, split_size=5000), run
# once unmodified outside this repository with its softmax placeholder fed
# float32 `_is_logits(n, 100, seed=n)` (TF float32 softmax).  We compute in
# float64: agreement to float32 rounding, rel 1e-6; the N/10 rule differs by
# 0.23% (12K) and 2.9% (1005).
ADM_IS = {12000: 3.155344009399414, 1005: 3.184436321258545}


@pytest.mark.parametrize("n", sorted(ADM_IS))
def test_inception_score_matches_adm_evaluator(n):
  logits = _is_logits(n, 100, n).astype(np.float32)
  assert metrics.inception_score(logits) == pytest.approx(ADM_IS[n], rel=1e-6)
  assert len(metrics.inception_score_splits(logits)) == -(-n // 5000)
  other = metrics.inception_score(logits, num_splits=10)
  assert abs(other / ADM_IS[n] - 1) > 2e-3


def test_inception_score_rules_agree_at_50k():
  logits = np.random.default_rng(0).normal(size=(50_000, 5))
  np.testing.assert_array_equal(metrics.inception_score_splits(logits),
                                metrics.inception_score_splits(logits, num_splits=10))


# ------------------------------------------------------- precision / recall

def _brute_force_pr(ref, smp, k):
  """The ADM ManifoldEstimator definition, float64, full distance matrices."""
  def sq(u, v):
    return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)
  r_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
  r_smp = np.partition(sq(smp, smp), k, axis=1)[:, k]
  d = sq(ref, smp)
  precision = np.any(d <= r_ref[:, None], axis=0).mean()
  recall = np.any(d <= r_smp[None, :], axis=1).mean()
  return precision, recall, r_ref


def test_manifold_radii_on_a_line():
  x = np.arange(10, dtype=np.float32)[:, None]
  r = metrics.manifold_radii(x, 3, half=False)
  # Squared distance to the 3rd nearest other point.
  np.testing.assert_array_equal(r, [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
  with pytest.raises(ValueError, match="N > k"):
    metrics.manifold_radii(x[:3], 3)


@pytest.mark.parametrize("block", [7, 10_000])
def test_precision_recall_matches_brute_force(block):
  rng = np.random.default_rng(1)
  ref = rng.normal(size=(30, 5))
  smp = rng.normal(loc=0.4, scale=0.7, size=(23, 5))
  # Quantised to a grid so that float32 and float64 distances agree exactly.
  ref, smp = np.round(ref * 8) / 8, np.round(smp * 8) / 8
  p, r = metrics.precision_recall(ref, smp, 3, block=block, half=False)
  p_want, r_want, radii = _brute_force_pr(ref, smp, 3)
  assert (p, r) == (pytest.approx(p_want, abs=0), pytest.approx(r_want, abs=0))
  assert 0 < p < 1 and 0 < r < 1          # a non-trivial case
  np.testing.assert_allclose(metrics.manifold_radii(ref, 3, block=block, half=False),
                             radii, rtol=1e-6)


def test_precision_recall_known_answers():
  rng = np.random.default_rng(2)
  ref = rng.normal(size=(40, 8))
  assert metrics.precision_recall(ref, ref, half=False) == (1.0, 1.0)
  assert metrics.precision_recall(ref, ref + 1000.0, half=False) == (0.0, 0.0)
  # Half the samples are reference points, half are far away: precision 1/2.
  smp = np.concatenate([ref[:20], ref[:20] + 1000.0])
  p, _ = metrics.precision_recall(ref, smp, half=False)
  assert p == 0.5


def test_half_precision_distances_and_fallback():
  rng = np.random.default_rng(3)
  ref, smp = rng.normal(size=(25, 6)), rng.normal(size=(20, 6)) + 0.2
  ref, smp = np.round(ref * 4) / 4, np.round(smp * 4) / 4     # exact in float16
  assert metrics.precision_recall(ref, smp, half=True) == \
      metrics.precision_recall(ref, smp, half=False)
  big = ref * 1e4              # |u|^2 overflows float16 -> float32 recomputation
  d = np.asarray(metrics.pairwise_distances(big, big, half=True))
  assert np.isfinite(d).all()
  want = ((big[:, None] - big[None]) ** 2).sum(-1)
  np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-3 * want.max())
  assert metrics.precision_recall(big, big * 1.0, half=True) == (1.0, 1.0)


# Issue 19 item 6.  Goldens: the ADM evaluator's compute_prec_recall
# (ManifoldEstimator, float16 DistanceBlock), run once unmodified outside this
# repository on `_pr_features()`: all 300 reference rows (ADM's rule), and the
# 100 rows of reference.pool_subset(300, 100, seed=0).  Features lie on a
# 1/4 grid, exact in float16, so the answers are exact.
ADM_PR_ALL = (0.965, 0.5833333333333334)
ADM_PR_SUBSET = (0.955, 0.58)


def _pr_features():
  rng = np.random.default_rng(7)
  ref = np.round(rng.normal(size=(300, 8)) * 4) / 4
  smp = np.round(rng.normal(loc=0.3, scale=0.8, size=(200, 8)) * 4) / 4
  return ref, smp


def test_precision_recall_matches_adm_on_all_reference_rows():
  from glue_jax.eval import reference
  ref, smp = _pr_features()
  assert metrics.precision_recall(ref, smp) == ADM_PR_ALL
  full = reference.from_features({"pool": ref}, tag="t")          # default: all rows
  assert full.pool_indices is None and len(full.pool) == 300
  assert metrics.precision_recall(full.pool, smp) == ADM_PR_ALL
  sub = reference.from_features({"pool": ref}, tag="t", num_pool=100, seed=0)
  np.testing.assert_array_equal(sub.pool_indices, reference.pool_subset(300, 100, 0))
  assert metrics.precision_recall(sub.pool, smp) == ADM_PR_SUBSET
  np.testing.assert_array_equal(sub.mu, full.mu)                  # stats from all rows


def test_all_metrics_with_reference_object():
  from glue_jax.eval import reference
  rng = np.random.default_rng(4)
  feats = {"pool": rng.normal(size=(60, 4)), "spatial": rng.normal(size=(60, 3)),
           "logits": rng.normal(size=(60, 5))}
  ref = reference.from_features(feats, tag="t")
  out = metrics.all_metrics(feats, ref)
  assert out["fid"] == pytest.approx(0, abs=1e-9)
  assert out["sfid"] == pytest.approx(0, abs=1e-9)
  assert (out["precision"], out["recall"]) == (1.0, 1.0)
  assert out["inception_score"] == pytest.approx(metrics.inception_score(feats["logits"]))
  assert set(metrics.all_metrics({"logits": feats["logits"]}, None)) == {"inception_score"}
