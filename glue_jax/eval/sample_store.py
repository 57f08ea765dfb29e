"""Resumable sample shards on disk and the ADM ``.npz`` assembled from them.

A sampling run writes into one directory:

- ``manifest.json``: what the samples are (checkpoint step, network, sampler
  preset, seed, label mode, count, shard size, image shape).  A restart with
  different settings is refused, so shards of two runs never mix.
- ``shard_000123.npz``: samples ``[123 * S, min(124 * S, N))`` with
  ``images`` (uint8 NHWC), ``labels`` (int32) and ``indices`` (int64).
  Shards are written atomically (temporary name, ``os.replace``), so a shard
  file either holds a finished shard or does not exist.  On restart every
  existing shard is verified (readable, CRCs, indices, labels, shape, dtype)
  and a bad one is deleted and made again.

Sample ``i`` is a function of ``(seed, i)`` only, so which process or device
made a shard does not matter.

:func:`write_npz_streaming` writes the ADM-compatible ``.npz`` (``arr_0``
uint8 NHWC, ``arr_1`` labels) shard by shard without holding all images in
memory; :func:`iter_npz_batches` reads an array of an ``.npz`` back in
batches the same way (the ADM evaluator's streaming reader works alike).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import zipfile
from typing import Callable, Iterable, Iterator

import numpy as np

MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")


class StoreError(RuntimeError):
  """A sample directory or file that cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """``num_samples`` split into shards of ``shard_size`` consecutive indices."""
  num_samples: int
  shard_size: int

  def __post_init__(self):
    if self.num_samples < 1 or self.shard_size < 1:
      raise ValueError(f"num_samples={self.num_samples} and shard_size="
                       f"{self.shard_size} must be positive")

  @property
  def num_shards(self) -> int:
    return -(-self.num_samples // self.shard_size)

  def indices(self, shard: int) -> np.ndarray:
    """Sample indices of ``shard`` (empty for a virtual shard past the end)."""
    lo = shard * self.shard_size
    return np.arange(lo, max(lo, min(lo + self.shard_size, self.num_samples)),
                     dtype=np.int64)


def _atomic_savez(path: str, **arrays) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class SampleStore:
  """The shard directory of one sampling run.

  Args:
    directory: where shards and the manifest live (created).
    layout: the shard layout.
    manifest: JSON-able identity of the samples (settings that change them).
    expected_labels: ``fn(indices) -> labels`` used to verify shards.
  """

  def __init__(self, directory: str, layout: ShardLayout, manifest: dict,
               expected_labels: Callable[[np.ndarray], np.ndarray] | None = None):
    self.directory = os.path.abspath(directory)
    self.layout = layout
    self.manifest = dict(manifest, num_samples=layout.num_samples,
                         shard_size=layout.shard_size)
    self.expected_labels = expected_labels

  # -- paths ---------------------------------------------------------------
  def shard_path(self, shard: int) -> str:
    return os.path.join(self.directory, f"shard_{shard:06d}.npz")

  # -- setup ---------------------------------------------------------------
  def open(self, *, clean_temporaries: bool = True) -> None:
    """Creates the directory or checks that its manifest matches ours."""
    os.makedirs(self.directory, exist_ok=True)
    path = os.path.join(self.directory, MANIFEST)
    want = json.loads(json.dumps(self.manifest, sort_keys=True, default=_jsonable))
    if os.path.exists(path):
      with open(path) as f:
        have = json.load(f)
      diffs = [f"{k}: stored {have.get(k)!r} != now {want.get(k)!r}"
               for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
      if diffs:
        raise StoreError(
            f"{self.directory} holds samples made with other settings:\n  "
            + "\n  ".join(diffs) + "\nuse another output directory or delete it")
    else:
      tmp = f"{path}.tmp-{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(want, f, indent=2, sort_keys=True)
      os.replace(tmp, path)
    if clean_temporaries:
      for stale in glob.glob(os.path.join(self.directory, "*.tmp-*")):
        os.remove(stale)

  # -- shards --------------------------------------------------------------
  def existing_shards(self) -> list[int]:
    out = []
    for name in os.listdir(self.directory):
      m = _SHARD_RE.match(name)
      if m:
        out.append(int(m.group(1)))
    return sorted(out)

  def verify_shard(self, shard: int, image_shape=None) -> str | None:
    """None when ``shard`` is complete and consistent, else what is wrong."""
    path = self.shard_path(shard)
    want_idx = self.layout.indices(shard)
    if len(want_idx) == 0:
      return f"{path}: shard {shard} is past the end ({self.layout})"
    try:
      with np.load(path) as f:
        missing = {"images", "labels", "indices"} - set(f.files)
        if missing:
          return f"{path}: missing arrays {sorted(missing)}"
        images, labels, idx = f["images"], f["labels"], f["indices"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      return f"{path}: unreadable ({type(e).__name__}: {e})"
    if not np.array_equal(idx, want_idx):
      return f"{path}: indices {idx[:3]}... != expected {want_idx[:3]}..."
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(idx):
      return f"{path}: images {images.dtype} {images.shape}, want uint8 ({len(idx)}, H, W, C)"
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
      return f"{path}: image shape {images.shape[1:]} != {tuple(image_shape)}"
    if self.expected_labels is not None and not np.array_equal(
        labels, self.expected_labels(idx)):
      return f"{path}: labels differ from those derived from the seed"
    return None

  def finished_shards(self, image_shape=None, *, verify: bool = True) -> set[int]:
    """Shards on disk that pass :meth:`verify_shard`; bad ones are deleted."""
    done = set()
    for shard in self.existing_shards():
      problem = self.verify_shard(shard, image_shape) if verify else None
      if problem is None:
        done.add(shard)
      else:
        logging.warning("sample store: %s; deleting it to sample again", problem)
        try:
          os.remove(self.shard_path(shard))
        except FileNotFoundError:
          pass
    return done

  def write_shard(self, shard: int, images: np.ndarray, labels: np.ndarray) -> str:
    idx = self.layout.indices(shard)
    images = np.asarray(images)
    if images.dtype != np.uint8 or len(images) != len(idx) or len(labels) != len(idx):
      raise StoreError(f"shard {shard}: {len(images)} {images.dtype} images / "
                       f"{len(labels)} labels for {len(idx)} indices")
    path = self.shard_path(shard)
    _atomic_savez(path, images=images, labels=np.asarray(labels, np.int32), indices=idx)
    return path

  def read_shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(self.shard_path(shard)) as f:
      return f["images"], f["labels"]

  def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images, labels)`` of every shard in index order (all must exist)."""
    for shard in range(self.layout.num_shards):
      if not os.path.exists(self.shard_path(shard)):
        raise StoreError(f"{self.shard_path(shard)} missing; sampling is unfinished")
      yield self.read_shard(shard)

  def assemble_npz(self, path: str) -> str:
    """Writes the ADM ``.npz`` of all samples (``arr_0`` images, ``arr_1`` labels)."""
    images, labels = self.read_shard(0)
    shape = (self.layout.num_samples,) + images.shape[1:]
    return write_npz_streaming(path, shape, self.iter_shards())


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (tuple, set)):
    return list(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --------------------------------------------------------------- npz streaming

class NpzWriter:
  """An uncompressed ``.npz`` written array by array (some streamed in batches).

  Written under a temporary name and renamed into place when the ``with``
  block ends without an error (removed otherwise).  ``np.savez``'s layout:
  ADM's reader and ``np.load`` read it.
  """

  def __init__(self, path: str):
    self.path = path
    self._tmp = f"{path}.tmp-{os.getpid()}"

  def __enter__(self) -> "NpzWriter":
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._zf = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED,
                               allowZip64=True)
    return self

  def add(self, name: str, array) -> None:
    with self._zf.open(f"{name}.npy", "w", force_zip64=True) as out:
      np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)

  def stream(self, name: str, shape, dtype=np.uint8) -> "_ArrayStream":
    """A writer of ``name`` (``shape``) from batches along axis 0."""
    return _ArrayStream(self, name, tuple(int(s) for s in shape), np.dtype(dtype))

  def __exit__(self, exc_type, *exc):
    try:
      self._zf.close()
      if exc_type is None:
        os.replace(self._tmp, self.path)
    finally:
      if os.path.exists(self._tmp):
        os.remove(self._tmp)


class _ArrayStream:
  def __init__(self, writer: NpzWriter, name: str, shape, dtype):
    self.writer, self.name, self.shape, self.dtype = writer, name, shape, dtype
    self.written = 0
    self._out = writer._zf.open(f"{name}.npy", "w", force_zip64=True)
    np.lib.format.write_array_header_2_0(
        self._out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": shape})

  def write(self, batch) -> int:
    """Writes rows of ``batch`` up to the declared count; returns rows taken."""
    batch = np.ascontiguousarray(batch)
    if batch.dtype != self.dtype or tuple(batch.shape[1:]) != self.shape[1:]:
      raise StoreError(f"{self.writer.path}: batch {batch.dtype} {batch.shape} does not "
                       f"match {self.dtype} {self.shape}")
    take = min(len(batch), self.shape[0] - self.written)
    self._out.write(batch[:take].tobytes())
    self.written += take
    return take

  def close(self) -> None:
    self._out.close()
    if self.written != self.shape[0]:
      raise StoreError(f"{self.writer.path}: only {self.written} of {self.shape[0]} "
                       f"rows of {self.name!r} supplied")


def write_npz_streaming(path: str, shape, batches: Iterable[tuple[np.ndarray, np.ndarray]]
                        ) -> str:
  """Writes ``arr_0`` (uint8 ``shape``) and ``arr_1`` (int labels) from batches.

  The archive is uncompressed like ``np.savez`` (ADM's reader streams it) and
  written under a temporary name, then renamed.  Raises if the batches do not
  add up to ``shape[0]`` images of ``shape[1:]``.
  """
  shape = tuple(int(s) for s in shape)
  all_labels = []
  with NpzWriter(path) as w:
    arr = w.stream("arr_0", shape, np.uint8)
    for images, labels in batches:
      take = arr.write(images)
      all_labels.append(np.asarray(labels)[:take])
      if arr.written == shape[0]:
        break
    try:
      arr.close()
    except StoreError as e:
      raise StoreError(f"{path}: only {arr.written} of {shape[0]} images supplied") from e
    w.add("arr_1", np.concatenate(all_labels).astype(np.int64))
  return path


def npz_array_info(path: str, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of ``key`` in an ``.npz`` without reading its data."""
  with _open_member(path, key) as f:
    shape, _, dtype = _read_header(f, path, key)
  return shape, dtype


def iter_npz_batches(path: str, key: str = "arr_0", batch_size: int = 256,
                     limit: int | None = None) -> Iterator[np.ndarray]:
  """Reads ``key`` of an ``.npz`` in batches along axis 0 (memory-flat)."""
  with _open_member(path, key) as f:
    shape, fortran, dtype = _read_header(f, path, key)
    if fortran or dtype.hasobject:
      with np.load(path) as z:
        arr = z[key]
      for i in range(0, min(len(arr), limit or len(arr)), batch_size):
        yield arr[i:i + batch_size]
      return
    n = shape[0] if limit is None else min(limit, shape[0])
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for i in range(0, n, batch_size):
      b = min(batch_size, n - i)
      data = f.read(b * row)
      if len(data) != b * row:
        raise StoreError(f"{path}:{key}: truncated at row {i}")
      yield np.frombuffer(data, dtype).reshape((b,) + tuple(shape[1:]))


class _open_member:
  def __init__(self, path: str, key: str):
    self.path, self.key = path, key

  def __enter__(self):
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"no such .npz: {self.path}")
    try:
      self._zip = zipfile.ZipFile(self.path)
    except zipfile.BadZipFile as e:
      raise StoreError(f"{self.path}: not an .npz archive ({e})") from e
    names = self._zip.namelist()
    if f"{self.key}.npy" not in names:
      self._zip.close()
      raise StoreError(f"{self.path}: no array {self.key!r} "
                       f"(has {sorted(n[:-4] for n in names)})")
    self._f = self._zip.open(f"{self.key}.npy")
    return self._f

  def __exit__(self, *exc):
    self._f.close()
    self._zip.close()


def _read_header(f, path: str, key: str):
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise StoreError(f"{path}:{key}: unsupported .npy version {version}")
