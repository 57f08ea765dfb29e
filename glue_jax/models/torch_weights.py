"""Reading upstream PyTorch weights and mapping them onto NNX parameters.

Only :func:`read_state_dict` may import torch (for ``.pt``/``.pth`` files),
lazily; everything else is numpy.  A *mapping* is a dict from our flat
parameter path (``'blocks/attn/qkv/kernel'``) to an array already converted to
our layout.  :func:`load_into` checks a mapping against a module's parameters
and fails with a message that lists every missing, unexpected and
mis-shaped key.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import nnx


class WeightsError(ValueError):
  """Raised when upstream weights do not fit the network."""


def read_state_dict(path: str, *, prefer: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Reads a state dict into float32/int numpy arrays.

  Supports ``.safetensors`` (no torch), ``.npz`` and torch pickles
  (``.pt``/``.pth``/``.bin``; torch imported lazily, ``weights_only=True``).
  If the file holds a dict of state dicts (e.g. official training checkpoints
  ``{'model', 'ema', 'opt', ...}``) the first key of ``prefer`` present is used.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return {k: np.asarray(v) for k, v in load_file(path).items()}
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"reading {path} needs torch (pip install torch); "
                      "convert once with glue_jax.tools.convert_weights") from e
  if not zipfile.is_zipfile(path) and not path.endswith((".pt", ".pth", ".bin")):
    raise WeightsError(f"{path}: unknown weights format")
  obj = torch.load(path, map_location="cpu", weights_only=True)
  return unwrap_state_dict(obj, prefer=prefer, where=path)


def unwrap_state_dict(obj: Any, *, prefer: Iterable[str] = (), where: str = "") -> dict:
  """Picks the state dict out of a checkpoint object and converts to numpy."""
  prefer = tuple(prefer)
  if isinstance(obj, Mapping):
    for k in prefer:
      if k in obj and isinstance(obj[k], Mapping):
        obj = obj[k]
        break
    else:
      nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
      tensors = [k for k, v in obj.items() if hasattr(v, "shape")]
      if not tensors and nested:
        raise WeightsError(
            f"{where}: checkpoint holds {sorted(obj)}; none of {list(prefer)} "
            "names a state dict")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu()
      if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
        v = v.float()
      v = v.numpy()
    if isinstance(v, np.ndarray):
      out[k] = v
  return out


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> kernel (in, out)."""
  return np.ascontiguousarray(np.asarray(w).T)


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kh, kw) -> HWIO."""
  return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def flat_params(module: nnx.Module, filt=nnx.Param) -> dict[str, Any]:
  """``{'a/b/kernel': Variable}`` for every variable of ``module``."""
  flat = {}
  for path, var in nnx.to_flat_state(nnx.state(module, filt)):
    flat["/".join(str(p) for p in path)] = var
  return flat


def load_into(module: nnx.Module, mapping: Mapping[str, np.ndarray], *,
              where: str = "weights", filt=nnx.Param,
              allow_missing: Iterable[str] = ()) -> None:
  """Writes ``mapping`` into the module's variables after checking it.

  Raises WeightsError listing every missing, unexpected and mis-shaped key.
  """
  flat = flat_params(module, filt)
  allow_missing = set(allow_missing)
  want = {k: tuple(v.shape) for k, v in flat.items()
          if k in mapping or k not in allow_missing}
  check_shapes(want, mapping, where=where, what="the network")
  for k, arr in mapping.items():
    var = flat[k]
    var.value = jax.numpy.asarray(arr, dtype=var.value.dtype)


def check_shapes(want: Mapping[str, tuple], mapping: Mapping[str, Any], *, where: str,
                 what: str = "the network", name=lambda k: k) -> None:
  """Raises WeightsError listing every missing, unexpected and mis-shaped key.

  ``want`` maps our flat paths to shapes; ``name`` renders a path in the
  message (e.g. as the upstream key).
  """
  missing = sorted(name(k) for k in set(want) - set(mapping))
  unexpected = sorted(set(mapping) - set(want))
  bad = sorted(f"{name(k)}: got {tuple(np.shape(mapping[k]))}, expected {tuple(want[k])}"
               for k in set(want) & set(mapping)
               if tuple(np.shape(mapping[k])) != tuple(want[k]))
  if missing or unexpected or bad:
    lines = [f"{where} do not fit {what}:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if bad:
      lines.append(f"  mis-shaped ({len(bad)}): " + "; ".join(bad))
    raise WeightsError("\n".join(lines))


def check_consumed(sd: Mapping[str, Any], used: Iterable[str], *, where: str,
                   ignore: Iterable[str] = ()) -> None:
  """Fails if upstream keys were neither used nor explicitly ignored."""
  used, ignore = set(used), tuple(ignore)
  left = sorted(k for k in sd if k not in used and not k.startswith(ignore))
  if left:
    raise WeightsError(f"{where}: unexpected upstream keys ({len(left)}): "
                       + ", ".join(left))


def require(sd: Mapping[str, Any], keys: Iterable[str], *, where: str) -> None:
  """Fails listing every upstream key that a mapping needs but is absent."""
  missing = sorted(k for k in keys if k not in sd)
  if missing:
    raise WeightsError(f"{where}: missing upstream keys ({len(missing)}): "
                       + ", ".join(missing))
