"""Feature networks for the sample metrics, and sharded feature extraction.

A :class:`FeatureNet` maps uint8 NHWC images to

- ``pool``: (B, D) features for FID and precision/recall,
- ``spatial``: (B, S) flattened spatial features for sFID,
- ``logits``: (B, K) class logits for the Inception Score,

through a pure ``apply(params, images)`` (jitted here, batch sharded over a
1-D ``'data'`` mesh, parameters replicated).  Two exist:

- :func:`inception`: the Flax FID Inception (:mod:`glue_jax.models.inception`).
  ``mode='adm'`` reproduces the ADM evaluator's TF graph on [0, 255] pixels:
  ``(x - 128) / 128``, TF1's legacy bilinear resize to 299, IS logits
  ``pool3 @ W`` without the fc bias.  ``mode='pytorch_fid'`` is
  pytorch-fid's preprocessing (``2 x / 255 - 1``, half-pixel resize) and
  the logits with bias.
- the small CNN of :mod:`glue_jax.eval.digits_classifier`
  (``digits_classifier.load_or_train(path).feature_net()``).

:attr:`FeatureNet.tag` names the feature space; reference statistics carry
it, so statistics of one network are never compared with another's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from glue_jax.models import inception_weights
from glue_jax import sharding

KEYS = ("pool", "spatial", "logits")


@dataclasses.dataclass
class FeatureNet:
  tag: str                                   # e.g. 'inception-adm', 'digits16'
  apply: Callable[[Any, jax.Array], dict]    # pure (params, uint8 NHWC) -> dict
  params: Any
  image_size: int | None = None              # required input size, None: any

  def check_images(self, images, where: str = "images") -> None:
    shape = np.shape(images)
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f"{where}: feature net {self.tag} needs (N, H, W, 3) "
                       f"images, got {shape}")
    if self.image_size is not None and shape[1:3] != (self.image_size,) * 2:
      raise ValueError(f"{where}: feature net {self.tag} needs "
                       f"{self.image_size}x{self.image_size} images, got {shape[1:3]}")


def inception(weights: str | None = None, *, mode: str = "adm", model=None) -> FeatureNet:
  """The FID Inception as a :class:`FeatureNet` (weights file or a model)."""
  if mode not in ("adm", "pytorch_fid"):
    raise ValueError(f"inception mode {mode!r}: 'adm' or 'pytorch_fid'")
  if model is None:
    if not weights:
      raise ValueError("--inception_weights is required for Inception features "
                       "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .npz)")
    model = inception_weights.load_inception(weights)
  graphdef, state = nnx.split(model)

  def apply(params, images):
    net = nnx.merge(graphdef, params)
    x = images.astype(jnp.float32)
    if mode == "adm":
      out = net((x - 128.0) / 128.0, resize="tf1", normalize=False)
      logits = net.logits_without_bias(out["pool3"])
    else:
      out = net(x / 255.0, resize="torch", normalize=True)
      logits = out["logits"]
    spatial = out["spatial"]
    return {"pool": out["pool3"], "spatial": spatial.reshape(spatial.shape[0], -1),
            "logits": logits}
  return FeatureNet(f"inception-{mode}", apply, nnx.to_pure_dict(state), None)


# -------------------------------------------------------------- extraction

class Extractor:
  """Jitted, batch-sharded feature extraction of one :class:`FeatureNet`.

  Args:
    net: the feature network.
    mesh: a 1-D ``'data'`` mesh (default all devices).
    per_device_batch: images per device per call.
  """

  def __init__(self, net: FeatureNet, mesh=None, per_device_batch: int = 64):
    self.net = net
    self.mesh = mesh or sharding.data_mesh()
    self.batch = per_device_batch * self.mesh.size
    self.in_sharding = NamedSharding(self.mesh, P("data"))
    rep = NamedSharding(self.mesh, P())
    self.params = sharding.replicate(net.params, self.mesh)
    self._fn = jax.jit(net.apply, in_shardings=(rep, self.in_sharding),
                       out_shardings=rep)

  def __call__(self, batches: Iterable[np.ndarray], *, progress=None) -> dict:
    """Features of all images in ``batches`` (uint8 NHWC host arrays).

    Every process must pass the same images.  Returns float32 numpy arrays
    ``{'pool', 'spatial', 'logits'}`` (keys the network provides).
    """
    outs: dict[str, list] = {}
    buf, pending = [], None

    def flush(images):
      n = len(images)
      if n < self.batch:
        images = np.concatenate([images, np.zeros((self.batch - n,) + images.shape[1:],
                                                  images.dtype)])
      return self._fn(self.params, sharding.to_global(images, self.in_sharding)), n

    def collect(result):
      out, n = result
      for k, v in out.items():
        outs.setdefault(k, []).append(np.asarray(v[:n], np.float32))
      if progress is not None:
        progress.update(n)

    count = 0
    for images in batches:
      images = np.asarray(images)
      self.net.check_images(images)
      buf.append(images)
      count += len(images)
      while count >= self.batch:
        stacked = np.concatenate(buf)
        head, rest = stacked[:self.batch], stacked[self.batch:]
        buf, count = ([rest] if len(rest) else []), len(rest)
        result = flush(head)           # dispatch before collecting the previous
        if pending is not None:
          collect(pending)
        pending = result
    if count:
      result = flush(np.concatenate(buf))
      if pending is not None:
        collect(pending)
      pending = result
    if pending is not None:
      collect(pending)
    if not outs:
      raise ValueError("feature extraction: no images")
    return {k: np.concatenate(v) for k, v in outs.items()}


def batches_of(images: np.ndarray, size: int = 256) -> Iterable[np.ndarray]:
  for i in range(0, len(images), size):
    yield images[i:i + size]
