"""Weights of the FID Inception v3 (:mod:`glue_jax.models.inception`).

:func:`load_inception` reads pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (a state dict of the patched
torchvision ``Inception3``, ``fc`` included; needs torch) or an ``.npz`` (our
flat paths as written by :func:`save_npz`, or the upstream keys), read
without torch.  Upstream keys map mechanically:

  X.conv.weight (O, I, kh, kw)                  -> X/conv/kernel (HWIO)
  X.bn.{weight, bias, running_mean, running_var} -> X/bn/{scale, bias, mean, var}
  fc.weight (1008, 2048), fc.bias               -> fc/kernel (2048, 1008), fc/bias
  *.num_batches_tracked                         -> ignored

Nothing is downloaded unless :func:`download_fid_weights` is called.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models import torch_weights
from glue_jax.models.inception import FIDInception
from glue_jax.models.torch_weights import (
    WeightsError, check_consumed, conv, flat_params, linear, read_state_dict)

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean",
       "running_var": "var"}


def _variables(module: nnx.Module) -> dict:
  return flat_params(module, (nnx.Param, nnx.BatchStat))


def inception_mapping(sd: Mapping[str, np.ndarray], *,
                      where: str = "weights") -> dict[str, np.ndarray]:
  """pytorch-fid FID Inception state dict -> ``{our flat path: array}``.

  ``X.conv.weight`` -> ``X/conv/kernel`` (HWIO); ``X.bn.{weight, bias,
  running_mean, running_var}`` -> ``X/bn/{scale, bias, mean, var}``;
  ``fc.{weight, bias}`` -> ``fc/{kernel, bias}``.  ``num_batches_tracked``
  is ignored; any other key is an error.
  """
  if any(k.startswith("blocks.") for k in sd):
    raise WeightsError(
        f"{where}: looks like a pytorch_fid.InceptionV3 wrapper state dict "
        "('blocks.*', no fc); pass the FID weights file "
        "pt_inception-2015-12-05-6726825d.pth (the Inception3 state dict)")
  out, used = {}, []
  for key, value in sd.items():
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
      used.append(key)
      continue
    name = None
    if key == "fc.weight":
      name, value = "fc/kernel", linear(value)
    elif key == "fc.bias":
      name = "fc/bias"
    elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
      name, value = "/".join(parts[:-1]) + "/kernel", conv(value)
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN:
      name = "/".join(parts[:-1]) + "/" + _BN[parts[-1]]
    if name is not None:
      out[name] = np.asarray(value, np.float32)
      used.append(key)
  check_consumed(sd, used, where=where)
  return out


def torch_key(path: str) -> str:
  """Our flat path -> the pytorch-fid state dict key it is loaded from."""
  parts = path.split("/")
  if parts[0] == "fc":
    return "fc." + {"kernel": "weight", "bias": "bias"}[parts[1]]
  if parts[-1] == "kernel":
    return ".".join(parts[:-1]) + ".weight"
  inverse = {v: k for k, v in _BN.items()}
  return ".".join(parts[:-1]) + "." + inverse[parts[-1]]


def _is_ours(sd: Mapping[str, np.ndarray]) -> bool:
  return any("/" in k for k in sd)


@functools.lru_cache(maxsize=4)
def _skeleton(dtype_name: str):
  """``(graphdef, abstract state)`` of the network, traced once per dtype."""
  dtype = jnp.dtype(dtype_name)
  return nnx.split(nnx.eval_shape(
      lambda: FIDInception(rngs=nnx.Rngs(0), dtype=dtype)))


def expected_shapes(dtype=jnp.float32) -> dict[str, tuple[int, ...]]:
  """``{our flat path: shape}`` of every parameter and BatchNorm statistic."""
  _, state = _skeleton(jnp.dtype(dtype).name)
  return {"/".join(str(p) for p in path): tuple(var.shape)
          for path, var in nnx.to_flat_state(state)}


def _check(mapping: Mapping[str, np.ndarray], *, where: str,
           upstream: bool) -> None:
  """Lists every missing, unexpected and mis-shaped entry of ``mapping``."""
  torch_weights.check_shapes(expected_shapes(), mapping, where=where,
                             what="the FID Inception",
                             name=torch_key if upstream else (lambda k: k))


def _assemble(mapping: Mapping[str, np.ndarray], dtype) -> FIDInception:
  """A fresh module whose variables hold ``mapping`` (checked beforehand)."""
  graphdef, state = _skeleton(jnp.dtype(dtype).name)
  flat = [(path, var.replace(jnp.asarray(
              mapping["/".join(str(p) for p in path)], jnp.float32)))
          for path, var in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_inception(path: str, *, dtype=jnp.float32) -> FIDInception:
  """Builds :class:`FIDInception` with the weights in ``path``.

  Args:
    path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (needs
      torch), or an ``.npz`` holding either that state dict's keys or our flat
      paths (as written by :func:`save_npz`; read without torch).
    dtype: compute dtype.

  Raises:
    FileNotFoundError: ``path`` does not exist (nothing is downloaded).
    WeightsError: keys are missing, unexpected or mis-shaped (all listed,
      by their upstream names for a pytorch-fid state dict).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights not found: {path}. Pass the pytorch-fid FID weights "
        f"file (get it once from {FID_WEIGHTS_URL}, or call "
        "download_fid_weights(dest)); nothing is downloaded automatically.")
  sd = read_state_dict(path)
  ours = _is_ours(sd)
  mapping = ({k: np.asarray(v, np.float32) for k, v in sd.items()} if ours
             else inception_mapping(sd, where=path))
  _check(mapping, where=path, upstream=not ours)
  return _assemble(mapping, dtype)


def random_inception(seed: int = 0, *, dtype=jnp.float32) -> FIDInception:
  """A randomly initialised :class:`FIDInception`, drawn with numpy.

  (Eager construction with ``rngs`` compiles one random op per parameter
  shape: about a minute on a small CPU.)  Convolutions are He-normal, ``fc``
  N(0, 0.01), BatchNorm scale U(0.8, 1.2), bias and running mean N(0, 0.1),
  running variance U(0.5, 1.5).  For tests and benchmarks.
  """
  rng = np.random.default_rng(seed)
  mapping = {}
  for path, shape in expected_shapes(dtype).items():
    leaf = path.rsplit("/", 1)[-1]
    if path == "fc/kernel":
      value = rng.normal(0, 0.01, shape)
    elif leaf == "kernel":
      value = rng.normal(0, math.sqrt(2.0 / np.prod(shape[:3])), shape)
    elif leaf == "scale":
      value = rng.uniform(0.8, 1.2, shape)
    elif leaf == "var":
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BN bias / running mean, fc bias
      value = rng.normal(0, 0.1, shape)
    mapping[path] = value.astype(np.float32)
  return _assemble(mapping, dtype)


def save_npz(model: FIDInception, path: str) -> None:
  """Writes every parameter and BatchNorm statistic under our flat paths."""
  arrays = {k: np.asarray(v[...]) for k, v in _variables(model).items()}
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def download_fid_weights(dest: str, *, url: str = FID_WEIGHTS_URL,
                         timeout: float = 30.0) -> str:
  """Explicitly downloads pytorch-fid's FID weights to ``dest`` (a file path).

  Checks the sha256 prefix encoded in the file name.  Raises RuntimeError
  with the URL and manual instructions when offline.
  """
  import urllib.error
  import urllib.request
  if os.path.exists(dest):
    return dest
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      data = r.read()
  except (urllib.error.URLError, OSError) as e:
    raise RuntimeError(
        f"could not download the FID Inception weights from {url} ({e}). "
        f"Download the file elsewhere and pass its path to load_inception().") from e
  digest = hashlib.sha256(data).hexdigest()
  if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
    raise RuntimeError(f"{url}: sha256 {digest[:16]}... does not start with "
                       f"{FID_WEIGHTS_SHA256_PREFIX}; refusing to save it")
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  tmp = dest + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, dest)
  return dest
