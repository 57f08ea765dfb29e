"""Sampling at scale: sharded over all devices and processes, into a SampleStore.

Sample ``i`` is a pure function of ``(seed, i)``: its initial noise and
per-step noise come from ``samplers.per_sample_keys(seed, i)`` and its class
label from the same key (:func:`sample_labels`), so the images do not depend
on the number of devices or hosts, the batch size or the order of work.

One jitted program (``jax.jit`` with explicit ``NamedSharding``s over a 1-D
``'data'`` mesh; parameters replicated, sample indices and outputs sharded)
samples with the checkpoint's preset and decodes through the first stage to
uint8 images.  Each step takes the next pending shards of the store
(``per_device_batch / shard_size`` per device), so every shard lives on one
device and the process holding it writes it; the last step is padded with
virtual indices past the end that are sampled but never written.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from glue_jax import sharding
from glue_jax.eval.sample_store import SampleStore, StoreError
from glue_jax.models import first_stage as first_stage_lib
from glue_jax.sampling import presets, sample_from_keys, samplers

LABEL_MODES = ("random", "balanced", "null")
_LABEL_STREAM = 0x1ABE1        # fold-in constant: labels' own random stream


def sample_labels(seed: int, indices, num_classes: int, mode: str = "random"):
  """Class label of each sample index (jittable).

  ``random`` (default, official): uniform in ``[0, num_classes)`` from
  ``(seed, i)``, independent per sample (REGLUE/REPA ``generate.py`` draw
  ``torch.randint(0, num_classes, (n,))`` per batch: not class-balanced);
  ``balanced``: ``i % num_classes`` (every class ``N / num_classes`` times when
  that divides, e.g. 50 each for 50K ImageNet samples; otherwise the first
  ``N % num_classes`` classes get one more); ``null``: the null label
  ``num_classes`` (unconditional sampling).
  """
  idx = jnp.asarray(indices)
  if mode == "random":
    keys = samplers.per_sample_keys(seed, idx)
    draw = lambda k: jax.random.randint(jax.random.fold_in(k, _LABEL_STREAM), (), 0,
                                        num_classes, jnp.int32)
    return jax.vmap(draw)(keys)
  if mode == "balanced":
    return (idx % num_classes).astype(jnp.int32)
  if mode == "null":
    return jnp.full(idx.shape, num_classes, jnp.int32)
  raise ValueError(f"label mode {mode!r}: one of {LABEL_MODES}")


def host_labels(seed: int, indices, num_classes: int, mode: str) -> np.ndarray:
  """:func:`sample_labels` as a numpy array (for verifying stored shards)."""
  return np.asarray(_labels_jit(seed, np.asarray(indices, np.int32), num_classes, mode))


_labels_jit = jax.jit(sample_labels, static_argnums=(2, 3))


def label_counts(labels, num_classes: int) -> dict:
  """``{'min', 'max', 'classes'}``: samples per class and classes present."""
  counts = np.bincount(np.asarray(labels), minlength=num_classes + 1)[:num_classes]
  return {"min": int(counts.min()), "max": int(counts.max()),
          "classes": int((counts > 0).sum())}


def _first_stage_parts(first_stage):
  """``(hashable static description, VAE graphdef | None, VAE params | None)``."""
  static = (first_stage.name, float(first_stage.scale), float(first_stage.shift),
            int(first_stage.factor), int(first_stage.channels))
  if getattr(first_stage, "vae", None) is None:
    return static, None, None
  graphdef, state = nnx.split(first_stage.vae)
  return static, graphdef, nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=16)
def _program(graphdef, fs_static, vae_graphdef, preset, seed: int, label_mode: str,
             spatial: tuple, latent_channels: int, global_dim: int, num_classes: int,
             mesh):
  """``(jitted, plain)`` ``run(params, fs_params, idx) -> (images, labels)``.

  Cached on its (hashable) inputs so evaluations of one model share compiles.
  """

  def run(params, fs_params, idx):
    keys = samplers.per_sample_keys(seed, idx)
    y = sample_labels(seed, idx, num_classes, label_mode)
    apply = lambda x, t, yy, g: nnx.merge(graphdef, params)(x, t, yy, g)
    x0, _ = sample_from_keys.sample(apply, preset, y, keys, spatial_shape=spatial,
                                    global_dim=global_dim, null_label=num_classes,
                                    latent_channels=latent_channels)
    vae = None if vae_graphdef is None else nnx.merge(vae_graphdef, fs_params)
    fs = first_stage_lib.FirstStage(*fs_static, vae=vae)
    return fs.decode_uint8(x0[..., :latent_channels]), y

  rep = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(run, in_shardings=(rep, rep, data), out_shardings=(data, data)), run


class ShardedSampler:
  """The jitted ``indices -> (uint8 images, labels)`` program on a mesh.

  Args:
    model: a :class:`glue_jax.api.LoadedModel` (its params are used; load it
      with ``use_ema=True`` for EMA weights).
    first_stage: a :class:`glue_jax.models.first_stage.FirstStage`.
    preset: the sampler preset.
    seed: the sampling seed.
    label_mode: one of :data:`LABEL_MODES`.
    mesh: a 1-D ``'data'`` mesh (default: all devices).
    per_device_batch: samples per device per step.
  """

  def __init__(self, model, first_stage, preset: presets.SamplerPreset, *, seed: int = 0,
               label_mode: str = "random", mesh=None, per_device_batch: int = 16):
    if label_mode not in LABEL_MODES:
      raise ValueError(f"label mode {label_mode!r}: one of {LABEL_MODES}")
    self.mesh = mesh or sharding.data_mesh()
    self.per_device_batch = int(per_device_batch)
    self.global_batch = self.per_device_batch * self.mesh.size
    self.seed, self.label_mode, self.preset = int(seed), label_mode, preset
    cfg = model.config
    self.num_classes = int(cfg.num_classes)
    fs_static, vae_graphdef, fs_params = _first_stage_parts(first_stage)
    self._fn, plain = _program(
        model.graphdef, fs_static, vae_graphdef, preset, self.seed, label_mode,
        (cfg.input_size, cfg.input_size, cfg.in_channels), cfg.latent_channels,
        cfg.global_token_dim, self.num_classes, self.mesh)
    pure = model.params if isinstance(model.params, dict) else nnx.to_pure_dict(model.params)
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.params = sharding.replicate(pure, self.mesh)
    self.fs_params = None if fs_params is None else sharding.replicate(fs_params, self.mesh)
    shape = jax.eval_shape(plain, pure, fs_params,
                           jax.ShapeDtypeStruct((self.global_batch,), jnp.int32))[0]
    self.image_shape = tuple(shape.shape[1:])

  def expected_labels(self, indices) -> np.ndarray:
    return host_labels(self.seed, indices, self.num_classes, self.label_mode)

  def __call__(self, indices: np.ndarray):
    """Dispatches sampling of ``global_batch`` indices (asynchronous)."""
    idx = np.asarray(indices, np.int32)
    if idx.shape != (self.global_batch,):
      raise ValueError(f"need {self.global_batch} indices, got {idx.shape}")
    return self._fn(self.params, self.fs_params,
                    sharding.to_global(idx, self.data_sharding))


def _local_blocks(arr) -> list[tuple[int, int, np.ndarray]]:
  """``(start, stop, data)`` of the rows of ``arr`` this process holds."""
  out, seen = [], set()
  for shard in arr.addressable_shards:
    sl = shard.index[0]
    start = sl.start or 0
    stop = arr.shape[0] if sl.stop is None else sl.stop
    if (start, stop) not in seen:
      seen.add((start, stop))
      out.append((start, stop, np.asarray(shard.data)))
  return out


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _broadcast(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def generate(sampler: ShardedSampler, store: SampleStore, *, verify: bool = True,
             on_shard: Callable[[int], None] | None = None,
             progress: bool = True) -> dict:
  """Samples every shard of ``store`` that is not finished yet.

  Args:
    sampler: the sharded sampling program.
    store: the shard directory (opened here; a manifest mismatch raises).
    verify: check existing shards before skipping them.
    on_shard: called with the shard id after each shard is written (test
      hook: raising there simulates a crash).
    progress: a tqdm bar with ETA on process 0.

  Returns:
    ``{'new_samples', 'skipped_shards', 'seconds', 'samples_per_s'}``.
  """
  layout = store.layout
  size = layout.shard_size
  if sampler.per_device_batch % size:
    raise StoreError(f"per-device batch {sampler.per_device_batch} is not a multiple of "
                     f"the store's shard size {size} (fixed when the run started)")
  if jax.process_index() == 0:
    store.open()
  _sync("sample_store_open")
  if jax.process_index() != 0:
    store.open(clean_temporaries=False)
  done = np.zeros(layout.num_shards, bool)
  if jax.process_index() == 0:
    for k in store.finished_shards(sampler.image_shape, verify=verify):
      done[k] = True
  done = _broadcast(done)
  pending = [int(k) for k in np.flatnonzero(~done)]
  per_step = sampler.global_batch // size
  total = sum(len(layout.indices(k)) for k in pending)
  logging.info("sampling %d of %d samples (%d shards done) in steps of %d on %d devices",
               total, layout.num_samples, int(done.sum()), sampler.global_batch,
               sampler.mesh.size)
  bar = tqdm(total=total, unit="img", desc="sampling", smoothing=0.1,
             disable=not progress or jax.process_index() != 0)
  t0 = time.perf_counter()

  def write(chunk, out):
    images, labels = out
    label_blocks = {(a, b): d for a, b, d in _local_blocks(labels)}
    for start, stop, block in _local_blocks(images):
      lab = label_blocks[(start, stop)]
      for pos in range(start // size, stop // size):
        shard = chunk[pos]
        n = len(layout.indices(shard))
        if n == 0:
          continue                         # a virtual shard past the end
        row = pos * size - start
        store.write_shard(shard, block[row:row + n], lab[row:row + n])
        if on_shard is not None:
          on_shard(shard)
    bar.update(sum(len(layout.indices(k)) for k in chunk))   # all processes' shards

  inflight = None
  try:
    for i in range(0, len(pending), per_step):
      chunk = pending[i:i + per_step]
      chunk += list(range(layout.num_shards, layout.num_shards + per_step - len(chunk)))
      idx = np.concatenate([np.arange(k * size, (k + 1) * size) for k in chunk])
      out = sampler(idx)                     # dispatch, then write the previous step
      if inflight is not None:
        write(*inflight)
      inflight = (chunk, out)
    if inflight is not None:
      write(*inflight)
  finally:
    bar.close()
  seconds = time.perf_counter() - t0
  _sync("sampling_done")
  return {"new_samples": total, "skipped_shards": int(done.sum()), "seconds": seconds,
          "samples_per_s": total / seconds if total else None}
