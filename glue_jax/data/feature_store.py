"""The feature store: precomputed per-example features as sharded ArrayRecord files.

REGLUE's inputs other than the label are deterministic functions of the
(center-cropped, never augmented) image: the VAE posterior moments, the
compressed multi-layer DINOv2 semantics, the [CLS] token and the REPA
targets.  ``python -m glue_jax.tools.precompute`` computes them once with
:func:`write_split`; training reads them with :func:`open_source` (the
``data.name='feature_store'`` source of :mod:`glue_jax.data.sources`).

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
import threading
from typing import Callable, Mapping, Sequence

import numpy as np

FORMAT = "glue_jax.feature_store"
VERSION = 1
WRITER_OPTIONS = "group_size:1"
_INDEX_BYTES = 8


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
    self.offsets = list(np.cumsum([_INDEX_BYTES] + sizes[:-1])) if sizes else []
    self.record_bytes = _INDEX_BYTES + sum(sizes)

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


def _read_json(path: str):
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


def _diff(a, b, prefix="") -> list[str]:
  """Human-readable differences of two JSON-like trees."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        out.append(f"{prefix}{k}: {a.get(k, '<absent>')!r} != {b.get(k, '<absent>')!r}")
      else:
        out += _diff(a[k], b[k], f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} != {b!r}"]


def _check_or_write_plan(directory: str, plan: dict) -> None:
  path = os.path.join(directory, "plan.json")
  if os.path.exists(path):
    diffs = _diff(_read_json(path), plan)
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
    info = _read_json(done)
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
  plan = _read_json(os.path.join(directory, "plan.json"))
  shards, skipped, missing = [], [], []
  for k in range(plan["num_shards"]):
    if not shard_done(directory, plan, k):
      missing.append(k)
      continue
    info = _read_json(os.path.join(directory, shard_name(plan["split"], k,
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


# -- reading ------------------------------------------------------------------------
def load_manifest(directory: str) -> dict:
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    plan = os.path.join(directory, "plan.json")
    if os.path.exists(plan):
      p = _read_json(plan)
      done = sum(shard_done(directory, p, k) for k in range(p["num_shards"]))
      raise FeatureStoreError(f"{directory}: incomplete feature store ({done} of "
                              f"{p['num_shards']} shards done, no manifest.json); rerun "
                              "python -m glue_jax.tools.precompute with the same --out")
    raise FileNotFoundError(f"{directory}: no feature store (no manifest.json)")
  try:
    m = _read_json(path)
  except ValueError as e:
    raise FeatureStoreError(f"{path}: unreadable manifest: {e}") from e
  if m.get("format") != FORMAT or m.get("version") != VERSION:
    raise FeatureStoreError(f"{path}: format {m.get('format')!r} v{m.get('version')}, "
                            f"expected {FORMAT!r} v{VERSION}")
  return m


def verify_manifest(manifest: Mapping, where: str, *, keys: Sequence[str] = (),
                    shapes: Mapping | None = None, dtypes: Mapping | None = None,
                    identity: Mapping | None = None, dataset: str | None = None,
                    split_fingerprint: str | None = None) -> None:
  """Raises :class:`ManifestMismatchError` listing every expectation not met.

  ``identity`` maps a component ('first_stage', 'encoder', 'compressor') to the
  expected weight hash.
  """
  feats = manifest["features"]
  diffs = []
  for k in keys:
    if k not in feats:
      diffs.append(f"feature '{k}' missing (store has {sorted(feats)})")
  for k, shape in (shapes or {}).items():
    if k in feats and list(feats[k]["shape"]) != [int(s) for s in shape]:
      diffs.append(f"feature '{k}': store shape {feats[k]['shape']} != config {list(shape)}")
    elif k not in feats:
      diffs.append(f"feature '{k}' missing (store has {sorted(feats)})")
  for k, dt in (dtypes or {}).items():
    if k in feats and feats[k]["dtype"] != str(dt):
      diffs.append(f"feature '{k}': store dtype {feats[k]['dtype']} != config {dt}")
  for comp, want in (identity or {}).items():
    have = manifest.get("identity", {}).get(comp, {})
    have = have.get("hash") if isinstance(have, Mapping) else have
    if want and have != want:
      diffs.append(f"identity.{comp}: store hash {have} != config {want}")
  ds = manifest.get("dataset", {})
  if dataset and ds.get("name") != dataset:
    diffs.append(f"dataset: store {ds.get('name')!r} != config {dataset!r}")
  if split_fingerprint and ds.get("fingerprint") != split_fingerprint:
    diffs.append(f"dataset fingerprint: store {ds.get('fingerprint')} != "
                 f"{split_fingerprint} ({ds.get('full_name')}, {ds.get('split')})")
  if diffs:
    raise ManifestMismatchError(f"{where}: feature store does not match the config:\n  "
                                + "\n  ".join(diffs))


def check_shards(directory: str, manifest: Mapping, checksums: bool = False) -> None:
  """Every shard present with its recorded size (and SHA-256 with ``checksums``)."""
  for s in manifest["shards"]:
    path = os.path.join(directory, s["file"])
    where = f"{directory}: shard {s['file']} (examples {s['start']}..{s['stop'] - 1})"
    if not os.path.exists(path):
      raise FeatureStoreError(f"{where}: file missing")
    size = os.path.getsize(path)
    if size != s["bytes"]:
      raise FeatureStoreError(f"{where}: {size} bytes, manifest says {s['bytes']} "
                              "(truncated or rewritten)")
    if checksums and file_sha256(path) != s["sha256"]:
      raise FeatureStoreError(f"{where}: SHA-256 differs from the manifest (corrupt)")


class FeatureStoreSource:
  """Random access over a split's stored examples (skipped ones left out).

  ``keys`` restricts what is decoded; ``images`` (an ``imagenet.ImageSource``
  over the same split) joins the cropped image by index, checking that its
  label equals the stored one.  Picklable (readers reopen lazily), so it works
  in Grain worker processes.
  """

  def __init__(self, directory: str, manifest: Mapping, *,
               keys: Sequence[str] | None = None, images=None):
    self.directory, self.manifest = directory, dict(manifest)
    self.name = f"{directory} ({manifest['dataset'].get('name')}/{manifest['split']})"
    self.layout = Layout(manifest["features"])
    self.keys = None if not keys else tuple(dict.fromkeys([*keys, "label"]))
    self.images = images
    skipped = sorted(int(s["index"]) for s in manifest.get("skipped", []))
    self._skipped = frozenset(skipped)
    self._valid = (np.setdiff1d(np.arange(manifest["count"]), skipped)
                   if skipped else None)
    self._readers: dict = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_readers"], d["_lock"] = {}, None
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()

  def __len__(self):
    return len(self._valid) if self._valid is not None else self.manifest["count"]

  def store_index(self, i: int) -> int:
    return int(self._valid[i]) if self._valid is not None else int(i)

  def _reader(self, k: int):
    r = self._readers.get(k)
    if r is None:
      with self._lock:
        r = self._readers.get(k)
        if r is None:
          from array_record.python import array_record_module
          s = self.manifest["shards"][k]
          path = os.path.join(self.directory, s["file"])
          try:
            r = array_record_module.ArrayRecordReader(
                path, "readahead_buffer_size:0", file_reader_buffer_size=32768)
          except (RuntimeError, ValueError, OSError) as e:
            raise FeatureStoreError(f"{self.directory}: shard {s['file']}: cannot open: "
                                    f"{e}") from e
          if r.num_records() != s["count"]:
            raise FeatureStoreError(
                f"{self.directory}: shard {s['file']}: {r.num_records()} records, "
                f"manifest says {s['count']} (truncated or corrupt)")
          self._readers[k] = r
    return r

  def read(self, index: int) -> dict:
    """Stored example by *store* index (raises for a skipped one)."""
    n = self.manifest["count"]
    if not 0 <= index < n:
      raise IndexError(f"{self.name}: index {index} out of range [0, {n})")
    k = index // self.manifest["examples_per_shard"]
    s = self.manifest["shards"][k]
    where = f"{self.directory}: shard {s['file']}: example {index}"
    try:
      buf = self._reader(k).read([index - s["start"]])[0]
    except (RuntimeError, ValueError, IndexError) as e:
      raise FeatureStoreError(f"{where}: unreadable record ({e})") from e
    if len(buf) < _INDEX_BYTES or record_index(buf) != index:
      got = record_index(buf) if len(buf) >= _INDEX_BYTES else None
      raise FeatureStoreError(f"{where}: record holds index {got} (corrupt shard)")
    if len(buf) != self.layout.record_bytes:
      if len(buf) == _INDEX_BYTES and index in self._skipped:
        raise FeatureStoreError(f"{where}: example was skipped at precompute")
      raise FeatureStoreError(f"{where}: record of {len(buf)} bytes, expected "
                              f"{self.layout.record_bytes} (truncated or corrupt)")
    ex = self.layout.decode(buf, self.keys)
    if self.images is not None:
      img = self.images.load(index)
      if int(img["label"]) != int(ex["label"]):
        raise FeatureStoreError(f"{where}: image label {int(img['label'])} != stored "
                                f"label {int(ex['label'])} (store built from other data?)")
      ex["image"] = img["image"]
    return ex

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.name}: index {i} out of range [0, {len(self)})")
    return self.read(self.store_index(i))


def open_store(directory: str, *, keys: Sequence[str] | None = None, images=None,
               verify_checksums: bool = False, **expect) -> FeatureStoreSource:
  """Opens a split directory; ``expect`` goes to :func:`verify_manifest`."""
  manifest = load_manifest(directory)
  verify_manifest(manifest, directory, keys=keys or (), **expect)
  check_shards(directory, manifest, checksums=verify_checksums)
  if manifest.get("num_skipped"):
    logging.warning("%s: %d examples were skipped at precompute (corrupt images); "
                    "%d remain", directory, manifest["num_skipped"],
                    manifest["count"] - manifest["num_skipped"])
  return FeatureStoreSource(directory, manifest, keys=keys, images=images)


def open_source(cfg, split: str = "train") -> FeatureStoreSource:
  """The training source of ``data.name='feature_store'``.

  Config fields (``config.data``): ``path`` (store root; the split's
  directory is ``<path>/<split>``), optional ``keys`` (features to read),
  ``expect_shapes`` / ``expect_dtypes`` (``{key: shape|dtype}``),
  ``identity`` (``{component: weight hash}``), ``dataset``,
  ``split_fingerprint``, ``verify_checksums`` (read every shard once), and
  ``images`` (``{'data_dir', 'image_size'}``: join the cropped images from
  the prepared TFDS dataset, whose split fingerprint must match the store's).
  """
  get = (lambda k, d=None: cfg.get(k, d)) if hasattr(cfg, "get") else \
      (lambda k, d=None: getattr(cfg, k, d))
  root = get("path")
  if not root:
    raise ValueError("data.path: the feature store directory is not set")
  directory = os.path.join(root, split_dirname(split))
  if not os.path.isdir(directory):
    have = sorted(os.listdir(root)) if os.path.isdir(root) else None
    raise FileNotFoundError(f"data.path: no feature store for split {split!r} at "
                            f"{directory}" + (f" (has {have})" if have is not None else ""))
  manifest = load_manifest(directory)
  images = None
  img_cfg = get("images")
  if img_cfg:
    from glue_jax.data import imagenet
    img_cfg = dict(img_cfg)
    ds = manifest["dataset"]
    images, fp = imagenet.open_image_source(
        ds["name"], ds.get("split", split), img_cfg.get("data_dir"),
        image_size=int(img_cfg.get("image_size") or
                       manifest["preprocessing"].get("image_size")))
    if fp["fingerprint"] != ds.get("fingerprint"):
      raise ManifestMismatchError(
          f"{directory}: the prepared dataset differs from the one the store was "
          f"built from:\n  " + "\n  ".join(_diff(ds, fp)))
  keys = get("keys")
  return open_store(directory, keys=list(keys) if keys else None, images=images,
                    verify_checksums=bool(get("verify_checksums", False)),
                    shapes=_plain(get("expect_shapes")), dtypes=_plain(get("expect_dtypes")),
                    identity=_plain(get("identity")), dataset=get("dataset") or None,
                    split_fingerprint=get("split_fingerprint") or None)


def _plain(x):
  if x is None:
    return None
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)
