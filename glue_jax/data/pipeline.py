"""Grain input pipelines: per-process sharding, seeded shuffling, batching.

Every process reads a disjoint slice of the examples (``index % count ==
process``), shuffles it with a seed shared by all processes, repeats it with a
fresh order per epoch and batches with drop-remainder.  The iterator's
state (``get_state``/``set_state``) holds indices only, so it is cheap to
checkpoint (the Orbax ``data_iter`` item) and resumes with the same examples.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import grain
import numpy as np


class ArraySource(Sequence):
  """Random-access source over a dict of equally long arrays (in memory)."""

  def __init__(self, arrays: Mapping[str, np.ndarray], name: str = "arrays"):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"{name}: arrays of different lengths {lengths}")
    self.arrays, self.name = dict(arrays), name
    self._len = next(iter(lengths.values()))

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    if not 0 <= int(i) < self._len:
      raise IndexError(f"{self.name}: index {i} out of range [0, {self._len})")
    return {k: v[int(i)] for k, v in self.arrays.items()}


def make_dataset(source, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None, drop_remainder: bool = True,
                 worker_count: int = 0, with_index: bool = False):
  """A checkpointable per-process Grain ``IterDataset`` of batches.

  Args:
    source: random-access source (``__len__``/``__getitem__``).
    batch_size: per-process batch size.
    seed: shuffle seed (same on every process).
    with_index: adds each example's global index as ``'index'``.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}")
  ds = grain.MapDataset.source(source)
  if with_index:
    ds = ds.map_with_index(lambda i, ex: {**ex, "index": np.int64(i)})
  ds = ds[process_index::process_count]
  if len(ds) < batch_size and drop_remainder:
    raise ValueError(f"{getattr(source, 'name', 'dataset')}: {len(ds)} examples per "
                     f"process < per-process batch {batch_size}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  it = ds.to_iter_dataset()
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it
