"""Composition evaluation on held-out scene specifications (GLoD vs baselines).

  python -m glue_jax.projects.glod.composition_cli --workdir=workdirs/scenes \
      [--methods=global,single,glod_B] [--seeds=0,1,2] [--num_scenes=64]

Methods, all sampled from the same per-scene noise (seed, scene index):
- ``global``: CFG on the global caption (layout only; the preservation reference);
- ``single``: CFG on the single concatenated caption (global + every local);
- ``composable``: Composable Diffusion, v_0 + w_g (v_global - v_0) + sum_j w_l (v_local_j - v_0);
- ``glod_A`` / ``glod_B`` / ``glod_C``: GLoD composition variants
  (``glue_jax.sampling.compose``) with each local caption confined to its box;
- ``glod_B_layout``: variant B plus backward layout guidance on the attention of
  image tokens on the object's word of the global caption.

Scores per scene (probes of ``glue_jax.projects.glod.probes``, trained on real scenes):
- global alignment: fraction of the caption's relations that hold (layout probe);
- local alignment: mean over objects of the colour and identity probe on the box
  crop being the local caption's (reported separately as local_colour/identity;
  local_both: the fraction of objects showing both the right colour and identity);
- leakage: fraction of (object j, other object k) pairs whose crop k shows j's colour;
- preservation: mean absolute pixel change (0..1) outside the local boxes against
  the ``global`` sample of the same noise (lower = better preserved).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.projects.glod import scene_data as scenes_lib
from glue_jax.projects.glod import probes as probes_lib
from glue_jax.sampling import compose, samplers
from glue_jax.train import writers

METHODS = ("global", "single", "composable", "glod_A", "glod_B", "glod_C", "glod_B_layout")
METRICS = ("global_alignment", "local_alignment", "leakage", "preservation")


def conditions(method: str, arrays: dict, idx: np.ndarray, settings, latent_hw) -> compose.Conditions:
  """The composition inputs of ``method`` for scenes ``idx`` of ``arrays``."""
  b = len(idx)
  null = np.full((b, scenes_lib.PROMPT_LENGTH), scenes_lib.NULL_TOKEN, np.int32)
  glob = arrays["global_tokens"][idx]
  locs = arrays["local_tokens"][idx]                              # (B, 3, L)
  present = arrays["identity"][idx] >= 0                          # (B, 3)
  lw = np.where(present, settings.local_scale, 0.0)
  if method == "global":
    return compose.cfg_conditions(null, glob, settings.cfg_scale, latent_hw)
  if method == "single":
    return compose.cfg_conditions(null, arrays["full_tokens"][idx], settings.cfg_scale, latent_hw)
  if method == "composable":
    prompts = np.concatenate([glob[:, None], locs], 1)
    weights = np.concatenate([np.full((b, 1), settings.cfg_scale), lw], 1)
    return compose.composable_conditions(null, prompts, weights, latent_hw)
  if not method.startswith("glod_"):
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")
  variant = method.split("_")[1]
  masks = compose.box_masks(arrays["boxes"][idx], *latent_hw) * present[..., None, None]
  pos = arrays["object_position"][idx]
  tokens = (np.arange(scenes_lib.PROMPT_LENGTH)[None, None] == pos[..., None]) & present[..., None]
  return compose.make_conditions(
      null, glob[:, None], locs, masks, global_weights=settings.cfg_scale, local_weights=lw,
      variant=variant, overlap=settings.overlap, feather_sigma=settings.feather,
      object_tokens=tokens)


@functools.lru_cache(maxsize=16)
def _sampler(graphdef, spatial_shape, global_dim, sampler, num_steps, local_interval,
             layout_scale, layout_t_min):
  layout = None
  if layout_scale:
    layout = ("attention", layout_scale, layout_t_min)

  @jax.jit
  def run(params, conds, keys):
    net = lambda: nnx.merge(graphdef, params)
    apply = lambda x, t, y, g: net()(x, t, y, g)
    lay = None if layout is None else compose.LayoutGuidance(
        lambda x, t, y, g: net().prompt_attention(x, t, y, g), layout[1], layout[2])
    x0, _ = compose.sample(apply, conds, keys, spatial_shape, global_dim, sampler=sampler,
                           num_steps=num_steps, local_interval=local_interval, layout=lay)
    return x0
  return run


def generate(model, first_stage, method: str, arrays: dict, idx: np.ndarray, seed: int,
             settings) -> np.ndarray:
  """uint8 images of ``method`` for scenes ``idx``; scene i's noise comes from (seed, i)."""
  cfg = model.config
  hw = (cfg.input_size, cfg.input_size)
  layout_scale = settings.layout_scale if method.endswith("_layout") else 0.0
  run = _sampler(model.graphdef, hw + (cfg.in_channels,), cfg.global_token_dim,
                 settings.sampler, int(settings.num_steps), tuple(settings.local_interval),
                 float(layout_scale), float(settings.layout_t_min))
  out = []
  bs = int(settings.batch_size)
  for i in range(0, len(idx), bs):
    part = idx[i:i + bs]
    conds = conditions(method.replace("_layout", ""), arrays, part, settings, hw)
    x0 = run(model.params, conds, samplers.per_sample_keys(seed, jnp.asarray(part)))
    out.append(np.asarray(first_stage.decode_uint8(x0[..., :cfg.latent_channels])))
  return np.concatenate(out)


def score(images: np.ndarray, arrays: dict, idx: np.ndarray, probes, reference=None) -> dict:
  """Per-scene scores (B,) of generated ``images`` for scenes ``idx``."""
  ident, colour = arrays["identity"][idx], arrays["colour"][idx]
  boxes, present = arrays["boxes"][idx], arrays["identity"][idx] >= 0
  rel = probes_lib.relation_score(probes.layout_maps(images), ident, arrays["relation"][idx])
  col_hat, id_hat = probes.attributes(images, boxes)
  n = np.maximum(present.sum(1), 1)
  local_colour = ((col_hat == colour) & present).sum(1) / n
  local_identity = ((id_hat == ident) & present).sum(1) / n
  local_both = ((col_hat == colour) & (id_hat == ident) & present).sum(1) / n
  pairs = present[:, :, None] & present[:, None, :] & ~np.eye(present.shape[1], dtype=bool)
  leak_hits = (col_hat[:, None, :] == colour[:, :, None]) & pairs    # [b, j, k]: crop k shows j's colour
  leakage = leak_hits.sum((1, 2)) / np.maximum(pairs.sum((1, 2)), 1)
  out = {"global_alignment": rel, "local_alignment": 0.5 * (local_colour + local_identity),
         "local_colour": local_colour, "local_identity": local_identity,
         "local_both": local_both, "leakage": leakage}
  if reference is not None:
    s = images.shape[1]
    inside = compose.box_masks(boxes, s, s) * present[..., None, None]
    outside = inside.max(1) == 0                                       # (B, S, S)
    diff = np.abs(images.astype(np.float32) - reference.astype(np.float32)).mean(-1) / 255.0
    out["preservation"] = (diff * outside).sum((1, 2)) / np.maximum(outside.sum((1, 2)), 1)
  return out


def evaluate(model, first_stage, probes, arrays: dict, settings, *, methods, seeds,
             num_scenes: int, image_dir: str | None = None, progress: bool = True) -> dict:
  """Scores of every method for every seed; ``global`` is always run (preservation)."""
  idx = np.arange(min(num_scenes, len(arrays["image"])))
  order = ["global"] + [m for m in methods if m != "global"]
  per_seed = {m: {k: [] for k in METRICS + ("local_colour", "local_identity", "local_both")}
              for m in order}
  timings = {m: 0.0 for m in order}
  grids = {}
  for seed in seeds:
    ref = None
    for m in order:
      t0 = time.time()
      imgs = generate(model, first_stage, m, arrays, idx, seed, settings)
      timings[m] += time.time() - t0
      if m == "global":
        ref = imgs
      sc = score(imgs, arrays, idx, probes, reference=ref)
      for k, v in sc.items():
        per_seed[m][k].append(float(np.mean(v)))
      if progress:
        print(f"seed {seed} {m:14s} " + " ".join(f"{k}={np.mean(v):.3f}" for k, v in sc.items()),
              flush=True)
      if seed == seeds[0]:
        grids[m] = imgs[:8]
  summary = {m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                 for k, v in per_seed[m].items()} for m in order if m in methods or m == "global"}
  if image_dir:
    real = arrays["image"][idx[:8]]
    rows = [real] + [grids[m] for m in order]
    writers.save_png(os.path.join(image_dir, "composition_samples.png"),
                     writers.image_grid(np.concatenate(rows), ncols=len(real)), scale=4)
  return {"methods": summary, "seconds": timings, "num_scenes": int(len(idx)),
          "seeds": list(seeds), "order_of_rows": ["real"] + order}


def format_table(result: dict) -> str:
  head = f"{'method':16s}" + "".join(f"{k:>22s}" for k in METRICS)
  lines = [head, "-" * len(head)]
  for m, vals in result["methods"].items():
    cells = []
    for k in METRICS:
      v = vals.get(k)
      cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}".rjust(22) if v and v["per_seed"] else
                   "-".rjust(22))
    lines.append(f"{m:16s}" + "".join(cells))
  return "\n".join(lines)
