"""Metric writers (clu: TensorBoard + logging) and image grids written as PNG."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from PIL import Image


def create_writer(logdir: str):
  """clu's default writer on process 0 (TensorBoard + text log), logging elsewhere."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from clu import metric_writers
  return metric_writers.create_default_writer(
      logdir, just_logging=jax.process_index() > 0, asynchronous=True)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) uint8 grid."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"image_grid expects uint8, got {images.dtype}")
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, cc = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + cc * (w + pad):pad + cc * (w + pad) + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> str:
  """Writes a uint8 HWC image atomically (temporary name + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  im = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  if scale > 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  tmp = path + ".tmp"
  im.save(tmp, format="PNG")
  os.replace(tmp, path)
  return path


def save_json(path: str, obj) -> str:
  """Writes JSON atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)
  return path
