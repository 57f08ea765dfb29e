"""The embedded demo dataset: scikit-learn's digits (1797 8x8 images, 10 classes).

Images are upsampled to ``size`` x ``size`` with PIL bicubic, replicated to
RGB and stored as uint8 NHWC; no TensorFlow and no download is needed (the
data ships with scikit-learn).  The split is fixed: the last ``num_test``
images (in scikit-learn's order) are the test split.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NUM_CLASSES = 10


def load(split: str = "train", size: int = 32, num_test: int = 297) -> dict:
  """``{'image': (N, size, size, 3) uint8, 'label': (N,) int32}``."""
  from sklearn.datasets import load_digits
  d = load_digits()
  imgs = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
  labels = d.target.astype(np.int32)
  n_train = len(imgs) - num_test
  if split == "train":
    imgs, labels = imgs[:n_train], labels[:n_train]
  elif split == "test":
    imgs, labels = imgs[n_train:], labels[n_train:]
  elif split != "all":
    raise ValueError(f"digits: unknown split {split!r} (train/test/all)")
  up = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                 for im in imgs])
  return {"image": np.repeat(up[..., None], 3, axis=-1), "label": labels}
