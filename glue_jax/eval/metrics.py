"""Sample-quality metrics as the ADM evaluator defines them (guided-diffusion).

- Inception Score: ``exp(mean_i KL(p(y|x_i) || p(y)))`` per split, averaged
  over splits.  Default split rule = ADM's (``compute_inception_score``,
  ``split_size=5000``): consecutive slices of 5,000 predictions, the last one
  shorter when N is not a multiple (10 splits for 50K; 5000/5000/2000 for
  12K).  ``num_splits=S`` instead uses ``ceil(N / S)`` rows per split (the
  "N/10" rule of other IS code); both agree at N = 50,000 only.  ADM's class probabilities are ``softmax(pool3 @ W)`` without the fc bias
  (see :mod:`glue_jax.eval.features`); we work from logits with
  ``log_softmax`` in float64 (ADM: ``log(softmax)`` in float32).
- Improved precision/recall (Kynkaanniemi et al. 2019, ADM's
  ``ManifoldEstimator`` with ``nhood_sizes=(3,)``): distances are *squared*
  Euclidean, ``max(|u|^2 - 2 u.v + |v|^2, 0)``, computed per block in float16
  and recomputed in float32 when a block is not finite (ADM's
  ``DistanceBlock``); a point's radius is its k-th smallest distance to its own
  set with itself included at rank 0 (``np.partition(..., k)[:, k]``);
  precision = fraction of samples inside some reference ball, recall =
  fraction of reference points inside some sample ball (``<=``).
- FID / sFID: :mod:`glue_jax.eval.frechet` on pool features and on the
  flattened spatial features (17 x 17 x 7 = 2023-d for Inception).

Distances run in jitted blocks on the default device; everything else is
numpy on the host.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from glue_jax.eval import frechet

NEIGHBOURHOOD = 3          # ADM: nhood_sizes=(3,)
BLOCK = 10_000             # ADM: row_batch_size = col_batch_size = 10000


# ------------------------------------------------------------ inception score

IS_SPLIT_SIZE = 5_000      # ADM: compute_inception_score(split_size=5000)


def inception_score_splits(logits, num_splits: int | None = None, *,
                           split_size: int = IS_SPLIT_SIZE) -> np.ndarray:
  """Per-split Inception Scores of class ``logits`` (N, K).

  Splits of ``split_size`` rows (ADM); ``num_splits`` given (> 0): splits of
  ``ceil(N / num_splits)`` rows instead.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < 1:
    raise ValueError(f"inception score: logits must be (N, K), got {logits.shape}")
  split = math.ceil(len(logits) / num_splits) if num_splits else int(split_size)
  if split < 1:
    raise ValueError(f"inception score: split size {split} < 1")
  scores = []
  for i in range(0, len(logits), split):
    logp = special.log_softmax(logits[i:i + split], axis=1)
    p = np.exp(logp)
    log_marginal = np.log(p.mean(0, keepdims=True))
    kl = np.sum(p * (logp - log_marginal), axis=1).mean()
    scores.append(np.exp(kl))
  return np.asarray(scores)


def inception_score(logits, num_splits: int | None = None, *,
                    split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score: the mean of :func:`inception_score_splits`."""
  return float(np.mean(inception_score_splits(logits, num_splits, split_size=split_size)))


# ------------------------------------------------------------------ distances

def _squared_distances(u, v):
  nu = jnp.sum(jnp.square(u), axis=1)[:, None]
  nv = jnp.sum(jnp.square(v), axis=1)[None, :]
  return jnp.maximum(nu - 2 * jnp.matmul(u, v.T) + nv, 0)


@functools.partial(jax.jit, static_argnames="half")
def pairwise_distances(u, v, half: bool = True):
  """Squared Euclidean distances (float32) of rows of ``u`` and ``v``.

  ``half``: ADM's float16 computation with a float32 fallback when any
  entry is not finite; False computes in float32 throughout.
  """
  u32, v32 = u.astype(jnp.float32), v.astype(jnp.float32)
  if not half:
    return _squared_distances(u32, v32)
  d16 = _squared_distances(u.astype(jnp.float16), v.astype(jnp.float16))
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)),
                      lambda: d16.astype(jnp.float32),
                      lambda: _squared_distances(u32, v32))


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)])


def _round_up(n: int, m: int = 128) -> int:
  return -(-n // m) * m


def _prepare(features, where: str) -> np.ndarray:
  """float32 (N, D) with D zero-padded to a multiple of 128.

  Zero columns change no distance; the padding (and padding small sets to
  128 rows) lets sets of different sizes share compiled block programs.
  """
  f = np.asarray(features, np.float32)
  if f.ndim != 2:
    raise ValueError(f"{where}: features must be (N, D), got shape {f.shape}")
  d = f.shape[1]
  return f if d % 128 == 0 else np.pad(f, ((0, 0), (0, _round_up(d) - d)))


def _block_size(n: int, block: int) -> int:
  return _round_up(n) if n <= block else block


@functools.partial(jax.jit, static_argnames=("k", "half"))
def _smallest_block(rows, cols, valid_cols, best, k: int, half: bool):
  """Merges the k+1 smallest distances of ``rows`` to ``cols`` into ``best``."""
  d = pairwise_distances(rows, cols, half=half)
  d = jnp.where(valid_cols[None, :], d, jnp.inf)
  both = jnp.concatenate([best, d], axis=1)
  return -jax.lax.top_k(-both, k + 1)[0]


def manifold_radii(features, k: int = NEIGHBOURHOOD, *, block: int = BLOCK,
                   half: bool = True) -> np.ndarray:
  """Radius of every feature vector: its k-th nearest squared distance.

  Args:
    features: (N, D) feature vectors, N > k.
    k: neighbourhood size (ADM: 3); the point itself is rank 0.
    block: rows and columns per distance block (memory trade-off only).
    half: float16 distances as ADM (see :func:`pairwise_distances`).

  Returns:
    (N,) float32 radii.
  """
  f = _prepare(features, "manifold radii")
  n = len(f)
  if n <= k:
    raise ValueError(f"manifold radii: need (N, D) features with N > k={k}, "
                     f"got shape {np.shape(features)}")
  b = _block_size(n, block)
  radii = np.empty(n, np.float32)
  for r0 in range(0, n, b):
    rows = _pad_rows(f[r0:r0 + b], b)
    best = jnp.full((b, k + 1), jnp.inf, jnp.float32)
    for c0 in range(0, n, b):
      cols = f[c0:c0 + b]
      valid = np.arange(b) < len(cols)
      best = _smallest_block(rows, _pad_rows(cols, b), valid, best, k, half)
    radii[r0:r0 + b] = np.asarray(best[:, k])[:min(b, n - r0)]
  return radii


@functools.partial(jax.jit, static_argnames="half")
def _inside_block(ref, ref_radii, samples, sample_radii, half: bool):
  d = pairwise_distances(ref, samples, half=half)
  ref_in = jnp.any(d <= sample_radii[None, :], axis=1)      # ref in a sample ball
  sample_in = jnp.any(d <= ref_radii[:, None], axis=0)      # sample in a ref ball
  return ref_in, sample_in


def precision_recall(reference, samples, k: int = NEIGHBOURHOOD, *,
                     block: int = BLOCK, half: bool = True,
                     reference_radii=None) -> tuple[float, float]:
  """Improved precision and recall of ``samples`` against ``reference``.

  Args:
    reference: (N1, D) reference features (ADM: the 10K reference batch).
    samples: (N2, D) sample features (ADM: all 50K).
    k: neighbourhood size.
    block: distance block size.
    half: float16 distances (ADM) or float32.
    reference_radii: precomputed :func:`manifold_radii` of ``reference``.

  Returns:
    ``(precision, recall)``.
  """
  if np.ndim(reference) != 2 or np.ndim(samples) != 2 or \
      np.shape(reference)[1] != np.shape(samples)[1]:
    raise ValueError(f"precision/recall: features of shapes {np.shape(reference)} and "
                     f"{np.shape(samples)} are not (N, D) of one width")
  ref = _prepare(reference, "precision/recall reference")
  smp = _prepare(samples, "precision/recall samples")
  r_ref = (manifold_radii(ref, k, block=block, half=half) if reference_radii is None
           else np.asarray(reference_radii, np.float32))
  r_smp = manifold_radii(smp, k, block=block, half=half)
  b1, b2 = _block_size(len(ref), block), _block_size(len(smp), block)
  ref_in = np.zeros(len(ref), bool)
  smp_in = np.zeros(len(smp), bool)
  for i in range(0, len(ref), b1):
    n1 = min(b1, len(ref) - i)
    # Padded rows get radius -1 (no ball) and are dropped from the result.
    rr = np.concatenate([r_ref[i:i + n1], np.full(b1 - n1, -1, np.float32)])
    rows = _pad_rows(ref[i:i + n1], b1)
    for j in range(0, len(smp), b2):
      n2 = min(b2, len(smp) - j)
      rs = np.concatenate([r_smp[j:j + n2], np.full(b2 - n2, -1, np.float32)])
      a, b = _inside_block(rows, rr, _pad_rows(smp[j:j + n2], b2), rs, half)
      ref_in[i:i + n1] |= np.asarray(a)[:n1]
      smp_in[j:j + n2] |= np.asarray(b)[:n2]
  return float(smp_in.mean()), float(ref_in.mean())


# ---------------------------------------------------------------- FID / sFID

def fid_from_features(features, mu_ref, sigma_ref) -> float:
  """Frechet distance of ``features`` (N, D) to reference statistics."""
  f = np.asarray(features).reshape(len(features), -1)
  mu, sigma = frechet.statistics(f)
  return frechet.frechet_distance(mu, sigma, mu_ref, sigma_ref)


def spatial_flat(spatial) -> np.ndarray:
  """sFID features: (N, H, W, C) -> (N, H*W*C) in ADM's (H, W, C) order."""
  s = np.asarray(spatial)
  return s.reshape(len(s), -1)


def all_metrics(sample_feats: dict, reference, *, num_splits: int | None = None,
                split_size: int = IS_SPLIT_SIZE, k: int = NEIGHBOURHOOD,
                half: bool = True) -> dict:
  """FID, sFID, IS, precision and recall where the inputs allow them.

  Args:
    sample_feats: ``{'pool': (N, D), 'spatial': (N, S), 'logits': (N, K)}``
      (any may be absent).
    num_splits, split_size: the Inception Score's split rule (see
      :func:`inception_score_splits`; default ADM's 5,000-row splits).
    reference: a :class:`glue_jax.eval.reference.Reference`-like object with
      ``mu, sigma, mu_s, sigma_s, pool`` (any may be None).
  """
  out = {}
  pool = sample_feats.get("pool")
  if pool is not None and getattr(reference, "mu", None) is not None:
    out["fid"] = fid_from_features(pool, reference.mu, reference.sigma)
  spatial = sample_feats.get("spatial")
  if spatial is not None and getattr(reference, "mu_s", None) is not None:
    out["sfid"] = fid_from_features(spatial_flat(spatial), reference.mu_s,
                                    reference.sigma_s)
  if sample_feats.get("logits") is not None:
    out["inception_score"] = inception_score(sample_feats["logits"], num_splits,
                                             split_size=split_size)
  if pool is not None and getattr(reference, "pool", None) is not None:
    out["precision"], out["recall"] = precision_recall(
        reference.pool, pool, k, half=half)
  return out
