"""Image pipelines over TFDS ArrayRecord datasets with the ADM center crop.

REGLUE (through REPA / EDM2 ``dataset_tools.py convert
--transform=center-crop-dhariwal``) preprocesses ImageNet with ADM's
``center_crop_arr`` (guided-diffusion ``image_datasets.py``): decode with PIL
and convert to RGB; while the short side is >= 2 * size, halve both sides
(floor) with PIL BOX resampling; PIL BICUBIC resize so the short side is
``size`` (each side ``round(side * size / short)``, Python rounding); crop
``size x size`` at offsets ``floor((H - size) / 2)``, ``floor((W - size) / 2)``.
No flips or other augmentation.  :func:`center_crop_arr` is that function on
arrays or PIL images.

:class:`ImageSource` turns a TFDS ``data_source`` (raw JPEG/PNG bytes,
``SkipDecoding``) into random-access ``{'image': uint8 (S, S, 3), 'label'}``
examples; an image that cannot be decoded raises :class:`CorruptImageError`
naming the dataset, split and index, or, with ``on_corrupt='skip'``, is
dropped and counted in the logs (never zero-filled).  :func:`make_image_dataset`
is the Grain pipeline (per-process shard, seeded shuffle, drop-remainder
batches, thread reads, multiprocess prefetch, checkpointable state) of
:func:`glue_jax.data.pipeline.make_dataset` over such a source.

Datasets are prepared once with ``python -m glue_jax.tools.prepare_data``
(``digits``: :mod:`glue_jax.data.tfds_digits`; ``imagenet2012``: TFDS's builder
on the manual tar files).  No TensorFlow op is used here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys

import numpy as np
from PIL import Image

from glue_jax.data import pipeline

ON_CORRUPT = ("error", "skip")


class CorruptImageError(ValueError):
  """An example's image bytes cannot be decoded."""


def center_crop_arr(image, image_size: int) -> np.ndarray:
  """ADM / EDM2 center crop: uint8 array or PIL image -> (size, size, 3) uint8."""
  pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  if pil.mode != "RGB":
    pil = pil.convert("RGB")
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size),
                   resample=Image.Resampling.BICUBIC)
  arr = np.asarray(pil)
  y0 = (arr.shape[0] - image_size) // 2
  x0 = (arr.shape[1] - image_size) // 2
  return np.ascontiguousarray(arr[y0:y0 + image_size, x0:x0 + image_size])


def decode_image(data: bytes, where: str = "image") -> Image.Image:
  """Encoded bytes -> fully loaded RGB PIL image, or :class:`CorruptImageError`."""
  if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
    raise CorruptImageError(f"{where}: no image bytes (got {type(data).__name__} "
                            f"of length {len(data) if hasattr(data, '__len__') else '?'})")
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return im.convert("RGB") if im.mode != "RGB" else im.copy()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(f"{where}: cannot decode image ({len(data)} bytes): "
                            f"{type(e).__name__}: {e}") from e


# -- TFDS ---------------------------------------------------------------------
def _tfds():
  """tensorflow_datasets, importable without the ``importlib_resources`` backport.

  TFDS's builders reach ``importlib_resources.abc`` (an etils[epath] extra);
  on Python >= 3.11 the standard library module has the same ``abc``.
  """
  try:
    import importlib_resources  # noqa: F401
  except ImportError:
    import importlib.resources
    sys.modules.setdefault("importlib_resources", importlib.resources)
  import tensorflow_datasets as tfds
  return tfds


def tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder of ``name`` ('digits' registers ours), reading ArrayRecord."""
  tfds = _tfds()
  if name == "digits":
    from glue_jax.data import tfds_digits  # noqa: F401  (registers the builder)
  return tfds.builder(name, data_dir=data_dir or None, file_format="array_record")


def open_tfds(name: str, split: str, data_dir: str | None, *, decode: bool = False):
  """``(builder, data_source)`` of a prepared dataset; images stay encoded bytes
  unless ``decode``.  A missing preparation is an error naming the command."""
  tfds = _tfds()
  builder = tfds_builder(name, data_dir)
  if not os.path.isfile(os.path.join(str(builder.data_path), "dataset_info.json")):
    raise FileNotFoundError(
        f"{name}: not prepared under {builder.data_path}; run "
        f"python -m glue_jax.tools.prepare_data --dataset={name} --data_dir={data_dir}"
        + (" --manual_dir=DIR_WITH_TARS" if name == "imagenet2012" else ""))
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  try:
    source = builder.as_data_source(split, decoders=decoders)
  except (ValueError, KeyError) as e:
    raise ValueError(f"{name}: cannot open split {split!r} under {builder.data_path} "
                     f"(splits: {sorted(builder.info.splits)}): {e}") from e
  return builder, source


def split_fingerprint(builder, split: str) -> dict:
  """What identifies a split's examples and order: name, version, counts, sizes.

  ``fingerprint`` is the SHA-256 of the other fields.  (Per-record checksums
  would mean reading the whole dataset; TFDS's shard lengths and byte counts
  change whenever the prepared files do.)
  """
  info = builder.info
  base = split.split("[")[0]
  if base not in info.splits:
    raise ValueError(f"{info.full_name}: no split {base!r} (has {sorted(info.splits)})")
  full = info.splits[base]
  d = {"name": info.name, "full_name": info.full_name, "version": str(info.version),
       "split": split, "num_examples": int(info.splits[split].num_examples),
       "shard_lengths": [int(x) for x in full.shard_lengths],
       "num_bytes": int(full.num_bytes)}
  d["fingerprint"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
  return d


# -- sources --------------------------------------------------------------------
class ImageSource:
  """Random access ``i -> {'image': uint8 (S, S, 3), 'label': int32}`` with the ADM crop.

  ``records`` holds dicts with encoded ``'image'`` bytes (or decoded uint8
  arrays) and ``'label'``.  With ``on_corrupt='skip'`` a bad image gives
  ``None`` (filter it; :func:`make_image_dataset` does) and a log line with
  the running count of this process.
  """

  def __init__(self, records, *, image_size: int, name: str = "images",
               on_corrupt: str = "error"):
    if on_corrupt not in ON_CORRUPT:
      raise ValueError(f"on_corrupt={on_corrupt!r}; one of {ON_CORRUPT}")
    self.records, self.image_size, self.name = records, int(image_size), name
    self.on_corrupt = on_corrupt
    self.num_corrupt = 0

  def __len__(self):
    return len(self.records)

  def load(self, i: int) -> dict:
    """Decoded + cropped example ``i``; always raises on a corrupt image."""
    i = int(i)
    if not 0 <= i < len(self.records):
      raise IndexError(f"{self.name}: index {i} out of range [0, {len(self.records)})")
    rec = self.records[i]
    where = f"{self.name}: example {i}"
    img = rec["image"]
    if isinstance(img, np.ndarray) and img.dtype == np.uint8:
      if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
      elif img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise CorruptImageError(f"{where}: image array of shape {img.shape}")
      pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    else:
      pil = decode_image(img, where)
    return {"image": center_crop_arr(pil, self.image_size),
            "label": np.int32(rec["label"])}

  def __getitem__(self, i):
    try:
      return self.load(i)
    except CorruptImageError as e:
      if self.on_corrupt == "error":
        raise
      self.num_corrupt += 1
      logging.warning("skipping corrupt image (%d so far in this process): %s",
                      self.num_corrupt, e)
      return None


def open_image_source(name: str, split: str, data_dir: str | None, *, image_size: int,
                      on_corrupt: str = "error") -> tuple[ImageSource, dict]:
  """``(ImageSource, split_fingerprint)`` of a prepared TFDS dataset."""
  builder, records = open_tfds(name, split, data_dir)
  src = ImageSource(records, image_size=image_size, name=f"{name}/{split}",
                    on_corrupt=on_corrupt)
  return src, split_fingerprint(builder, split)


def read_in_order(source, indices, threads: int = 8):
  """``source[i]`` for ``indices`` in order, read by a Grain thread pool."""
  import grain
  indices = [int(i) for i in indices]
  if threads <= 0:
    return [source[i] for i in indices]
  ds = grain.MapDataset.source(indices).map(lambda i: source[i])
  return list(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=4 * threads)))


def load_images(name: str, split: str, *, image_size: int, data_dir: str | None = None,
                limit: int | None = None, threads: int = 8) -> np.ndarray:
  """The first ``limit`` (default all) cropped images of a prepared split, as one
  uint8 ``(N, S, S, 3)`` array (small datasets / subsets; corrupt images raise)."""
  src, _ = open_image_source(name, split, data_dir, image_size=image_size)
  n = len(src) if not limit else min(int(limit), len(src))
  exs = read_in_order(src, range(n), threads)
  return np.stack([e["image"] for e in exs]) if exs else \
      np.zeros((0, image_size, image_size, 3), np.uint8)


def make_image_dataset(source: ImageSource, *, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       shuffle: bool = True, num_epochs: int | None = None,
                       worker_count: int = 0, read_threads: int = 0,
                       with_index: bool = False):
  """The Grain training pipeline over an image source (see ``pipeline.make_dataset``).

  Corrupt images skipped by the source are filtered before batching, so a
  batch is always full; the iterator state stays checkpointable.
  """
  return pipeline.make_dataset(
      source, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, shuffle=shuffle, num_epochs=num_epochs,
      worker_count=worker_count, with_index=with_index,
      filter_none=source.on_corrupt == "skip", read_threads=read_threads)
