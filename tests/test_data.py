"""Grain pipeline: per-process shards, deterministic order, iterator state."""
import numpy as np
import pytest

from glue_jax.data import digits, pipeline


def _source(n=40):
  return pipeline.ArraySource({"x": np.arange(n), "label": np.arange(n) % 3})


def test_processes_read_disjoint_examples_covering_the_split():
  src = _source(40)
  seen = []
  for p in range(2):
    it = iter(pipeline.make_dataset(src, batch_size=4, seed=1, process_index=p,
                                    process_count=2, num_epochs=1))
    xs = np.concatenate([b["x"] for b in it])
    seen.append(set(xs.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(40))


def test_iterator_state_roundtrip_continues_with_same_examples():
  ds = pipeline.make_dataset(_source(), batch_size=4, seed=3)
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["x"] for _ in range(5)]
  it2 = iter(ds)
  it2.set_state(state)
  got = [next(it2)["x"] for _ in range(5)]
  np.testing.assert_array_equal(np.stack(expected), np.stack(got))


def test_epochs_reshuffle_and_errors():
  it = iter(pipeline.make_dataset(_source(8), batch_size=8, seed=0))
  a, b = next(it)["x"], next(it)["x"]
  assert sorted(a) == sorted(b) and not np.array_equal(a, b)
  with pytest.raises(ValueError, match="per-process batch"):
    pipeline.make_dataset(_source(8), batch_size=16, seed=0)
  with pytest.raises(IndexError, match="out of range"):
    _source(8)[8]


def test_digits_dataset():
  d = digits.load("test", size=16)
  assert d["image"].shape == (297, 16, 16, 3) and d["image"].dtype == np.uint8
  assert set(np.unique(d["label"])) == set(range(10))
  with pytest.raises(ValueError, match="unknown split"):
    digits.load("val")
