"""Loading DINOv2 weights: torch-hub ``.pth``, HF directories, our ``.npz``.

Three sources, one path (:func:`load_dinov2`):

* torch hub state dicts (``dinov2_vitb14_reg4_pretrain.pth``): keys
  ``cls_token``, ``register_tokens``, ``pos_embed``, ``mask_token``,
  ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,
  norm2,mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}.*``, ``norm.*``
  (chunked ``blocks.{c}.{i}.`` keys are accepted too);
* HF directories written by ``Dinov2Model.save_pretrained`` or
  ``Dinov2WithRegistersModel.save_pretrained`` (``config.json`` +
  ``model.safetensors``), in the legacy key layout those write
  (``attention.attention.query``, ``mlp.weights_in``, ...) or the renamed one
  transformers 5 uses in memory (``attention.q_proj``, ``mlp.gate_proj``);
* ``.npz`` files written by :func:`save_npz` (our parameter paths plus the
  config as JSON; reading them needs no torch).

HF state dicts are first renamed to the hub layout, then one mapping fills
the module.  ``mask_token`` is a training-only parameter and is ignored.
The position interpolation defaults to the source's convention
(``pos_interp='hub'`` for ``.pth``, ``'hf'`` for HF directories); pass
``pos_interp=...`` to override.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from typing import Any

import numpy as np
from flax import nnx

from glue_jax.models import torch_weights as tw
from glue_jax.models.dinov2 import Dinov2, Dinov2Config, dinov2_config

_IGNORED = ("mask_token",)
_CONFIG_KEY = "__dinov2_config__"


# -- HF -> hub key layout -----------------------------------------------------
_HF_TOP = {"embeddings.cls_token": "cls_token",
           "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_LAYER = {"norm1": "norm1", "norm2": "norm2",
             "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
             "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
             "mlp.down_proj": "mlp.w3"}
# parts concatenated along the output axis (q,k,v -> qkv; gate,up -> w12)
_HF_FUSED = {("attention.attention.query", "attention.attention.key",
              "attention.attention.value"): "attn.qkv",
             ("attention.q_proj", "attention.k_proj", "attention.v_proj"): "attn.qkv",
             ("mlp.gate_proj", "mlp.up_proj"): "mlp.w12"}


def hf_to_hub(sd: dict[str, np.ndarray], *, where: str = "HF weights"
              ) -> dict[str, np.ndarray]:
  """Renames an HF ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict.

  Raises WeightsError naming any key it does not recognise.
  """
  out, used = {}, set()
  for k, v in sd.items():
    if k in _HF_TOP:
      out[_HF_TOP[k]] = v
      used.add(k)
  layer_ids = sorted({int(m.group(1)) for k in sd
                      if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
  for i in layer_ids:
    pre = f"encoder.layer.{i}."
    for src, dst in _HF_LAYER.items():
      leaves = ("",) if src.endswith("lambda1") else (".weight", ".bias")
      for leaf in leaves:
        if pre + src + leaf in sd:
          out[f"blocks.{i}.{dst}{leaf}"] = sd[pre + src + leaf]
          used.add(pre + src + leaf)
    for parts, dst in _HF_FUSED.items():
      for leaf in ("weight", "bias"):
        keys = [f"{pre}{p}.{leaf}" for p in parts]
        present = [k for k in keys if k in sd]
        if not present:
          continue
        tw.require(sd, keys, where=where)
        out[f"blocks.{i}.{dst}.{leaf}"] = np.concatenate([sd[k] for k in keys], 0)
        used.update(keys)
  tw.check_consumed(sd, used, where=where)
  return out


def _canonical_hub(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flattens chunked block keys (``blocks.{c}.{i}.`` -> ``blocks.{i}.``)."""
  return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


# -- hub layout -> our parameters ----------------------------------------------
def infer_config(sd: dict[str, np.ndarray], **overrides: Any) -> Dinov2Config:
  """A config that fits a hub-layout state dict (heads default to dim/64)."""
  tw.require(sd, ["cls_token", "pos_embed", "patch_embed.proj.weight"],
             where="DINOv2 weights")
  dim = sd["cls_token"].shape[-1]
  n_pos = sd["pos_embed"].shape[1] - 1
  grid = int(round(n_pos ** 0.5))
  if grid * grid != n_pos:
    raise tw.WeightsError(f"pos_embed has {n_pos} patch positions, not a square grid")
  depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
  swiglu = "blocks.0.mlp.w12.weight" in sd
  hidden_key = "blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc2.weight"
  kw = dict(dim=dim, depth=depth, num_heads=max(dim // 64, 1),
            ffn="swiglu" if swiglu else "mlp",
            mlp_hidden=int(sd[hidden_key].shape[1]) if hidden_key in sd else None,
            patch_size=int(sd["patch_embed.proj.weight"].shape[-1]),
            in_channels=int(sd["patch_embed.proj.weight"].shape[1]),
            pos_grid=grid,
            num_registers=(int(sd["register_tokens"].shape[1])
                           if "register_tokens" in sd else 0),
            layerscale="blocks.0.ls1.gamma" in sd,
            qkv_bias="blocks.0.attn.qkv.bias" in sd)
  kw.update(overrides)
  return Dinov2Config(**kw)


def hub_mapping(sd: dict[str, np.ndarray], cfg: Dinov2Config, *,
                where: str = "DINOv2 weights") -> dict[str, np.ndarray]:
  """``{our path: array}`` from a hub-layout state dict; checks every key."""
  top = {"patch_embed/kernel": ("patch_embed.proj.weight", tw.conv),
         "patch_embed/bias": ("patch_embed.proj.bias", None),
         "cls_token": ("cls_token", None), "pos_embed": ("pos_embed", None),
         "norm/scale": ("norm.weight", None), "norm/bias": ("norm.bias", None)}
  if cfg.num_registers:
    top["register_tokens"] = ("register_tokens", None)
  per_block = {"norm1/scale": ("norm1.weight", None), "norm1/bias": ("norm1.bias", None),
               "attn/qkv/kernel": ("attn.qkv.weight", tw.linear),
               "attn/proj/kernel": ("attn.proj.weight", tw.linear),
               "attn/proj/bias": ("attn.proj.bias", None),
               "norm2/scale": ("norm2.weight", None), "norm2/bias": ("norm2.bias", None)}
  if cfg.qkv_bias:
    per_block["attn/qkv/bias"] = ("attn.qkv.bias", None)
  if cfg.layerscale:
    per_block["ls1/gamma"] = ("ls1.gamma", None)
    per_block["ls2/gamma"] = ("ls2.gamma", None)
  fcs = ("w12", "w3") if cfg.ffn == "swiglu" else ("fc1", "fc2")
  for fc in fcs:
    per_block[f"mlp/{fc}/kernel"] = (f"mlp.{fc}.weight", tw.linear)
    per_block[f"mlp/{fc}/bias"] = (f"mlp.{fc}.bias", None)
  needed = [k for k, _ in top.values()]
  needed += [f"blocks.{i}.{k}" for i in range(cfg.depth) for k, _ in per_block.values()]
  tw.require(sd, needed, where=where)
  tw.check_consumed(sd, needed, where=where, ignore=_IGNORED)
  conv = lambda fn, a: np.asarray(fn(a) if fn else a, np.float32)
  mapping = {ours: conv(fn, sd[k]) for ours, (k, fn) in top.items()}
  odd = []
  for ours, (k, fn) in per_block.items():
    arrs = [conv(fn, sd[f"blocks.{i}.{k}"]) for i in range(cfg.depth)]
    shapes = [a.shape for a in arrs]
    common = max(set(shapes), key=shapes.count)
    odd += [f"blocks.{i}.{k}: {tuple(sd[f'blocks.{i}.{k}'].shape)}"
            for i, sh in enumerate(shapes) if sh != common]
    if not odd:
      mapping[f"blocks/{ours}"] = np.stack(arrs)
  if odd:
    raise tw.WeightsError(f"{where}: block weights whose shape differs from the "
                          f"other blocks ({len(odd)}): " + "; ".join(odd))
  return mapping


# -- entry points ----------------------------------------------------------------
def _build(cfg: Dinov2Config, mapping: dict[str, np.ndarray], where: str) -> Dinov2:
  """An abstract model (no random init) filled from a checked mapping."""
  model = nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))
  tw.load_into(model, mapping, where=where)
  return model


def _check_variant(cfg: Dinov2Config, variant: str | None,
                   registers: bool | None, heads_known: bool) -> Dinov2Config:
  """Checks the checkpoint against a requested variant; takes its heads."""
  if registers is not None and bool(cfg.num_registers) != bool(registers):
    raise tw.WeightsError(f"registers={registers} requested but the weights have "
                          f"{cfg.num_registers} register tokens")
  if variant is None:
    return cfg
  want = dinov2_config(variant, registers=bool(cfg.num_registers))
  for f in ("dim", "depth", "ffn"):
    if getattr(want, f) != getattr(cfg, f):
      raise tw.WeightsError(f"variant {variant!r} has {f}={getattr(want, f)} but "
                            f"the weights have {f}={getattr(cfg, f)}")
  if not heads_known:
    cfg = dataclasses.replace(cfg, num_heads=want.num_heads)
  return cfg


def _hf_files(path: str) -> tuple[str, str]:
  """``(config.json, weights)`` of an HF directory or weights file."""
  if not os.path.isdir(path):
    return os.path.join(os.path.dirname(path), "config.json"), path
  weights = os.path.join(path, "model.safetensors")
  if not os.path.exists(weights) and os.path.exists(os.path.join(path, "pytorch_model.bin")):
    weights = os.path.join(path, "pytorch_model.bin")
  return os.path.join(path, "config.json"), weights


def load_dinov2(path: str, variant: str | None = None,
                registers: bool | None = None, **overrides: Any) -> Dinov2:
  """Builds a :class:`Dinov2` from weights on disk.

  Args:
    path: an HF directory (or its ``model.safetensors``), a torch-hub
      ``.pth``, or an ``.npz`` from :func:`save_npz`.
    variant: optional 's'/'b'/'l'/'g' (or a hub/HF name) to check the weights
      against; it also gives the head count, which shapes cannot tell
      (otherwise ``dim // 64``, true for every released model).
    registers: optional check that the weights have (or lack) registers.
    **overrides: Dinov2Config fields (``pos_interp``, ``dtype``, ``num_heads``).
  """
  if path.endswith(".npz"):
    sd = tw.read_state_dict(path)
    if _CONFIG_KEY not in sd:
      raise tw.WeightsError(f"{path}: not written by save_npz (no config entry)")
    fields = json.loads(bytes(sd.pop(_CONFIG_KEY)).decode())
    fields.update(overrides)
    cfg = _check_variant(Dinov2Config(**fields), variant, registers, True)
    return _build(cfg, sd, path)
  config_json, weights = _hf_files(path)
  if os.path.isdir(path) or path.endswith(".safetensors"):
    if not os.path.exists(config_json):
      raise FileNotFoundError(f"{config_json} not found next to the HF weights")
    with open(config_json) as f:
      hf = json.load(f)
    if hf.get("hidden_act", "gelu") != "gelu":
      raise tw.WeightsError(f"hidden_act={hf['hidden_act']!r} is not supported")
    sd = hf_to_hub(tw.read_state_dict(weights), where=weights)
    kw = dict(num_heads=hf["num_attention_heads"], ln_eps=hf.get("layer_norm_eps", 1e-6),
              pos_interp="hf")
    kw.update(overrides)
    where = weights
  else:
    sd = _canonical_hub(tw.read_state_dict(path))
    kw = dict(pos_interp="hub")
    kw.update(overrides)
    where = path
  cfg = _check_variant(infer_config(sd, **kw), variant, registers, "num_heads" in kw)
  return _build(cfg, hub_mapping(sd, cfg, where=where), where)


def save_npz(model: Dinov2, path: str) -> None:
  """Writes parameters (our paths) and the config to ``path`` (.npz)."""
  arrays = {k: np.asarray(v[...]) for k, v in tw.flat_params(model).items()}
  cfg = json.dumps(dataclasses.asdict(model.cfg)).encode()
  arrays[_CONFIG_KEY] = np.frombuffer(cfg, np.uint8)
  np.savez(path, **arrays)


HF_NAMES = {"s": "small", "b": "base", "l": "large", "g": "giant"}


def _online(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def from_pretrained_hub(name: str, *, cache_dir: str | None = None,
                        local_files_only: bool | None = None,
                        **overrides: Any) -> Dinov2:
  """Downloads ``facebook/dinov2[-with-registers]-{small,base,large,giant}``.

  ``name`` is an HF repo id or a variant name ('b', 'vitb14_reg').  Uses the
  local HF cache when ``HF_HUB_OFFLINE`` is set or huggingface.co cannot be
  reached (checked with a 2 s connection attempt) and raises RuntimeError if
  the files are not there.
  """
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("from_pretrained_hub needs huggingface_hub") from e
  if "/" in name and not name.lower().startswith(("b/", "s/", "l/", "g/")):
    repo = name
  else:
    cfg = dinov2_config(name)
    size = HF_NAMES[{384: "s", 768: "b", 1024: "l", 1536: "g"}[cfg.dim]]
    repo = (f"facebook/dinov2-with-registers-{size}" if cfg.num_registers
            else f"facebook/dinov2-{size}")
  if local_files_only is None:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    local_files_only = offline or not _online()
  try:
    d = snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"],
                          cache_dir=cache_dir, local_files_only=local_files_only)
  except Exception as e:  # noqa: BLE001 - re-raised with a clear message
    why = ("no network access (or HF_HUB_OFFLINE set) and not in the local HF "
           "cache" if local_files_only else "download failed")
    raise RuntimeError(
        f"cannot fetch {repo}: {why} ({type(e).__name__}: {e}). Download it "
        "elsewhere and call load_dinov2(<dir with config.json + "
        "model.safetensors>).") from e
  return load_dinov2(d, **overrides)
