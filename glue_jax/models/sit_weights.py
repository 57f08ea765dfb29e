"""Official SiT / REPA / REG / REGLUE PyTorch state dicts -> our SiT parameters.

Key names of the official code (identical in REG and REGLUE's ``models/sit.py``;
REPA lacks the cls path; willisma/SiT lacks projectors and has learn_sigma):

  x_embedder.proj.{weight (D,C,p,p), bias}      -> patch_embed
  t_embedder.mlp.{0,2}.{weight,bias}            -> t_embed/fc1, fc2
  y_embedder.embedding_table.weight             -> y_embed
  blocks.i.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2 / adaLN_modulation.1
                                                -> blocks/... (stacked on axis 0)
  projectors.0.{0,2,4}                          -> projector/fc1, fc2, fc3
  cls_projectors2, wg_norm                      -> global_in, global_norm
  final_layer.linear_cls                        -> global_out
  final_layer.linear / adaLN_modulation.1       -> final_linear / final_adaln
  pos_embed                                     -> checked against our fixed table

The architecture is read off the shapes; what shapes cannot tell (heads,
the projector tap) comes from the preset/overrides and is validated.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from glue_jax.models import layers, sit
from glue_jax.models.torch_weights import WeightsError, linear


def backbone_shape(sd: dict, *, where: str = "checkpoint") -> dict:
  """``hidden_size``, ``depth``, ``patch_size`` and input channels of a state dict."""
  need = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight",
          "final_layer.linear.weight", "pos_embed", "blocks.0.attn.qkv.weight"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise WeightsError(f"{where}: not an official SiT state dict; missing {missing}")
  d, c, p, _ = sd["x_embedder.proj.weight"].shape
  depth = 1 + max(int(m.group(1)) for k in sd
                  if (m := re.match(r"blocks\.(\d+)\.", k)))
  return dict(hidden_size=d, depth=depth, patch_size=p, channels=c)


def infer_config(sd: dict, base: sit.SiTConfig, *, latent_channels: int = 4,
                 where: str = "checkpoint") -> sit.SiTConfig:
  """Completes ``base`` with what the state dict's shapes say; checks the rest."""
  shape = backbone_shape(sd, where=where)
  d, c, p, depth = (shape["hidden_size"], shape["channels"], shape["patch_size"],
                    shape["depth"])
  has_cls = "cls_projectors2.weight" in sd
  n_tok = sd["pos_embed"].shape[1] - (1 if has_cls else 0)
  grid = int(round(n_tok ** 0.5))
  if grid * grid != n_tok:
    raise WeightsError(f"{where}: pos_embed has {n_tok} patch slots, not a square grid")
  out = sd["final_layer.linear.weight"].shape[0]
  if out not in (p * p * c, 2 * p * p * c):
    raise WeightsError(f"{where}: final_layer.linear out={out} fits neither "
                       f"{p * p * c} nor {2 * p * p * c} (learn_sigma)")
  rows = sd["y_embedder.embedding_table.weight"].shape[0]
  proj = {}
  if "projectors.0.0.weight" in sd:
    if any(k.startswith("projectors.1.") for k in sd):
      raise WeightsError(f"{where}: several REPA projectors; only one is supported")
    proj = dict(projector_dim=sd["projectors.0.0.weight"].shape[0],
                projector_out_dim=sd["projectors.0.4.weight"].shape[0])
  else:
    proj = dict(projector_out_dim=0)
  semantic = c - latent_channels
  if semantic < 0:
    raise WeightsError(f"{where}: {c} input channels < {latent_channels} latent channels")
  heads = base.num_heads
  if d % heads:
    raise WeightsError(f"{where}: width {d} is not divisible by num_heads={heads}")
  cfg = dataclasses.replace(
      base, hidden_size=d, depth=depth, patch_size=p, input_size=grid * p,
      latent_channels=latent_channels, semantic_channels=semantic,
      num_classes=rows - 1 if base.class_dropout_prob > 0 else rows,
      global_token_dim=(sd["cls_projectors2.weight"].shape[1] if has_cls else 0),
      learn_sigma=(out == 2 * p * p * c), **proj)
  if proj.get("projector_out_dim") and not 1 <= cfg.encoder_depth <= depth:
    raise WeightsError(f"{where}: encoder_depth={cfg.encoder_depth} outside 1..{depth}")
  return cfg


def _stack(sd, depth, name, fn):
  return np.stack([fn(sd[f"blocks.{i}.{name}"]) for i in range(depth)])


def convert(sd: dict, cfg: sit.SiTConfig, *, where: str = "checkpoint") -> dict:
  """Flat mapping ``{'blocks/attn/qkv/kernel': array, ...}`` for our SiT."""
  used = set()

  def get(k):
    if k not in sd:
      raise WeightsError(f"{where}: missing key {k}")
    used.add(k)
    return np.asarray(sd[k], np.float32)

  d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
  m = {}
  w = get("x_embedder.proj.weight")           # (D, C, p, p)
  m["patch_embed/kernel"] = w.transpose(2, 3, 1, 0).reshape(p * p * c, d)
  m["patch_embed/bias"] = get("x_embedder.proj.bias")
  m["t_embed/fc1/kernel"] = linear(get("t_embedder.mlp.0.weight"))
  m["t_embed/fc1/bias"] = get("t_embedder.mlp.0.bias")
  m["t_embed/fc2/kernel"] = linear(get("t_embedder.mlp.2.weight"))
  m["t_embed/fc2/bias"] = get("t_embedder.mlp.2.bias")
  m["y_embed"] = get("y_embedder.embedding_table.weight")
  blocks = {"attn/qkv": "attn.qkv", "attn/proj": "attn.proj",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
            "adaln": "adaLN_modulation.1"}
  for ours, theirs in blocks.items():
    for i in range(cfg.depth):
      get(f"blocks.{i}.{theirs}.weight"), get(f"blocks.{i}.{theirs}.bias")
    m[f"blocks/{ours}/kernel"] = _stack(sd, cfg.depth, f"{theirs}.weight", linear)
    m[f"blocks/{ours}/bias"] = _stack(sd, cfg.depth, f"{theirs}.bias", np.asarray)
  if cfg.projector_out_dim:
    for ours, i in (("fc1", 0), ("fc2", 2), ("fc3", 4)):
      m[f"projector/{ours}/kernel"] = linear(get(f"projectors.0.{i}.weight"))
      m[f"projector/{ours}/bias"] = get(f"projectors.0.{i}.bias")
  if cfg.global_token_dim:
    m["global_in/kernel"] = linear(get("cls_projectors2.weight"))
    m["global_in/bias"] = get("cls_projectors2.bias")
    m["global_norm/scale"] = get("wg_norm.weight")
    m["global_norm/bias"] = get("wg_norm.bias")
    m["global_out/kernel"] = linear(get("final_layer.linear_cls.weight"))
    m["global_out/bias"] = get("final_layer.linear_cls.bias")
  m["final_adaln/kernel"] = linear(get("final_layer.adaLN_modulation.1.weight"))
  m["final_adaln/bias"] = get("final_layer.adaLN_modulation.1.bias")
  m["final_linear/kernel"] = linear(get("final_layer.linear.weight"))
  m["final_linear/bias"] = get("final_layer.linear.bias")

  ours_pos = layers.sincos_2d(d, cfg.grid_size, 1 if cfg.global_token_dim else 0)
  theirs_pos = get("pos_embed").reshape(ours_pos.shape)
  if not np.allclose(ours_pos, theirs_pos, atol=1e-5):
    raise WeightsError(f"{where}: pos_embed differs from the fixed sin-cos table "
                       f"(max diff {np.abs(ours_pos - theirs_pos).max():.3g})")
  # Keys that exist in official checkpoints but have no parameters here.
  ignorable = ("final_layer.linear_cls.",) if not cfg.global_token_dim else ()
  left = sorted(k for k in sd if k not in used and not k.startswith(ignorable))
  if left:
    raise WeightsError(f"{where}: unexpected keys ({len(left)}): {', '.join(left)}")
  return m
