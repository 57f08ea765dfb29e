"""Probes that read scene content off images, trained on the scenes dataset.

They are trained on real rendered scenes only, separately from any
generator, and then judge generated images:

- :class:`AttributeProbe` (local): a small CNN on a box crop (resampled to
  ``crop`` x ``crop``) predicting the object's colour and identity, each with
  an extra "none" class (trained on empty background crops);
- :class:`LayoutProbe` (global): a small fully-convolutional CNN on the whole
  image predicting, per cell of a ``grid`` x ``grid`` map, background or the
  identity of the object covering it.  :func:`relation_score` turns its maps
  into object centroids and checks the caption's relations.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glue_jax.projects.glod import scene_data as scenes_lib
from glue_jax.models import layers
from glue_jax.train import module_fit

NUM_COLOURS = len(scenes_lib.COLOURS)
NUM_IDENTITIES = len(scenes_lib.IDENTITIES)


def _signed(images) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def crop_boxes(images, boxes, size: int) -> jax.Array:
  """Bilinear crops: images (B,S,S,3) uint8/float, boxes (B,K,4) xyxy in [0,1] -> (B,K,size,size,3)."""
  x = jnp.asarray(images, jnp.float32)
  s = x.shape[1]

  def one(img, box):
    x0, y0, x1, y1 = box[0] * s, box[1] * s, box[2] * s, box[3] * s
    u = (jnp.arange(size) + 0.5) / size
    ys = y0 + u * (y1 - y0) - 0.5          # pixel-centre coordinates
    xs = x0 + u * (x1 - x0) - 0.5
    yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
    return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., c], [yy, xx], order=1,
                                                         mode="nearest")
                      for c in range(img.shape[-1])], -1)
  return jax.vmap(jax.vmap(one, (None, 0)), (0, 0))(x, jnp.asarray(boxes, jnp.float32))


class AttributeProbe(nnx.Module):
  """Crop -> (colour logits (NUM_COLOURS+1), identity logits (NUM_IDENTITIES+1)); last = none."""

  def __init__(self, width: int = 32, *, rngs: nnx.Rngs):
    self.c1 = layers.Conv(3, width, 3, padding=1, rngs=rngs)
    self.c2 = layers.Conv(width, 2 * width, 3, stride=2, padding=1, rngs=rngs)
    self.c3 = layers.Conv(2 * width, 2 * width, 3, stride=2, padding=1, rngs=rngs)
    self.colour = layers.Dense(2 * width, NUM_COLOURS + 1, rngs=rngs, axes=(None, None))
    self.identity = layers.Dense(2 * width, NUM_IDENTITIES + 1, rngs=rngs, axes=(None, None))

  def __call__(self, crops):
    h = jax.nn.relu(self.c1(_signed(crops)))
    h = jax.nn.relu(self.c2(h))
    h = jax.nn.relu(self.c3(h)).mean((1, 2))
    return self.colour(h), self.identity(h)


class LayoutProbe(nnx.Module):
  """Image -> (grid, grid, NUM_IDENTITIES+1) logits; class 0 = background.

  A patch embedding to the grid, then 3x3 convolutions (the second dilated)
  for context, all at grid resolution (cheap on CPU).
  """

  def __init__(self, image_size: int, grid: int, width: int = 32, *, rngs: nnx.Rngs):
    if image_size % grid:
      raise ValueError(f"image size {image_size} not divisible into a {grid} grid")
    f = image_size // grid
    self.embed = layers.Conv(3, 2 * width, f, stride=f, rngs=rngs)
    self.c1 = layers.Conv(2 * width, 2 * width, 3, padding=1, rngs=rngs)
    self.c2 = layers.Conv(2 * width, 2 * width, 3, padding=2, rngs=rngs)   # dilated below
    self.c3 = layers.Conv(2 * width, 2 * width, 3, padding=1, rngs=rngs)
    self.out = layers.Conv(2 * width, NUM_IDENTITIES + 1, 1, rngs=rngs)

  def __call__(self, images):
    h = jax.nn.relu(self.embed(_signed(images)))
    h = jax.nn.relu(self.c1(h))
    h = jax.nn.relu(_dilated(self.c2, h))
    h = jax.nn.relu(self.c3(h))
    return self.out(h)


def _dilated(conv: layers.Conv, x):
  y = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), ((2, 2), (2, 2)),
                                   rhs_dilation=(2, 2),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + conv.bias[...]


@dataclasses.dataclass
class Probes:
  attribute: AttributeProbe
  layout: LayoutProbe
  crop: int
  grid: int
  accuracy: dict

  # -- inference --------------------------------------------------------------------------
  def attributes(self, images, boxes, batch: int = 256):
    """Predicted (colour, identity) of each box crop: (B, K) ints each; -1 = none."""
    fn = _jitted(self.attribute, "attr", lambda m, im, bx: m(
        crop_boxes(im, bx, self.crop).reshape((-1, self.crop, self.crop, 3))))
    cols, ids = [], []
    images, boxes = np.asarray(images), np.asarray(boxes)
    for i in range(0, len(images), batch):
      c, d = fn(images[i:i + batch], boxes[i:i + batch])
      k = boxes.shape[1]
      cols.append(np.asarray(c).reshape(-1, k, NUM_COLOURS + 1).argmax(-1))
      ids.append(np.asarray(d).reshape(-1, k, NUM_IDENTITIES + 1).argmax(-1))
    col, ident = np.concatenate(cols), np.concatenate(ids)
    return np.where(col == NUM_COLOURS, -1, col), np.where(ident == NUM_IDENTITIES, -1, ident)

  def layout_maps(self, images, batch: int = 256) -> np.ndarray:
    """(B, grid, grid, NUM_IDENTITIES+1) class probabilities."""
    fn = _jitted(self.layout, "layout", lambda m, im: jax.nn.softmax(m(im), -1))
    images = np.asarray(images)
    return np.concatenate([np.asarray(fn(images[i:i + batch]))
                           for i in range(0, len(images), batch)])


_JIT_CACHE: dict = {}


def _jitted(module, name, fn):
  key = (id(module), name)
  if key not in _JIT_CACHE:
    graphdef, state = nnx.split(module)
    f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
    _JIT_CACHE[key] = (module, lambda *a: f(state, *a))
  return _JIT_CACHE[key][1]


# -- scores ---------------------------------------------------------------------------------

def centroids(maps: np.ndarray, identities: np.ndarray, present: float = 0.5):
  """Per (image, object): centre (x, y) in [0, 1] of the identity's probability map, and
  whether the identity is present (max cell probability >= ``present``).

  maps (B, G, G, C) with class k+1 = identity k; identities (B, K) (-1 padding).
  """
  b, g = maps.shape[0], maps.shape[1]
  ids = np.clip(identities, 0, None) + 1
  p = np.take_along_axis(maps, ids[:, None, None, :], axis=-1)       # (B, G, G, K)
  p = np.where(p >= 0.25, p, 0.0) + 1e-6 * (p == p.max((1, 2), keepdims=True))
  pos = (np.arange(g) + 0.5) / g
  mass = p.sum((1, 2)) + 1e-9
  cx = (p * pos[None, None, :, None]).sum((1, 2)) / mass
  cy = (p * pos[None, :, None, None]).sum((1, 2)) / mass
  ok = (p.max((1, 2)) >= present) & (identities >= 0)
  return np.stack([cx, cy], -1), ok


def relation_score(maps: np.ndarray, identities: np.ndarray, relations: np.ndarray
                   ) -> np.ndarray:
  """Fraction of each image's caption relations (object k rel object k+1) that hold.

  A relation holds when both identities are found and the dominant-axis relation
  of their centroids is the captioned one.  Returns (B,).
  """
  centre, ok = centroids(maps, identities)
  scores = np.zeros(len(maps))
  for i in range(len(maps)):
    rels = [r for r in relations[i] if r >= 0]
    hits = []
    for k, r in enumerate(rels):
      if not (ok[i, k] and ok[i, k + 1]):
        hits.append(0.0)
        continue
      a = (*centre[i, k], *centre[i, k])
      b_ = (*centre[i, k + 1], *centre[i, k + 1])
      hits.append(float(scenes_lib.relation(a, b_) == scenes_lib.RELATIONS[r]))
    scores[i] = np.mean(hits) if hits else 1.0
  return scores


# -- training -------------------------------------------------------------------------------

def _cell_labels(arrays: dict, grid: int) -> np.ndarray:
  """Majority class per grid cell: 0 background, identity+1 of the covering object."""
  seg = arrays["segmentation"].astype(np.int64)
  b, s = seg.shape[:2]
  f = s // grid
  ident = np.concatenate([np.full((b, 1), -1), arrays["identity"]], 1)   # seg k -> identity
  cls = np.take_along_axis(ident, seg.reshape(b, -1), 1).reshape(seg.shape) + 1
  onehot = np.eye(NUM_IDENTITIES + 1, dtype=np.float32)[cls]
  return onehot.reshape(b, grid, f, grid, f, -1).mean((2, 4)).argmax(-1)


def _attribute_examples(arrays: dict, rng: np.random.Generator, jitter: float):
  """Object crops (jittered boxes) with labels, plus empty background crops labelled none."""
  n = arrays["num_objects"]
  img_idx, boxes, col, ident = [], [], [], []
  for i in range(len(n)):
    for k in range(int(n[i])):
      box = arrays["boxes"][i, k] + rng.uniform(-jitter, jitter, 4)
      img_idx.append(i), boxes.append(box)
      col.append(arrays["colour"][i, k]), ident.append(arrays["identity"][i, k])
    # one empty crop per image where possible
    for _ in range(20):
      side = rng.uniform(0.2, 0.45)
      x0, y0 = rng.uniform(0, 1 - side, 2)
      box = np.array([x0, y0, x0 + side, y0 + side])
      s = arrays["segmentation"].shape[1]
      sub = arrays["segmentation"][i, int(y0 * s):int(np.ceil((y0 + side) * s)),
                                   int(x0 * s):int(np.ceil((x0 + side) * s))]
      if (sub > 0).mean() < 0.02:
        img_idx.append(i), boxes.append(box), col.append(NUM_COLOURS), ident.append(NUM_IDENTITIES)
        break
  return (np.asarray(img_idx), np.asarray(boxes, np.float32), np.asarray(col, np.int32),
          np.asarray(ident, np.int32))


def train(arrays: dict, *, grid: int, crop: int = 12, steps: int = 400, batch_size: int = 128,
          lr: float = 2e-3, seed: int = 0, holdout: dict | None = None,
          workdir: str) -> Probes:
  """Trains both probes on rendered scenes (``scenes.load_arrays``) with the one
  trainer (checkpoints under ``workdir``); accuracy on ``holdout``."""
  rng = np.random.default_rng(seed)
  s = arrays["image"].shape[1]
  attr = AttributeProbe(rngs=nnx.Rngs(seed))
  idx, boxes, col, ident = _attribute_examples(arrays, rng, jitter=1.0 / s)
  crops = np.asarray(jax.jit(lambda im, bx: crop_boxes(im, bx[:, None], crop)[:, 0])(
      arrays["image"][idx], boxes))

  def attr_loss(m, batch, key):
    c, d = m(batch["crop"])
    return (optax.softmax_cross_entropy_with_integer_labels(c, batch["colour"]).mean()
            + optax.softmax_cross_entropy_with_integer_labels(d, batch["identity"]).mean())
  settings = {"grid": grid, "crop": crop, "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": seed, "num_images": int(len(arrays["image"]))}
  module_fit.fit(attr, attr_loss, {"crop": crops, "colour": col, "identity": ident},
                 workdir=os.path.join(workdir, "attribute"), name="attribute probe",
                 steps=steps, batch_size=batch_size, tx=optax.adam(lr), seed=seed,
                 meta=settings)

  lay = LayoutProbe(s, grid, rngs=nnx.Rngs(seed + 1))
  labels = _cell_labels(arrays, grid)

  def layout_loss(m, batch, key):
    return optax.softmax_cross_entropy_with_integer_labels(
        m(batch["image"]), batch["cells"]).mean()
  module_fit.fit(lay, layout_loss, {"image": arrays["image"], "cells": labels},
                 workdir=os.path.join(workdir, "layout"), name="layout probe", steps=steps,
                 batch_size=batch_size, tx=optax.adam(lr), seed=seed + 1, meta=settings)
  probes = Probes(attr, lay, crop, grid, {})
  if holdout is not None:
    probes.accuracy = accuracy(probes, holdout)
  return probes


def accuracy(probes: Probes, arrays: dict) -> dict:
  """Probe accuracy on real scenes (what the generated-image scores can be trusted to)."""
  col, ident = probes.attributes(arrays["image"], arrays["boxes"])
  valid = arrays["identity"] >= 0
  rel = relation_score(probes.layout_maps(arrays["image"]), arrays["identity"],
                       arrays["relation"])
  return {"colour": float((col == arrays["colour"])[valid].mean()),
          "identity": float((ident == arrays["identity"])[valid].mean()),
          "relations": float(rel.mean())}


# -- persistence ----------------------------------------------------------------------------

def save(probes: Probes, path: str) -> None:
  flat = {}
  for name, m in (("attribute", probes.attribute), ("layout", probes.layout)):
    for k, v in nnx.to_flat_state(nnx.state(m)):
      flat[name + "/" + "/".join(map(str, k))] = np.asarray(v.value)
  flat["meta"] = np.array([probes.crop, probes.grid, probes.attribute.c1.kernel.shape[-1]])
  for k, v in probes.accuracy.items():
    flat["accuracy/" + k] = np.float64(v)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load(path: str, image_size: int) -> Probes:
  with np.load(path) as f:
    crop, grid, width = (int(v) for v in f["meta"])
    attr = AttributeProbe(width, rngs=nnx.Rngs(0))
    lay = LayoutProbe(image_size, grid, width, rngs=nnx.Rngs(0))
    for name, m in (("attribute", attr), ("layout", lay)):
      for k, v in nnx.to_flat_state(nnx.state(m)):
        key = name + "/" + "/".join(map(str, k))
        if key not in f.files:
          raise KeyError(f"{path}: missing {key}")
        v.value = jnp.asarray(f[key])
    acc = {k.split("/", 1)[1]: float(f[k]) for k in f.files if k.startswith("accuracy/")}
  return Probes(attr, lay, crop, grid, acc)
