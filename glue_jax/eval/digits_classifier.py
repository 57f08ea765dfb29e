"""A small CNN digit classifier: the feature network of the digits benchmark.

The digits demo and convergence benchmark measure sample quality the way
ImageNet runs use Inception, with a network trained on the digits *train*
split (``glue_jax.data.digits``) independently of the demo's semantic
encoder (so the metric does not reward copying the encoder):

  16x16x3 uint8 -> [conv3x3 32, ReLU] -> [conv3x3/2 32, ReLU]   (8x8)
                -> [conv3x3 64, ReLU] -> [conv3x3/2 64, ReLU]   (4x4)  -> spatial
                -> mean pool -> Dense 64, ReLU                          -> features
                -> Dense 10                                             -> logits

``features`` (penultimate, 64-d) serve FID and precision/recall, ``logits``
the Inception Score and class accuracy, ``spatial`` (the first 8 channels of
the last 4x4 map, 128-d) the sFID analogue.

:func:`load_or_train` trains once (AdamW, random shifts of up to 1/8 of the
size) and caches the weights at a file path; later calls load them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glue_jax.data import digits
from glue_jax.eval import features
from glue_jax.models import layers
from glue_jax.train import module_fit

FORMAT_VERSION = 1
NUM_CLASSES = 10
SPATIAL_CHANNELS = 8


class DigitsCNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs, num_classes: int = NUM_CLASSES,
               width: int = 32, feature_dim: int = 64):
    he = nnx.initializers.he_normal()
    conv = lambda i, o, s: layers.Conv(i, o, 3, rngs=rngs, stride=s, padding=1,
                                       kernel_init=he)
    self.conv1 = conv(3, width, 1)
    self.conv2 = conv(width, width, 2)
    self.conv3 = conv(width, 2 * width, 1)
    self.conv4 = conv(2 * width, 2 * width, 2)
    self.fc = layers.Dense(2 * width, feature_dim, rngs=rngs, axes=(None, None),
                           kernel_init=he)
    self.head = layers.Dense(feature_dim, num_classes, rngs=rngs, axes=(None, None))

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
      x = jax.nn.relu(conv(x))
    features = jax.nn.relu(self.fc(x.mean(axis=(1, 2))))
    spatial = x[..., :SPATIAL_CHANNELS]
    return {"pool": features, "logits": self.head(features),
            "spatial": spatial.reshape(spatial.shape[0], -1)}


@functools.lru_cache(maxsize=2)
def _graphdef():
  return nnx.graphdef(nnx.eval_shape(lambda: DigitsCNN(rngs=nnx.Rngs(0))))


def _apply(params, images):
  return nnx.merge(_graphdef(), params)(images)


_apply_jit = jax.jit(_apply)


@dataclasses.dataclass
class DigitsClassifier:
  """Trained weights plus batched, jitted feature and logit functions."""
  params: dict
  image_size: int
  meta: dict

  def _run(self, images, key: str, batch: int = 256) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"digits classifier: images must be (N, {self.image_size}, "
                       f"{self.image_size}, 3), got {images.shape}")
    if images.dtype != np.uint8:
      raise TypeError(f"digits classifier: images must be uint8, got {images.dtype}")
    outs = []
    for i in range(0, len(images), batch):
      chunk = images[i:i + batch]
      n = len(chunk)
      if n < batch:                                  # one compiled shape
        chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], np.uint8)])
      outs.append(np.asarray(_apply_jit(self.params, chunk)[key])[:n])
    return np.concatenate(outs)

  def features(self, images_uint8) -> np.ndarray:
    """Penultimate features (N, 64), float32."""
    return self._run(images_uint8, "pool")

  def logits(self, images_uint8) -> np.ndarray:
    """Class logits (N, 10)."""
    return self._run(images_uint8, "logits")

  def spatial(self, images_uint8) -> np.ndarray:
    """Flattened spatial features (N, 128)."""
    return self._run(images_uint8, "spatial")

  def accuracy(self, images, labels) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    labels = np.asarray(labels)
    return float((self.logits(images).argmax(-1) == labels).mean())

  def feature_net(self):
    """This classifier as a :class:`glue_jax.eval.features.FeatureNet`."""
    return features.FeatureNet(f"digits{self.image_size}-cnn-seed{self.meta['seed']}",
                               _apply, self.params, self.image_size)


def _save(path: str, params: dict, meta: dict) -> None:
  flat = {"/".join(str(getattr(p, "key", p)) for p in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, __meta__=np.asarray(json.dumps(meta, sort_keys=True)), **flat)
  os.replace(tmp, path)


def _load(path: str) -> tuple[dict, dict]:
  template = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: DigitsCNN(rngs=nnx.Rngs(0)))))
  with np.load(path) as f:
    if "__meta__" not in f.files:
      raise ValueError(f"{path}: not a digits classifier file (no __meta__)")
    meta = json.loads(str(f["__meta__"]))
    flat = {k: f[k] for k in f.files if k != "__meta__"}

  def take(kp, leaf):
    key = "/".join(str(getattr(p, "key", p)) for p in kp)
    if key not in flat:
      raise ValueError(f"{path}: missing weight {key!r}")
    if flat[key].shape != tuple(leaf.shape):
      raise ValueError(f"{path}: {key} has shape {flat[key].shape}, want {leaf.shape}")
    return jnp.asarray(flat[key])
  return jax.tree_util.tree_map_with_path(take, template), meta


def train(image_size: int = 16, seed: int = 0, *, steps: int = 500,
          batch_size: int = 128, lr: float = 2e-3,
          weight_decay: float = 1e-2, workdir: str) -> DigitsClassifier:
  """Trains on the digits train split with the one trainer (checkpoints in
  ``workdir``, so an interrupted training resumes); returns the classifier
  (not saved)."""
  data = digits.load("train", image_size)
  graphdef = _graphdef()
  state = jax.jit(lambda: nnx.state(DigitsCNN(rngs=nnx.Rngs(seed))))()
  module = nnx.merge(graphdef, state)

  max_shift = max(image_size // 8, 1)

  def loss_fn(m, batch, key):
    # Random shifts of up to 1/8 of the size (digits are centred; samples may not be).
    shift = jax.random.randint(key, (2,), -max_shift, max_shift + 1)
    x = jnp.roll(batch["image"], (shift[0], shift[1]), axis=(1, 2))
    logits = m(x)["logits"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  sched = optax.cosine_decay_schedule(lr, steps, alpha=0.05)
  settings = {"image_size": image_size, "seed": seed, "steps": steps, "batch_size": batch_size,
              "lr": lr, "weight_decay": weight_decay}
  module_fit.fit(module, loss_fn, {"image": data["image"], "label": data["label"]},
                 workdir=workdir, name="digits classifier", steps=steps,
                 batch_size=batch_size, tx=optax.adamw(sched, weight_decay=weight_decay),
                 seed=seed, log_every=max(steps // 4, 1), meta=settings)
  params = nnx.to_pure_dict(nnx.state(module))
  clf = DigitsClassifier(params, image_size, {})
  test = digits.load("test", image_size)
  clf.meta = {"version": FORMAT_VERSION, "image_size": image_size, "seed": seed,
              "steps": steps, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay,
              "train_accuracy": clf.accuracy(data["image"], data["label"]),
              "test_accuracy": clf.accuracy(test["image"], test["label"])}
  return clf


def load_or_train(path: str, image_size: int = 16, seed: int = 0, *,
                  steps: int = 500, **train_kwargs) -> DigitsClassifier:
  """Loads the classifier cached at ``path``, training and saving it if absent.

  ``steps`` and ``train_kwargs`` (``batch_size``, ``lr``, ``weight_decay``)
  only matter when training; a cached file is used whatever they are.

  Raises:
    ValueError: ``path`` holds a classifier for another image size, seed or
      format (named in the message).
  """
  if os.path.exists(path):
    params, meta = _load(path)
    want = {"version": FORMAT_VERSION, "image_size": image_size, "seed": seed}
    bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if bad:
      raise ValueError(f"{path}: cached digits classifier does not match "
                       f"(stored, wanted): {bad}; delete it or pass another path")
    return DigitsClassifier(params, image_size, meta)
  clf = train(image_size, seed, steps=steps, workdir=path + ".run", **train_kwargs)
  _save(path, clf.params, clf.meta)
  return clf
