"""Reading a finished feature store for training.

:func:`open_source` (the ``data.name='feature_store'`` source of
:mod:`glue_jax.data.sources`) and :func:`open_store` open one split
directory written by :func:`glue_jax.data.feature_store.write_split` (the
format is described there): they load ``manifest.json``, check it against
what the config expects (features, shapes, dtypes, encoder/compressor weight
hashes, dataset and split fingerprint) and that every shard is present with
its recorded size (optionally its SHA-256), and return a
:class:`FeatureStoreSource` with random access by example index.

Errors: :class:`~glue_jax.data.feature_store.FeatureStoreError` for a store
that is incomplete (no manifest yet), of another format, or has a missing,
truncated or corrupt shard or record (naming the store, shard and example
index); :class:`~glue_jax.data.feature_store.ManifestMismatchError` listing
every way the store differs from the config; ``FileNotFoundError`` when there
is no store at all.

Examples skipped at precompute (corrupt images) are left out: the source's
indices run over the remaining examples only, never a zero-filled record.
A :class:`FeatureStoreSource` pickles without its open readers (they reopen
lazily), so it can be handed to Grain worker processes.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Mapping, Sequence

import numpy as np

from glue_jax.data import imagenet
from glue_jax.data.feature_store import (
    INDEX_BYTES, FORMAT, VERSION, FeatureStoreError, Layout, ManifestMismatchError, config_diff,
    read_json, file_sha256, record_index, shard_done, split_dirname)


def load_manifest(directory: str) -> dict:
  path = os.path.join(directory, "manifest.json")
  if not os.path.exists(path):
    plan = os.path.join(directory, "plan.json")
    if os.path.exists(plan):
      p = read_json(plan)
      done = sum(shard_done(directory, p, k) for k in range(p["num_shards"]))
      raise FeatureStoreError(f"{directory}: incomplete feature store ({done} of "
                              f"{p['num_shards']} shards done, no manifest.json); rerun "
                              "python -m glue_jax.tools.precompute with the same --out")
    raise FileNotFoundError(f"{directory}: no feature store (no manifest.json)")
  try:
    m = read_json(path)
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
    if len(buf) < INDEX_BYTES or record_index(buf) != index:
      got = record_index(buf) if len(buf) >= INDEX_BYTES else None
      raise FeatureStoreError(f"{where}: record holds index {got} (corrupt shard)")
    if len(buf) != self.layout.record_bytes:
      if len(buf) == INDEX_BYTES and index in self._skipped:
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
    img_cfg = dict(img_cfg)
    ds = manifest["dataset"]
    images, fp = imagenet.open_image_source(
        ds["name"], ds.get("split", split), img_cfg.get("data_dir"),
        image_size=int(img_cfg.get("image_size") or
                       manifest["preprocessing"].get("image_size")))
    if fp["fingerprint"] != ds.get("fingerprint"):
      raise ManifestMismatchError(
          f"{directory}: the prepared dataset differs from the one the store was "
          f"built from:\n  " + "\n  ".join(config_diff(ds, fp)))
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
