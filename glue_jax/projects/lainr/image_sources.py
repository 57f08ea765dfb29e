"""Image sources of the LA-INR jobs: digits, scikit-image photo crops, TFDS images.

Each is a random-access source of ``{'image': uint8 (S, S, 3)}`` examples that
the trainer's Grain pipeline reads; the digits and the photo crops are small
packaged sets held in memory, TFDS datasets are read example by example (so
memory does not grow with the dataset).  The ImageNette recipe's random crop
and flip is an ``augment(example, rng)`` applied by Grain after shuffling.
"""

from __future__ import annotations

import functools

import numpy as np

from glue_jax.data import digits
from glue_jax.data.pipeline import ArraySource
from glue_jax.projects.lainr import photo_data as photos


class TfdsImageSource:
  """``i -> {'image'}`` over a prepared TFDS image dataset: centre-cropped to
  ``size``, or the raw image when ``raw`` (cropped later by :func:`random_crop`)."""

  def __init__(self, images: photos.TfdsImages, *, raw: bool = False):
    self.images, self.raw = images, raw
    self.name = f"{images.name}/{images.split}"

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    if self.raw:
      ex = self.images.source[int(i)]
      im = np.asarray(ex[self.images.image_key])
      if im.ndim == 2 or im.shape[-1] == 1:
        im = np.repeat(im.reshape(im.shape[0], im.shape[1], 1), 3, -1)
      return {"image": im[..., :3]}
    return {"image": self.images.get([int(i)])[0]}


def random_crop(size: int, example: dict, rng: np.random.Generator) -> dict:
  """Short side -> ``size``, a random crop and a random horizontal flip."""
  return {"image": np.ascontiguousarray(photos.center_crop(example["image"], size, rng))}


def sources(config):
  """``(train source, test images uint8 (N, S, S, 3), augment or None)``."""
  dc = config.data
  size = dc.image_size
  if dc.name == "digits":
    train = digits.load("train", size)["image"][:dc.num_train or None]
    return (ArraySource({"image": train}, name="digits/train"),
            digits.load("test", size)["image"][:dc.num_test], None)
  if dc.name == "photos":
    train = photos.skimage_crops("train", size, dc.num_train, seed=config.seed)["image"]
    test = photos.skimage_crops("test", size, dc.num_test, seed=config.seed)["image"]
    return ArraySource({"image": train}, name="photos/train"), test, None
  if dc.name.startswith("tfds:"):
    name = dc.name[len("tfds:"):]
    train = photos.TfdsImages(name, dc.train_split, size, data_dir=dc.tfds_dir,
                              image_key=dc.image_key)
    test = photos.TfdsImages(name, dc.test_split, size, data_dir=dc.tfds_dir,
                             image_key=dc.image_key)
    test_images = test.get(np.arange(min(dc.num_test, len(test))))
    augment = functools.partial(random_crop, size) if dc.augment else None
    return TfdsImageSource(train, raw=dc.augment), test_images, augment
  raise ValueError(f"config.data.name={dc.name!r}: digits | photos | tfds:<name>")


def first_images(source, n: int) -> np.ndarray:
  """The first ``n`` images of a source, stacked (centre crops)."""
  n = min(n or len(source), len(source))
  if isinstance(source, TfdsImageSource):
    return source.images.get(np.arange(n))
  return np.stack([source[i]["image"] for i in range(n)])
