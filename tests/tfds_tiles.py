"""A tiny TFDS image dataset built inside the tests: ``tiles/n<N>``.

Random RGB noise tiles (deterministic, seeded by config and split) stored as
small PNGs, so the prepared ArrayRecord files stay a few hundred KiB; the ADM
centre crop of :class:`glue_jax.data.imagenet.ImageSource` upsamples each one
to ``data.image_size`` (256 px in the compressor tests), so every decoded
example is a full 256 x 256 x 3 image while the dataset on disk is tiny.

Configs ``n128``, ``n512`` and ``n2048`` (``train`` split of that many images)
all have a ``validation`` split of 64 images.  Importing this module registers
the builder; :func:`prepare` builds a config under ``data_dir`` (ArrayRecord,
as ``glue_jax.tools.prepare_data`` does) and returns the TFDS name.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from glue_jax.data import imagenet

tfds = imagenet._tfds()   # TFDS without the importlib_resources backport

TILE = 16                 # stored side (px)
NUM_VALIDATION = 64
SIZES = (128, 512, 2048)


def tile(seed: int, i: int) -> np.ndarray:
  """Image ``i`` of the stream ``seed``: uint8 (TILE, TILE, 3)."""
  return np.random.default_rng([seed, i]).integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="png")
  return buf.getvalue()


class Tiles(tfds.core.GeneratorBasedBuilder):
  """Random 16 px RGB tiles; ``train`` of N images, ``validation`` of 64."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Test dataset."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"n{n}", description=f"{n} train images")
                     for n in SIZES]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Random RGB noise tiles (glue_jax tests).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(TILE, TILE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=2),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    n = int(self.builder_config.name[1:])
    return {"train": self._generate_examples(1, n),
            "validation": self._generate_examples(2, NUM_VALIDATION)}

  def _generate_examples(self, seed: int, n: int):
    for i in range(n):
      yield i, {"image": _png(tile(seed, i)), "label": i % 2}


def prepare(n: int, data_dir: str) -> str:
  """Builds ``tiles/n<n>`` under ``data_dir`` (no-op when present); its TFDS name."""
  name = f"tiles/n{n}"
  imagenet.tfds_builder(name, data_dir).download_and_prepare(file_format="array_record")
  return name
