"""The feature store: precomputed per-example features as sharded ArrayRecord files.

REGLUE's inputs other than the label are deterministic functions of the
(center-cropped, never augmented) image: the VAE posterior moments, the
compressed multi-layer DINOv2 semantics, the [CLS] token and the REPA
targets.  ``python -m glue_jax.tools.precompute`` computes them once with
:func:`write_split`; training reads them with
:func:`glue_jax.data.feature_reader.open_source` (the
``data.name='feature_store'`` source of :mod:`glue_jax.data.sources`).
This module holds the on-disk format shared by writer and reader, and the
writer.

One directory per split, ``<root>/<split>/``:

- ``plan.json``: what the store holds (dataset and split fingerprint,
  preprocessing, encoder/compressor identity with weight hashes, feature
  shapes and dtypes, shard layout).  Written first; a resumed run must match.
- ``<split>-KKKKK-of-NNNNN.array_record``: shard k holds examples
  ``[k*E, min((k+1)*E, count))`` in index order (``E`` examples per shard),
  written with ``group_size:1`` for random access.  Each process writes the
  shards ``k % process_count == process_index``.
- ``<shard>.done.json``: the shard's byte count, SHA-256 and skipped
  examples; it exists only once the shard is complete (shards are written
  to ``<shard>.tmp`` and renamed), so a rerun skips finished shards and
  rewrites partial ones.
- ``manifest.json``: plan + per-shard checksums + skipped examples, written
  by whichever process completes the last shard.

A record is the example index (int64, little-endian) followed by each
feature's raw little-endian C-order bytes, features sorted by name
(``label`` included; shapes and dtypes in ``manifest['features']``).  An example whose image could
not be decoded under the ``skip`` policy has the 8-byte index only and is
listed in ``manifest['skipped']``; readers leave it out (never zero-filled).
Every inconsistency (missing/truncated/corrupt shard, wrong record size or
index, manifest/config mismatch, wrong extractor output) is an error naming
the store, shard and example index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Callable, Mapping, Sequence

import numpy as np

FORMAT = "glue_jax.feature_store"
VERSION = 1
WRITER_OPTIONS = "group_size:1"
INDEX_BYTES = 8


class FeatureStoreError(RuntimeError):
  """A store's files are missing, truncated or corrupt."""


class ManifestMismatchError(ValueError):
  """The store does not hold what the config expects."""


class InjectedFault(RuntimeError):
  """Raised by the ``fault_after_shards`` test hook of :func:`write_split`."""


# -- dtypes, records ------------------------------------------------------------
def np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def dtype_name(dtype) -> str:
  d = np.dtype(dtype)
  return "bfloat16" if d.name == "bfloat16" else d.name


class Layout:
  """Byte layout of one record from ``{name: {'shape', 'dtype'}}`` (names sorted)."""

  def __init__(self, features: Mapping[str, Mapping]):
    self.names = sorted(features)
    self.shapes = [tuple(int(s) for s in features[k]["shape"]) for k in self.names]
    self.dtypes = [np_dtype(features[k]["dtype"]).newbyteorder("<") for k in self.names]
    sizes = [int(np.prod(s, dtype=np.int64)) * d.itemsize
             for s, d in zip(self.shapes, self.dtypes)]
    self.offsets = list(np.cumsum([INDEX_BYTES] + sizes[:-1])) if sizes else []
    self.record_bytes = INDEX_BYTES + sum(sizes)

  def encode(self, index: int, example: Mapping[str, np.ndarray]) -> bytes:
    parts = [np.int64(index).astype("<i8").tobytes()]
    for k, shape, dt in zip(self.names, self.shapes, self.dtypes):
      parts.append(np.ascontiguousarray(np.asarray(example[k]).astype(dt, copy=False))
                   .reshape(shape).tobytes())
    return b"".join(parts)

  def decode(self, buf: bytes, keys: Sequence[str] | None = None) -> dict:
    out = {}
    for k, shape, dt, off in zip(self.names, self.shapes, self.dtypes, self.offsets):
      if keys is None or k in keys:
        n = int(np.prod(shape, dtype=np.int64))
        out[k] = np.frombuffer(buf, dt, n, int(off)).reshape(shape)
    return out


def record_index(buf: bytes) -> int:
  return int(np.frombuffer(buf, "<i8", 1, 0)[0])


# -- files ------------------------------------------------------------------------
def split_dirname(split: str) -> str:
  """Directory name of a split (``'train[:1000]'`` -> ``'train_1000'``)."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_") or "split"


def shard_name(split: str, k: int, num_shards: int) -> str:
  return f"{split_dirname(split)}-{k:05d}-of-{num_shards:05d}.array_record"


def shard_bounds(plan: Mapping, k: int) -> tuple[int, int]:
  e = plan["examples_per_shard"]
  return k * e, min((k + 1) * e, plan["count"])


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _remove(*paths: str) -> None:
  for p in paths:
    if os.path.exists(p):
      os.remove(p)


def params_hash(tree) -> str:
  """SHA-256 of a parameter tree (nested dicts / NNX state / arrays): names,
  dtypes, shapes and bytes of every leaf, in sorted path order."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  h = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(getattr(leaf, "value", leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{dtype_name(a.dtype)}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# -- writing ------------------------------------------------------------------------
def make_plan(*, split: str, count: int, features: Mapping[str, Mapping],
              examples_per_shard: int, dataset: Mapping, identity: Mapping,
              preprocessing: Mapping, writer_options: str = WRITER_OPTIONS) -> dict:
  if count <= 0:
    raise ValueError(f"{dataset.get('name', '?')}/{split}: no examples to store")
  if examples_per_shard <= 0:
    raise ValueError(f"examples_per_shard={examples_per_shard}")
  if "group_size:1" not in writer_options.replace(" ", "").split(","):
    raise ValueError(f"writer_options {writer_options!r}: random access needs group_size:1")
  return {
      "format": FORMAT, "version": VERSION, "split": split, "count": int(count),
      "examples_per_shard": int(examples_per_shard),
      "num_shards": -(-int(count) // int(examples_per_shard)),
      "features": {k: {"shape": [int(s) for s in v["shape"]], "dtype": str(v["dtype"])}
                   for k, v in features.items()},
      "record": "int64 little-endian index, then each feature's raw little-endian "
                "C-order bytes, features sorted by name; index only = skipped example",
      "dataset": json.loads(json.dumps(dict(dataset))),
      "preprocessing": json.loads(json.dumps(dict(preprocessing))),
      "identity": json.loads(json.dumps(dict(identity), default=str)),
      "writer_options": writer_options,
  }


def config_diff(a, b, prefix="") -> list[str]:
  """Human-readable differences of two JSON-like trees."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        out.append(f"{prefix}{k}: {a.get(k, '<absent>')!r} != {b.get(k, '<absent>')!r}")
      else:
        out += config_diff(a[k], b[k], f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} != {b!r}"]


def _check_or_write_plan(directory: str, plan: dict) -> None:
  path = os.path.join(directory, "plan.json")
  if os.path.exists(path):
    diffs = config_diff(read_json(path), plan)
    if diffs:
      raise ManifestMismatchError(
          f"{directory}: the store was started with a different configuration "
          "(stored != now):\n  " + "\n  ".join(diffs) +
          "\nwrite to a new --out directory or delete this one")
  else:
    _write_json(path, plan)


def shard_done(directory: str, plan: Mapping, k: int) -> bool:
  """True when shard ``k`` is complete: file and sidecar present and consistent."""
  name = shard_name(plan["split"], k, plan["num_shards"])
  path = os.path.join(directory, name)
  done = path + ".done.json"
  if not (os.path.exists(path) and os.path.exists(done)):
    return False
  try:
    info = read_json(done)
  except (OSError, ValueError):
    return False
  start, stop = shard_bounds(plan, k)
  return (info.get("start") == start and info.get("stop") == stop
          and info.get("bytes") == os.path.getsize(path))


def _examples(source, start: int, stop: int, read_threads: int):
  """``(index, example | None)`` for ``start..stop-1`` in order (threaded reads)."""
  if read_threads <= 0:
    for i in range(start, stop):
      yield i, source[i]
    return
  import grain
  ds = grain.MapDataset.range(start, stop).map(lambda i: (int(i), source[int(i)]))
  yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                  prefetch_buffer_size=4 * read_threads))


def _batches(items, batch_size: int):
  """Groups ``(index, example|None)`` into lists with ``batch_size`` real examples."""
  batch, n = [], 0
  for i, ex in items:
    batch.append((i, ex))
    n += ex is not None
    if n == batch_size:
      yield batch
      batch, n = [], 0
  if batch:
    yield batch


def write_split(directory: str, *, source, extract: Callable, split: str,
                dataset: Mapping, identity: Mapping, preprocessing: Mapping,
                features: Mapping[str, Mapping] | None = None,
                examples_per_shard: int = 1024, batch_size: int = 64,
                process_index: int = 0, process_count: int = 1,
                writer_options: str = WRITER_OPTIONS, read_threads: int = 8,
                progress: bool = True, fault_after_shards: int | None = None
                ) -> dict | None:
  """Writes this process's shards of one split; returns the manifest when complete.

  Args:
    directory: the split's directory (``<root>/<split>``; created).
    source: random access ``i -> {'image': uint8 (H, W, 3), 'label'}`` or None
      for an image skipped as corrupt (see ``imagenet.ImageSource``).
    extract: plain (JAX) function ``uint8 (B, H, W, 3) -> {name: (B, ...)}``;
      every batch is padded to ``batch_size`` (one compilation).
    dataset: source dataset description incl. its split ``fingerprint``.
    identity: first stage / encoder / compressor identity (weight hashes).
    preprocessing: e.g. ``{'crop': 'adm_center_crop', 'image_size': 256}``.
    features: ``{name: {'shape', 'dtype'}}`` of ``extract``'s per-example
      outputs; default from ``jax.eval_shape``.
    fault_after_shards: test hook: after this many shards written by this
      call, write one batch of the next shard and raise :class:`InjectedFault`.
  """
  os.makedirs(directory, exist_ok=True)
  name = f"{dataset.get('name', '?')}/{split}"
  count = len(source)
  first = None
  for i in range(min(count, 16)):
    first = source[i]
    if first is not None:
      break
  if first is None:
    raise FeatureStoreError(f"{name}: none of the first examples could be read")
  image_shape = tuple(np.shape(first["image"]))
  if features is None:
    features = infer_features(extract, batch_size, image_shape)
  features = {**dict(features), "label": {"shape": [], "dtype": "int32"}}
  plan = make_plan(split=split, count=count, features=features,
                   examples_per_shard=examples_per_shard, dataset=dataset,
                   identity=identity, preprocessing=preprocessing,
                   writer_options=writer_options)
  _check_or_write_plan(directory, plan)
  mine = [k for k in range(plan["num_shards"]) if k % process_count == process_index]
  todo = [k for k in mine if not shard_done(directory, plan, k)]
  if len(todo) < len(mine):
    logging.info("%s: %d of this process's %d shards already complete; skipping them",
                 name, len(mine) - len(todo), len(mine))
  total = sum(shard_bounds(plan, k)[1] - shard_bounds(plan, k)[0] for k in todo)
  from tqdm import tqdm
  bar = tqdm(total=total, desc=f"precompute {name} [{process_index}/{process_count}]",
             unit="img", disable=not progress)
  layout = Layout(plan["features"])
  try:
    for n_written, k in enumerate(todo):
      fault = fault_after_shards is not None and n_written >= fault_after_shards
      _write_shard(directory, plan, k, source, extract, layout, batch_size,
                   read_threads, name, bar, image_shape, fault)
  finally:
    bar.close()
  return finalize(directory)


def infer_features(extract: Callable, batch_size: int, image_shape) -> dict:
  import jax
  out = jax.eval_shape(extract, jax.ShapeDtypeStruct((batch_size, *image_shape), np.uint8))
  return {k: {"shape": list(v.shape[1:]), "dtype": dtype_name(v.dtype)}
          for k, v in out.items()}


def _write_shard(directory, plan, k, source, extract, layout, batch_size, read_threads,
                 name, bar, image_shape, fault):
  from array_record.python import array_record_module
  start, stop = shard_bounds(plan, k)
  fname = shard_name(plan["split"], k, plan["num_shards"])
  path = os.path.join(directory, fname)
  tmp = path + ".tmp"
  _remove(path + ".done.json", path, tmp)
  where = f"{name}: shard {fname}"
  skipped = []
  writer = array_record_module.ArrayRecordWriter(tmp, plan["writer_options"])
  try:
    pending = None
    for batch in _batches(_examples(source, start, stop, read_threads), batch_size):
      result = _dispatch(extract, batch, batch_size, image_shape, where)
      if pending is not None:
        _write_batch(writer, layout, *pending, where, skipped)
        bar.update(len(pending[0]))
      pending = (batch, result)
      if fault and pending is not None:
        _write_batch(writer, layout, *pending, where, skipped)
        raise InjectedFault(f"{where}: injected fault after one batch (test hook)")
    if pending is not None:
      _write_batch(writer, layout, *pending, where, skipped)
      bar.update(len(pending[0]))
  finally:
    writer.close()
  size = os.path.getsize(tmp)
  sha = file_sha256(tmp)
  os.replace(tmp, path)
  _write_json(path + ".done.json", {"file": fname, "start": start, "stop": stop,
                                    "count": stop - start, "bytes": size, "sha256": sha,
                                    "skipped": skipped})
  if skipped:
    logging.warning("%s: %d corrupt images skipped (indices %s)", where, len(skipped),
                    [s["index"] for s in skipped][:20])


def _dispatch(extract, batch, batch_size, image_shape, where):
  imgs = [ex["image"] for _, ex in batch if ex is not None]
  if not imgs:
    return None
  for (i, ex) in batch:
    if ex is not None and tuple(np.shape(ex["image"])) != image_shape:
      raise FeatureStoreError(f"{where}: example {i}: image shape "
                              f"{np.shape(ex['image'])} != {image_shape}")
  x = np.stack(imgs)
  if len(x) < batch_size:
    x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(x), axis=0)])
  return extract(x)


def _write_batch(writer, layout, batch, result, where, skipped):
  real = [(i, ex) for i, ex in batch if ex is not None]
  outs = {}
  if real:
    i0, i1 = real[0][0], real[-1][0]
    for k, shape, dt in zip(layout.names, layout.shapes, layout.dtypes):
      if k == "label":
        continue
      if k not in result:
        raise FeatureStoreError(f"{where}: examples {i0}..{i1}: extractor gave no "
                                f"'{k}' (gave {sorted(result)})")
      a = np.asarray(result[k])
      if a.shape[1:] != shape or dtype_name(a.dtype) != dtype_name(dt):
        raise FeatureStoreError(
            f"{where}: examples {i0}..{i1}: extractor output '{k}' is "
            f"{dtype_name(a.dtype)}{list(a.shape[1:])}, the store holds "
            f"{dtype_name(dt)}{list(shape)}")
      a = a[:len(real)]
      if a.dtype.kind == "f" or dtype_name(a.dtype) == "bfloat16":
        ok = np.isfinite(a.astype(np.float32).reshape(len(real), -1)).all(axis=1)
        if not ok.all():
          raise FeatureStoreError(f"{where}: example {real[int(np.argmin(ok))][0]}: "
                                  f"non-finite values in '{k}'")
      outs[k] = a
  row = 0
  for i, ex in batch:
    if ex is None:
      writer.write(np.int64(i).astype("<i8").tobytes())
      skipped.append({"index": int(i), "reason": "corrupt image"})
      continue
    rec = {k: v[row] for k, v in outs.items()}
    rec["label"] = np.int32(ex["label"])
    writer.write(layout.encode(i, rec))
    row += 1


def finalize(directory: str) -> dict | None:
  """Writes ``manifest.json`` once every shard is complete; returns it (or None)."""
  plan = read_json(os.path.join(directory, "plan.json"))
  shards, skipped, missing = [], [], []
  for k in range(plan["num_shards"]):
    if not shard_done(directory, plan, k):
      missing.append(k)
      continue
    info = read_json(os.path.join(directory, shard_name(plan["split"], k,
                                                         plan["num_shards"]) + ".done.json"))
    skipped += info.pop("skipped", [])
    shards.append(info)
  if missing:
    logging.info("%s: %d of %d shards still missing (%s...); the manifest is written "
                 "by the run that completes the last one", directory, len(missing),
                 plan["num_shards"], missing[:5])
    return None
  manifest = {**plan, "shards": shards, "skipped": skipped, "num_skipped": len(skipped)}
  _write_json(os.path.join(directory, "manifest.json"), manifest)
  if skipped:
    logging.warning("%s: %d examples skipped as corrupt", directory, len(skipped))
  return manifest
