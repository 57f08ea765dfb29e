"""Natural-photo image sets for INR reconstruction: scikit-image crops and TFDS.

``skimage_crops(split, size, num)``: square crops of the colour photographs
that ship with scikit-image (astronaut, chelsea, coffee, rocket, Hubble deep
field, immunohistochemistry, retina, motorcycle; no download).  Each photo is
first resized so that its short side is 2, 4 or 8 crop sizes (three scales of
detail), then cropped at random positions.  The split is spatial: the right
quarter of every photo (at least one crop wide) is the test region, so train and test crops never
share pixels.  Deterministic in ``seed``.

``TfdsImages``: any TFDS image dataset that the user has prepared in a
random-access format (``tfds.data_source``: array_record or parquet), e.g.
CelebA, FFHQ, ImageNette at 178: short side resized to ``size`` (bicubic,
antialiased) and centre-cropped; ``augment=True`` takes a random crop and a
random horizontal flip instead (the ImageNette training recipe).  A dataset
that is missing or only prepared as TFRecord is an error naming what to run.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "stereo_motorcycle")
SCALES = (2, 4, 8)
TEST_FRACTION = 0.25


def _photo(name: str) -> np.ndarray:
  import skimage.data
  im = getattr(skimage.data, name)()
  if name == "stereo_motorcycle":
    im = im[0]
  return np.asarray(im[..., :3], np.uint8)


def _resize_short(im: np.ndarray, short: int) -> np.ndarray:
  h, w = im.shape[:2]
  s = short / min(h, w)
  size = (max(short, round(w * s)), max(short, round(h * s)))
  return np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC, reducing_gap=3.0))


def skimage_crops(split: str = "train", size: int = 32, num: int = 512, seed: int = 0,
                  photos: tuple[str, ...] = PHOTOS) -> dict:
  """``{'image': (num, size, size, 3) uint8, 'label': photo index}``."""
  if split not in ("train", "test"):
    raise ValueError(f"skimage_crops: unknown split {split!r} (train/test)")
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  pyramids = []
  for name in photos:
    try:
      im = _photo(name)
    except Exception as e:     # a photo needing a download that is unavailable
      raise RuntimeError(f"skimage_crops: scikit-image photo {name!r} unavailable "
                         f"({type(e).__name__}: {e}); pass photos=... without it") from e
    pyramids.append([_resize_short(im, k * size) for k in SCALES])
  images, labels = [], []
  for _ in range(num):
    p = int(rng.integers(len(pyramids)))
    im = pyramids[p][int(rng.integers(len(SCALES)))]
    h, w = im.shape[:2]
    split_col = w - max(size, int(round(w * TEST_FRACTION)))
    lo, hi = (0, split_col - size) if split == "train" else (split_col, w - size)
    if hi < lo:
      raise ValueError(f"skimage_crops: photo {photos[p]!r} too small for crop {size}")
    r = int(rng.integers(0, h - size + 1))
    c = int(rng.integers(lo, hi + 1))
    images.append(im[r:r + size, c:c + size])
    labels.append(p)
  return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}


def center_crop(im: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
  """Short side -> ``size`` then a centre (or, with ``rng``, random + flip) crop."""
  im = _resize_short(np.asarray(im, np.uint8), size)
  h, w = im.shape[:2]
  if rng is None:
    r, c = (h - size) // 2, (w - size) // 2
  else:
    r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
  out = im[r:r + size, c:c + size]
  if rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


class TfdsImages:
  """Random access to a prepared TFDS image dataset, resized and cropped."""

  def __init__(self, name: str, split: str, size: int, *, data_dir: str | None = None,
               image_key: str = "image", augment: bool = False):
    import tensorflow_datasets as tfds
    self.name, self.split, self.size = name, split, size
    self.image_key, self.augment = image_key, augment
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                     download=False)
    except Exception as e:
      where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
      raise FileNotFoundError(
          f"TFDS dataset {name!r} (split {split!r}) is not prepared for random access in "
          f"{where}: prepare it with `tfds build {name} --file_format=array_record` "
          f"(manual downloads as its TFDS page says) or pass data.tfds_dir. "
          f"Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if len(self.source) == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")

  def __len__(self) -> int:
    return len(self.source)

  def get(self, indices, rng: np.random.Generator | None = None) -> np.ndarray:
    """(len(indices), size, size, 3) uint8."""
    out = []
    for i in np.asarray(indices).reshape(-1):
      ex = self.source[int(i)]
      if self.image_key not in ex:
        raise KeyError(f"TFDS {self.name}: example has no {self.image_key!r} "
                       f"(keys {sorted(ex)}); set data.image_key")
      im = np.asarray(ex[self.image_key])
      if im.ndim == 2 or im.shape[-1] == 1:
        im = np.repeat(im.reshape(im.shape[0], im.shape[1], 1), 3, -1)
      out.append(center_crop(im[..., :3], self.size, rng if self.augment else None))
    return np.stack(out)
