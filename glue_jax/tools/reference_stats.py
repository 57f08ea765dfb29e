r"""Reference statistics of a dataset split, for ``glue_jax.evaluate``.

  python -m glue_jax.tools.reference_stats --source=digits:test --features=digits \
      --out=refs/digits16_test.npz
  python -m glue_jax.tools.reference_stats --source=folder:/data/imagenet/val \
      --image_size=256 --inception_weights=pt_inception.pth --out=refs/in256_val.npz
  python -m glue_jax.tools.reference_stats --source=npz:ref_batch.npz ...

Sources: ``digits:<split>`` (``glue_jax.data.digits`` at ``--image_size``,
16 px, the demo's size, by default),
``npz:<path>[:<key>]`` (uint8 NHWC images, key ``arr_0`` by default) and
``folder:<dir>`` (every image file below ``dir``, centre-cropped to
``--image_size`` (required) as ADM/REPA preprocess ImageNet: halve with a box filter
while the short side is >= 2x the size, bicubic-resize the short side to the
size, take the centre crop).

By default the output ``.npz`` is a complete ADM reference batch, as the
ADM evaluator reads one: ``arr_0`` (the images, streamed to disk, uint8 NHWC)
and ``mu, sigma, mu_s, sigma_s`` (float64, of all images), plus ``pool``
(float32 features of the ``arr_0`` images: glue_jax's precision/recall
reference, so it need not re-run the network), ``feature_net`` and
``num_images``.  Precision/recall then use every image, as ADM does for any
reference batch.

``--num_pool=M`` keeps a random M of the images (``--seed``) in ``pool`` and
``arr_0`` (listed in ``pool_indices``); the statistics stay those of all
images.  ``--no-include_images`` omits ``arr_0``: a smaller file that only
glue_jax can read (ADM's evaluator opens ``arr_0`` first and fails).  See
``glue_jax.eval.reference`` for what each layout supports.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import numpy as np

from glue_jax import evaluate
from glue_jax.data import digits
from glue_jax.eval import features, reference, sample_store

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


def center_crop(image, size: int) -> np.ndarray:
  """ADM's centre crop of a PIL image to ``size`` x ``size`` RGB uint8."""
  from PIL import Image
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def _folder_files(root: str) -> list[str]:
  files = []
  for dirpath, _, names in os.walk(root):
    files += [os.path.join(dirpath, n) for n in names if n.endswith(IMAGE_EXTENSIONS)]
  if not files:
    raise FileNotFoundError(f"folder source {root}: no image files ({IMAGE_EXTENSIONS})")
  return sorted(files)


DIGITS_IMAGE_SIZE = 16      # the demo's digits (8x8 upsampled; 4x4 patches of 4)


def source_image_size(spec: str) -> int:
  """The image size a source implies when ``--image_size`` is not given:
  the demo's 16 px for digits, the stored size for an npz; a folder needs one."""
  kind, _, rest = spec.partition(":")
  if kind == "digits":
    return DIGITS_IMAGE_SIZE
  if kind == "npz":
    path, _, key = rest.partition(":")
    shape, _ = sample_store.npz_array_info(path, key or "arr_0")
    if len(shape) != 4 or shape[1] != shape[2]:
      raise ValueError(f"{path}:{key or 'arr_0'} has shape {shape}, want square NHWC images")
    return int(shape[1])
  raise ValueError(f"--source {spec!r}: give --image_size (the size images are cropped to)")


def open_source(spec: str, image_size: int, max_images: int = 0,
                batch_size: int = 256) -> tuple[int, Iterator[np.ndarray]]:
  """``(number of images, iterator of uint8 NHWC batches)`` of a source spec."""
  kind, _, rest = spec.partition(":")
  if kind == "digits":
    images = digits.load(rest or "test", image_size)["image"]
    if max_images:
      images = images[:max_images]
    return len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))
  if kind == "npz":
    path, _, key = rest.partition(":")
    key = key or "arr_0"
    shape, dtype = sample_store.npz_array_info(path, key)
    if len(shape) != 4 or dtype != np.uint8:
      raise ValueError(f"{path}:{key} is {dtype} {shape}, want uint8 NHWC images")
    n = min(shape[0], max_images) if max_images else shape[0]
    return n, sample_store.iter_npz_batches(path, key, batch_size, limit=n)
  if kind == "folder":
    from PIL import Image
    files = _folder_files(rest)
    if max_images:
      files = files[:max_images]

    def gen():
      for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i:i + batch_size]:
          with Image.open(f) as im:
            batch.append(center_crop(im, image_size))
        yield np.stack(batch)
    return len(files), gen()
  raise ValueError(f"--source {spec!r}: digits:<split>, npz:<path>[:<key>] or folder:<dir>")


def compute(source: str, net, *, image_size: int, out: str, num_pool: int = 0,
            include_images: bool = True, max_images: int = 0, mesh=None,
            per_device_batch: int = 64, seed: int = 0, progress: bool = True) -> str:
  """Features of ``source`` -> reference ``.npz`` at ``out``; returns ``out``.

  ``num_pool`` (0: all) and ``include_images``: see the module docstring.
  """
  from tqdm import tqdm
  n, batches = open_source(source, image_size, max_images)
  keep = reference.pool_subset(n, num_pool, seed)
  extractor = features.Extractor(net, mesh, per_device_batch)
  with sample_store.NpzWriter(out) as writer:
    stream = []

    def tee(it):
      pos = 0
      for b in it:
        b = np.asarray(b)
        if include_images:
          if not stream:
            rows = n if keep is None else len(keep)
            stream.append(writer.stream("arr_0", (rows,) + b.shape[1:], np.uint8))
          idx = np.arange(pos, pos + len(b))
          stream[0].write(b if keep is None else b[np.isin(idx, keep)])
        pos += len(b)
        yield b
    with tqdm(total=n, unit="img", desc="reference features", disable=not progress) as bar:
      feats = extractor(tee(batches), progress=bar)
    if len(feats["pool"]) != n:
      raise ValueError(f"--source {source}: announced {n} images, read {len(feats['pool'])}")
    if stream:
      stream[0].close()
    ref = reference.from_features(feats, tag=net.tag, path=out, num_pool=num_pool, seed=seed)
    for k, v in reference.arrays(ref, num_images=n).items():
      writer.add(k, v)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--source", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--features", default="inception", choices=["inception", "digits"])
  p.add_argument("--image_size", type=int, default=0,
                 help="image size (0: the source's own: 16 for digits, the npz's size; "
                      "a folder needs it)")
  p.add_argument("--inception_weights", default="")
  p.add_argument("--inception_mode", default="adm", choices=["adm", "pytorch_fid"])
  p.add_argument("--digits_classifier", default="",
                 help="digits classifier cache file (trained there if absent)")
  p.add_argument("--num_pool", type=int, default=0,
                 help="random reference images kept for precision/recall (0: all, as ADM)")
  p.add_argument("--include_images", action=argparse.BooleanOptionalAction, default=True,
                 help="store the images as arr_0 (needed by the ADM evaluator)")
  p.add_argument("--max_images", type=int, default=0)
  p.add_argument("--per_device_batch", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    a.image_size = a.image_size or source_image_size(a.source)
  except (FileNotFoundError, ValueError) as e:
    print(f"reference_stats: error: {e}", file=sys.stderr)
    return 2
  if a.features == "inception":
    net = features.inception(a.inception_weights, mode=a.inception_mode)
  else:
    opts = evaluate.EvalOptions(features="digits", digits_classifier=a.digits_classifier)
    net = evaluate.make_feature_net(opts, a.image_size)
  try:
    path = compute(a.source, net, image_size=a.image_size, out=a.out, num_pool=a.num_pool,
                   include_images=a.include_images, max_images=a.max_images,
                   per_device_batch=a.per_device_batch, seed=a.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"reference_stats: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
