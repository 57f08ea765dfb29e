"""The demo's digits as a TFDS dataset (ArrayRecord), read like ImageNet.

``Digits`` is a ``tfds.core.GeneratorBasedBuilder`` over the numpy arrays
that scikit-learn ships (no download): 1797 native 8x8 images, grey levels
scaled to uint8 exactly as :func:`glue_jax.data.digits.load` does,
replicated to RGB and stored as PNG; splits ``train`` (first 1500) and
``test`` (last 297), in scikit-learn's order (shuffling is disabled, so
TFDS index ``i`` is digit ``i`` of the split).  Images are stored at their
native size: the ADM center crop of the image pipeline
(:mod:`glue_jax.data.imagenet`) upsamples them with PIL bicubic, which gives
exactly ``digits.load(split, size)``.

Building needs only numpy, PIL and TFDS (images are PNG-encoded here with
PIL, so no TensorFlow op is called by this module):

  python -m glue_jax.tools.prepare_data --dataset=digits --data_dir=DIR

Reading: ``tfds.data_source('digits', split='train', data_dir=DIR)`` after
importing this module (the import registers the builder), or
:func:`glue_jax.data.imagenet.open_tfds`.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "digits"
NUM_TEST = 297
NATIVE_SIZE = 8


def native_images() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as ``(uint8 (N, 8, 8, 3), int64 labels)``."""
  from sklearn.datasets import load_digits
  d = load_digits()
  grey = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1), d.target.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="png")
  return buf.getvalue()


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (10 classes), RGB PNG, train 1500 / test 297."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Native 8x8 images, RGB, scikit-learn order."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's optical digits (UCI), 8x8, grey replicated to RGB.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(NATIVE_SIZE, NATIVE_SIZE, 3),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    images, labels = native_images()
    n_train = len(images) - NUM_TEST
    sl = slice(0, n_train) if split == "train" else slice(n_train, None)
    for i, (img, lab) in enumerate(zip(images[sl], labels[sl])):
      yield i, {"image": _png(img), "label": int(lab)}
