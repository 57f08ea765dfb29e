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


def save_npz(path: str, **arrays) -> str:
  """Writes an ``.npz`` atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def save_module(module, path: str) -> str:
  """Every variable of an NNX module (params and statistics) to ``.npz``."""
  from flax import nnx
  flat = {"/".join(map(str, k)): np.asarray(v.value)
          for k, v in nnx.to_flat_state(nnx.state(module))}
  return save_npz(path, **flat)


def load_module(module, path: str):
  """Fills an NNX module written by :func:`save_module`; every variable must
  be present with its shape (errors name the file and key)."""
  from flax import nnx
  import jax.numpy as jnp
  with np.load(path) as f:
    for k, v in nnx.to_flat_state(nnx.state(module)):
      key = "/".join(map(str, k))
      if key not in f.files:
        raise KeyError(f"{path}: missing {key}")
      if tuple(f[key].shape) != tuple(v.value.shape):
        raise ValueError(f"{path}: {key} has shape {f[key].shape}, expected {v.value.shape}")
      v.value = jnp.asarray(f[key])
  return module


def save_curve(path: str, series: dict, *, xlabel: str = "step", ylabel: str = "value",
               x: dict | None = None) -> str:
  """Line plot of ``{name: values}`` as a PNG (matplotlib, Agg), atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
  for name, ys in series.items():
    xs = (x or {}).get(name, range(1, len(ys) + 1))
    ax.plot(list(xs), list(ys), label=name, marker="o" if len(ys) < 30 else None)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
  return path
