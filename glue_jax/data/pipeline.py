"""Grain input pipelines: per-process sharding, seeded shuffling, batching.

Every process reads a disjoint slice of the examples (``index % count ==
process``), shuffles it with a seed shared by all processes, repeats it with a
fresh order per epoch and batches with drop-remainder (optionally dropping
examples the source returns as None, e.g. skipped corrupt images).  Grain
reads with threads and, with ``worker_count``, in worker processes
(``mp_prefetch``); :func:`global_batches` makes global arrays for the mesh.
The iterator's
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
                 worker_count: int = 0, with_index: bool = False,
                 filter_none: bool = False, read_threads: int = 0,
                 prefetch_buffer_size: int = 0, random_map=None):
  """A checkpointable per-process Grain ``IterDataset`` of batches.

  Args:
    source: random-access source (``__len__``/``__getitem__``).
    batch_size: per-process batch size.
    seed: shuffle seed (same on every process).
    with_index: adds each example's global index as ``'index'``.
    filter_none: drops examples the source returns as None (e.g. skipped
      corrupt images) before batching, so batches stay full.
    random_map: ``f(example, rng) -> example`` applied after shuffling and
      repeating (random crops, view choices): Grain seeds ``rng`` from
      ``seed`` and the element's position, so every epoch draws anew and a
      resumed iterator draws the same values.
    worker_count: Grain worker processes (``mp_prefetch``); 0 reads in this
      process.
    read_threads, prefetch_buffer_size: ``grain.ReadOptions`` of each reading
      process.  0: Grain's 16 threads; a prefetch buffer of 500 examples when
      filtering, else of as many *batches* as threads (Grain's default of 500
      elements would hold 500 batches).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}")
  ds = grain.MapDataset.source(source)
  if with_index:
    ds = ds.map_with_index(_add_index)
  ds = ds[process_index::process_count]
  if len(ds) < batch_size and drop_remainder:
    raise ValueError(f"{getattr(source, 'name', 'dataset')}: {len(ds)} examples per "
                     f"process < per-process batch {batch_size}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if random_map is not None:
    ds = ds.random_map(_skip_none(random_map), seed=seed)
  threads = read_threads or grain.ReadOptions().num_threads
  buffer = prefetch_buffer_size or (grain.ReadOptions().prefetch_buffer_size if filter_none
                                    else max(threads, 2))
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
  if filter_none:
    # MapDataset.batch cannot follow a filter: batch the iterable instead.
    it = ds.filter(_not_none).to_iter_dataset(options)
    it = it.batch(batch_size, drop_remainder=drop_remainder)
  else:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(options)
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def _add_index(i, ex):
  return None if ex is None else {**ex, "index": np.int64(i)}


def _skip_none(fn):
  def f(ex, rng):
    return None if ex is None else fn(ex, rng)
  return f


def _not_none(ex) -> bool:
  return ex is not None


def global_batches(iterator, shardings: dict):
  """Per-process numpy batches -> global ``jax.Array`` batches on the mesh.

  ``shardings`` maps each key to a ``NamedSharding`` whose batch axis spans
  all processes (``jax.make_array_from_process_local_data``).  Keep the
  Grain iterator itself for checkpointing; this only wraps ``next``.
  """
  import jax
  for local in iterator:
    yield {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
           for k, v in local.items()}
