"""Loading and saving weights of :class:`glue_jax.models.vae.AutoencoderKL`.

Accepted sources (:func:`load_vae`):

- a diffusers directory as written by ``AutoencoderKL.save_pretrained``
  (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``), or a
  pipeline directory with such a ``vae/`` sub-folder;
- a single diffusers-keyed state dict (``.safetensors``, ``.bin``, ``.pth``,
  ``.pt`` or ``.npz``) plus a config (default: SD's VAE config);
- our own ``.npz`` written by :func:`save_npz` (config included; no torch).

Both attention key layouts are accepted: the current
``mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}`` and the legacy
``{query,key,value,proj_attn}`` found in the released
``stabilityai/sd-vae-ft-{mse,ema}`` files; projection weights may be stored
as ``(C, C)`` linear or ``(C, C, 1, 1)`` 1x1-conv tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import socket
from typing import Any, Mapping

import numpy as np
from flax import nnx

from glue_jax.models import torch_weights as tw
from glue_jax.models.vae import AutoencoderKL, VAEConfig

_CONFIG_KEY = "__vae_config__"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.fp16.bin")
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
DEFAULT_HUB_NAME = "stabilityai/sd-vae-ft-mse"


def rename_legacy_attention(sd: Mapping[str, np.ndarray], *, where: str = "weights"
                            ) -> dict[str, np.ndarray]:
  """Maps ``attentions.N.{query,key,value,proj_attn}`` to current names."""
  out = {}
  for k, v in sd.items():
    m = _LEGACY_RE.match(k)
    new = f"{m[1]}.{_LEGACY[m[2]]}.{m[3]}" if m else k
    if new in out or (m and new in sd):
      raise tw.WeightsError(f"{where}: both {k!r} and its current name {new!r} present")
    out[new] = v
  return out


def _torch_key(path: str) -> str:
  """Our flat path -> diffusers state-dict key."""
  *mods, leaf = path.split("/")
  mods = ["to_out.0" if m == "to_out" else m for m in mods]
  return ".".join(mods + ["weight" if leaf in ("kernel", "scale") else leaf])


def _convert(key: str, w: np.ndarray, ndim: int, where: str) -> np.ndarray:
  w = np.asarray(w)
  if ndim == 4 and w.ndim == 4:
    return tw.conv(w)
  if ndim == 2 and w.ndim == 2:
    return tw.linear(w)
  if ndim == 2 and w.ndim == 4 and w.shape[2:] == (1, 1):
    return tw.linear(w[:, :, 0, 0])  # attention stored as a 1x1 conv
  if ndim == 1 and w.ndim == 1:
    return w
  raise tw.WeightsError(f"{where}: {key} has shape {w.shape}, which cannot map "
                        f"to a {ndim}-d parameter")


def mapping_from_diffusers(model: AutoencoderKL, sd: Mapping[str, np.ndarray], *,
                           where: str = "weights") -> dict[str, np.ndarray]:
  """``{our path: array}`` from a diffusers ``AutoencoderKL`` state dict.

  Raises:
    WeightsError: naming every missing or unexpected upstream key.
  """
  if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd):
    raise tw.WeightsError(
        f"{where}: keys use the original CompVis/LDM layout (encoder.down.N.block...); "
        "convert once with diffusers: AutoencoderKL.from_single_file(path)"
        ".save_pretrained(dir), then load dir")
  sd = rename_legacy_attention(sd, where=where)
  flat = tw.flat_params(model)
  keys = {path: _torch_key(path) for path in flat}
  tw.require(sd, keys.values(), where=where)
  tw.check_consumed(sd, keys.values(), where=where)
  return {path: _convert(k, sd[k], len(flat[path].shape), where)
          for path, k in keys.items()}


@functools.lru_cache(maxsize=8)
def _abstract_split(cfg: VAEConfig) -> tuple[Any, Any]:
  return nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))


def _abstract_model(cfg: VAEConfig) -> AutoencoderKL:
  """A fresh model with shape-only parameters (filled in by ``load_into``).

  Tracing the initialisers costs seconds, so the structure is cached per
  config; ``copy=True`` gives every model its own variables.
  """
  graphdef, state = _abstract_split(cfg)
  return nnx.merge(graphdef, state, copy=True)


def _read_config(config: Any) -> VAEConfig:
  if config is None:
    return VAEConfig()
  if isinstance(config, VAEConfig):
    return config
  if isinstance(config, (str, os.PathLike)):
    with open(config) as f:
      config = json.load(f)
  if isinstance(config, Mapping):
    return VAEConfig.from_diffusers(config)
  raise TypeError(f"config must be a VAEConfig, dict or config.json path, got {type(config)}")


def _find_weights(directory: str) -> str:
  for name in _WEIGHT_FILES:
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f"{directory}: no weights file, looked for {list(_WEIGHT_FILES)}")


def _read_own_npz(path: str) -> tuple[VAEConfig, dict[str, np.ndarray]] | None:
  with np.load(path) as f:
    if _CONFIG_KEY not in f.files:
      return None
    cfg = VAEConfig.from_diffusers(json.loads(str(f[_CONFIG_KEY])))
    return cfg, {k: f[k] for k in f.files if k != _CONFIG_KEY}


def load_vae(path: str, config: Any = None, *, dtype: Any = None) -> AutoencoderKL:
  """Builds an :class:`AutoencoderKL` from weights on disk.

  Args:
    path: a diffusers directory (or pipeline directory with ``vae/``), a
      state-dict file, or an ``.npz`` from :func:`save_npz`.
    config: a :class:`VAEConfig`, diffusers config dict, or ``config.json``
      path.  Overrides a directory's ``config.json``; for a bare state dict
      the default is SD's VAE (``VAEConfig()``); ignored for our ``.npz``.
    dtype: compute dtype override (e.g. ``jnp.bfloat16``).

  Raises:
    WeightsError: if keys are missing, unexpected or mis-shaped (all named).
    FileNotFoundError: if ``path`` holds no weights.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(
        os.path.join(path, "vae")):
      path = os.path.join(path, "vae")
    if config is None:
      cfg_path = os.path.join(path, "config.json")
      if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (pass config=...)")
      config = cfg_path
    weights, own = _find_weights(path), None
  else:
    weights = path
    own = _read_own_npz(path) if path.endswith(".npz") and os.path.exists(path) else None
  if own is not None:
    cfg, mapping = own
  else:
    cfg = _read_config(config)
  if dtype is not None:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  model = _abstract_model(cfg)
  if own is None:
    mapping = mapping_from_diffusers(model, tw.read_state_dict(weights), where=weights)
  tw.load_into(model, mapping, where=weights)
  return model


def save_npz(model: AutoencoderKL, path: str) -> None:
  """Writes parameters (our layout) and the config to ``path`` (.npz)."""
  arrays = {k: np.asarray(v.value) for k, v in tw.flat_params(model).items()}
  arrays[_CONFIG_KEY] = np.asarray(json.dumps(model.cfg.to_diffusers()))
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _reachable(host: str, timeout: float) -> bool:
  if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                     "all_proxy")):
    return True  # a proxy decides; huggingface_hub's own timeouts apply
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def from_pretrained_hub(name: str = DEFAULT_HUB_NAME, *, revision: str | None = None,
                        cache_dir: str | None = None, timeout: float = 5.0,
                        dtype: Any = None) -> AutoencoderKL:
  """Downloads (or reuses the cached) diffusers VAE ``name`` and loads it.

  Uses ``huggingface_hub``; a cached copy is used without network access.
  Offline (``HF_HUB_OFFLINE=1`` or ``huggingface.co`` unreachable within
  ``timeout`` seconds) with no cached copy it raises ``RuntimeError``
  promptly instead of hanging.
  """
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("from_pretrained_hub needs huggingface_hub "
                      "(pip install huggingface_hub)") from e
  kw = dict(repo_id=name, revision=revision, cache_dir=cache_dir,
            allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"])
  try:
    directory = snapshot_download(local_files_only=True, **kw)
  except Exception as e:  # noqa: BLE001 - not cached (error type varies by version)
    cached_error = e
  else:
    return load_vae(directory, dtype=dtype)
  hint = (f"could not fetch {name!r} from the Hugging Face Hub and no cached copy "
          "exists; download it elsewhere (huggingface-cli download "
          f"{name}) and call load_vae(<dir>)")
  if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
    raise RuntimeError(f"HF_HUB_OFFLINE is set: {hint}") from cached_error
  if not _reachable("huggingface.co", timeout):
    raise RuntimeError(f"no network (huggingface.co unreachable): {hint}") from cached_error
  try:
    directory = snapshot_download(**kw)
  except Exception as e:  # noqa: BLE001 - re-raised with context
    raise RuntimeError(f"{hint} ({type(e).__name__}: {e})") from e
  return load_vae(directory, dtype=dtype)
