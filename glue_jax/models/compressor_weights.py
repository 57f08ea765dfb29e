"""Official REGLUE compressor checkpoints (``compression_model.pth``) -> NNX.

The official ``EncoderDecoder`` keeps each direction in an ``nn.Sequential``:
``{encoder,decoder}.model.<i>`` is a Conv2d (``weight``, ``bias``) or a
ResidualBlock (``conv1``, ``bn1``, ``conv2``, ``bn2``; BatchNorm ``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``).  The
training script saves the DDP model, so keys may carry a ``module.`` prefix.
The channel list is read off the conv shapes.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from glue_jax.models import compressor as compressor_lib
from glue_jax.models import torch_weights as tw

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _strip(sd: dict) -> dict:
  return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def infer_config(sd: dict, *, where: str = "compressor weights") -> compressor_lib.CompressorConfig:
  """Channel list (and the KL variant) from the conv shapes of a state dict."""
  sd = _strip(sd)
  convs = {}
  for k, v in sd.items():
    m = re.fullmatch(r"(encoder|decoder)\.model\.(\d+)\.weight", k)
    if m and np.ndim(v) == 4:
      convs[(m.group(1), int(m.group(2)))] = np.shape(v)
  enc = [convs[k] for k in sorted(k for k in convs if k[0] == "encoder")]
  dec = [convs[k] for k in sorted(k for k in convs if k[0] == "decoder")]
  if not enc or not dec:
    raise tw.WeightsError(f"{where}: no encoder.model.<i>.weight / decoder.model.<i>.weight "
                          f"convs; keys start {sorted(sd)[:5]}")
  channels = [enc[0][1]] + [s[0] for s in enc]
  dec_in = dec[0][1]
  variational = channels[-1] == 2 * dec_in and channels[-1] != dec_in
  if variational:
    channels[-1] = dec_in
  return compressor_lib.CompressorConfig(channels=tuple(channels), variational=variational)


def mapping(sd: dict, cfg: compressor_lib.CompressorConfig, *,
            where: str = "compressor weights") -> tuple[dict, dict]:
  """``(params, batch_stats)`` flat mappings in our layout."""
  sd = _strip(sd)
  params, stats, used = {}, {}, set()

  def take(key):
    used.add(key)
    return sd[key]

  n_layers = 2 * (len(cfg.channels) - 1) - 1
  needed = []
  for side in ("encoder", "decoder"):
    for i in range(n_layers):
      if i % 2 == 0:
        needed += [f"{side}.model.{i}.weight", f"{side}.model.{i}.bias"]
      else:
        for c in ("conv1", "conv2"):
          needed += [f"{side}.model.{i}.{c}.weight", f"{side}.model.{i}.{c}.bias"]
        for b in ("bn1", "bn2"):
          needed += [f"{side}.model.{i}.{b}.{n}" for n in _BN]
  tw.require(sd, needed, where=where)
  for side in ("encoder", "decoder"):
    for i in range(n_layers):
      src, dst = f"{side}.model.{i}", f"{side}/layers/{i}"
      if i % 2 == 0:
        params[f"{dst}/kernel"] = tw.conv(take(f"{src}.weight"))
        params[f"{dst}/bias"] = np.asarray(take(f"{src}.bias"))
        continue
      for c in ("conv1", "conv2"):
        params[f"{dst}/{c}/kernel"] = tw.conv(take(f"{src}.{c}.weight"))
        params[f"{dst}/{c}/bias"] = np.asarray(take(f"{src}.{c}.bias"))
      for b in ("bn1", "bn2"):
        for theirs, ours in _BN.items():
          target = stats if ours in ("mean", "var") else params
          target[f"{dst}/{b}/{ours}"] = np.asarray(take(f"{src}.{b}.{theirs}"))
  tw.check_consumed(sd, used, where=where, ignore=())
  return params, stats


def _consumed_ignoring_counters(sd: dict) -> dict:
  return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def from_state_dict(sd: dict, *, where: str = "compressor weights",
                    cfg: compressor_lib.CompressorConfig | None = None
                    ) -> compressor_lib.Compressor:
  """A Compressor holding the weights and running statistics of ``sd``."""
  sd = _consumed_ignoring_counters(_strip(sd))
  cfg = cfg or infer_config(sd, where=where)
  model = nnx.eval_shape(lambda: compressor_lib.Compressor(cfg, rngs=nnx.Rngs(0)))
  params, stats = mapping(sd, cfg, where=where)
  _fill(model, params, nnx.Param, where)
  _fill(model, stats, nnx.BatchStat, where)
  return model


def _fill(model, mapping_, filt, where):
  flat = tw.flat_params(model, filt)
  tw.check_shapes({k: tuple(v.shape) for k, v in flat.items()}, mapping_, where=where)
  for k, arr in mapping_.items():
    flat[k].value = jax.numpy.asarray(arr, dtype=np.float32)


def load_compressor(path: str) -> compressor_lib.Compressor:
  """Official ``.pth`` (torch) / ``.safetensors`` / ``.npz`` of the official keys,
  or an ``.npz`` in our layout (``writers.save_module``, e.g. from
  ``compressor_train``); the channel list is read off the kernel shapes."""
  sd = tw.read_state_dict(path, prefer=("model", "state_dict"))
  if "encoder/layers/0/kernel" not in sd:
    return from_state_dict(sd, where=path)
  enc = sorted((int(k.split("/")[2]), v.shape) for k, v in sd.items()
               if re.fullmatch(r"encoder/layers/\d+/kernel", k))
  dec_in = sd["decoder/layers/0/kernel"].shape[2]
  channels = [enc[0][1][2]] + [s[3] for _, s in enc]
  variational = channels[-1] == 2 * dec_in
  if variational:
    channels[-1] = dec_in
  cfg = compressor_lib.CompressorConfig(channels=tuple(channels), variational=variational)
  model = nnx.eval_shape(lambda: compressor_lib.Compressor(cfg, rngs=nnx.Rngs(0)))
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model))}
  tw.check_shapes({k: tuple(v.value.shape) for k, v in flat.items()}, sd, where=path)
  for k, v in flat.items():
    v.value = jax.numpy.asarray(sd[k], np.float32)
  return model
