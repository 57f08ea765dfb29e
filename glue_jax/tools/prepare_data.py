r"""Prepare a TFDS dataset as ArrayRecord files for the Grain pipelines.

  python -m glue_jax.tools.prepare_data --dataset=digits --data_dir=DATA
  python -m glue_jax.tools.prepare_data --dataset=imagenet2012 \
      --manual_dir=/path/with/ILSVRC2012_img_train.tar+ILSVRC2012_img_val.tar \
      --data_dir=DATA

``digits`` is built from scikit-learn's arrays (:mod:`glue_jax.data.tfds_digits`).
``imagenet2012`` uses TFDS's own builder on the tar files you downloaded from
image-net.org (``manual_dir`` holds ``ILSVRC2012_img_train.tar`` and/or
``ILSVRC2012_img_val.tar``; the optional ``ILSVRC2012_img_test.tar`` adds the
unlabelled test split).  TFDS stores the original JPEG bytes (it re-encodes
the 22 CMYK images and the one PNG as RGB JPEG) and orders each split by a
hash of the file names; the ADM center crop is applied when reading.  The
ImageNet build reads ~150 GB and runs for hours in one process; the result is
``DATA/imagenet2012/5.1.0/imagenet2012-{train,validation}.array_record-*``.

The tool prints each split's example count and fingerprint (what a feature
store built from it records).
"""

from __future__ import annotations

import json
import os
import sys

from glue_jax.data import imagenet

DATASETS = ("digits", "imagenet2012")


def prepare(dataset: str, data_dir: str, manual_dir: str | None = None) -> dict:
  """Builds ``dataset`` under ``data_dir`` (a no-op when already prepared)."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; one of {DATASETS}")
  if dataset == "imagenet2012":
    if not manual_dir:
      raise ValueError("imagenet2012 needs --manual_dir with ILSVRC2012_img_train.tar "
                       "and/or ILSVRC2012_img_val.tar (from image-net.org)")
    tars = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
            if os.path.exists(os.path.join(manual_dir, f))]
    if not tars:
      raise FileNotFoundError(f"--manual_dir={manual_dir}: neither ILSVRC2012_img_train.tar "
                              "nor ILSVRC2012_img_val.tar is there")
  tfds = imagenet._tfds()
  builder = imagenet.tfds_builder(dataset, data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=config, file_format="array_record")
  return {str(s): imagenet.split_fingerprint(builder, str(s)) for s in sorted(builder.info.splits)}


def main(argv=None):
  from absl import app, flags
  flags.DEFINE_enum("dataset", None, list(DATASETS), "dataset to prepare")
  flags.DEFINE_string("data_dir", None, "TFDS data directory (output)")
  flags.DEFINE_string("manual_dir", None, "directory holding the ImageNet tar files")
  flags.mark_flags_as_required(["dataset", "data_dir"])

  def _main(_):
    f = flags.FLAGS
    splits = prepare(f.dataset, f.data_dir, f.manual_dir)
    print(json.dumps({s: {"num_examples": v["num_examples"], "fingerprint": v["fingerprint"]}
                      for s, v in splits.items()}, indent=1))
  app.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
