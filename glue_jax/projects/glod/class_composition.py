"""GLoD on class-conditional checkpoints: a global class with local classes in boxes.

  python -m glue_jax.projects.glod.class_composition --checkpoint=ckpt/reglue_xl \\
      --global_class=970 --local=207:0.05,0.45,0.5,0.95 --local=281:0.5,0.45,0.95,0.95 \\
      --vae=weights/sd_vae_ft_ema.npz --num_samples=4 --out=glod/alp_dog_cat.png

Works on any checkpoint :func:`glue_jax.load_model` opens (trained here, or
imported REGLUE / REG / REPA / SiT releases).  The global condition is an
ImageNet class for the whole canvas (a scene class such as 970 "alp"); each
``--local`` is ``label:x0,y0,x1,y1``, a class confined to a box in [0, 1]
image coordinates (x right, y down).  Every sampler step evaluates the network
on the null label, the global class and each local class (one batched call) and
composes the velocities with GLoD (``glue_jax.sampling.compose``, variant B by
default: each local term is relative to the global one inside its box).

Choices (GLoD composes prompts of a text-to-image model; on class-conditional
ImageNet models these are ours, each a flag):

- the guidance weights and interval are the checkpoint's preset (``--cfg_scale``
  and ``--local_scale`` override them): the global class gets the preset's CFG
  scale, each local class ``--local_scale`` (default the same); outside the
  preset's interval every weight is 1 (``compose.composed_velocity``);
- REGLUE's global [CLS] token is guided by the global condition only, with the
  preset's [CLS] scale (``global_cfg_scale``; <= 0: the conditional [CLS]
  velocity, as the official sampler); local classes never touch it;
- ``vae_cfg`` presets compose all channels with the standard rule (the local
  terms move the semantic channels inside the boxes too).

Writes the PNG (row 1: CFG on the global class alone; row 2: GLoD; same noise
per column) and ``<out>.json`` with the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax import api
from glue_jax.sampling import compose, samplers
from glue_jax.train import writers


@dataclasses.dataclass(frozen=True)
class Region:
  """A local class confined to a box ``(x0, y0, x1, y1)`` in [0, 1]."""
  label: int
  box: tuple[float, float, float, float]


def parse_region(spec: str) -> Region:
  """``'207:0.05,0.45,0.5,0.95'`` -> Region; a ValueError naming ``spec`` otherwise."""
  label, sep, coords = spec.partition(":")
  try:
    box = tuple(float(v) for v in coords.split(","))
    lab = int(label)
  except ValueError:
    box, lab = (), -1
  if not sep or len(box) != 4 or lab < 0:
    raise ValueError(f"--local={spec!r}: expected LABEL:x0,y0,x1,y1 (e.g. 207:0.05,0.45,0.5,0.95)")
  x0, y0, x1, y1 = box
  if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
    raise ValueError(f"--local={spec!r}: the box must satisfy 0 <= x0 < x1 <= 1 and "
                     "0 <= y0 < y1 <= 1")
  return Region(lab, box)


def class_conditions(model: api.LoadedModel, global_class: int, regions: list[Region], *,
                     num_samples: int, cfg_scale: float, local_scale: float,
                     variant: str = "B", overlap: str = "sum",
                     feather: float = 0.0) -> compose.Conditions:
  """The GLoD conditions of ``num_samples`` identical requests at latent resolution."""
  cfg = model.config
  null_label = cfg.num_classes
  for lab in [global_class] + [r.label for r in regions]:
    if not 0 <= lab < null_label:
      raise ValueError(f"class {lab} outside the checkpoint's 0..{null_label - 1}")
  b, nl = num_samples, len(regions)
  hw = (cfg.input_size, cfg.input_size)
  boxes = np.asarray([r.box for r in regions], np.float32).reshape(nl, 4)
  masks = np.broadcast_to(compose.box_masks(boxes, *hw), (b, nl) + hw)
  locals_ = np.broadcast_to(np.asarray([r.label for r in regions], np.int32), (b, nl))
  return compose.make_conditions(
      np.full((b,), null_label, np.int32), np.full((b, 1), global_class, np.int32), locals_,
      masks, global_weights=cfg_scale, local_weights=local_scale, variant=variant,
      overlap=overlap, feather_sigma=feather)


@functools.lru_cache(maxsize=8)
def _sampler(graphdef, spatial_shape, global_dim, sampler, num_steps, t_last,
             guidance_interval, local_interval):
  @jax.jit
  def run(params, conds, keys, token_weight):
    apply = lambda x, t, y, g: nnx.merge(graphdef, params)(x, t, y, g)
    return compose.sample(apply, conds, keys, spatial_shape, global_dim, sampler=sampler,
                          num_steps=num_steps, t_last=t_last, local_interval=local_interval,
                          guidance_interval=guidance_interval,
                          global_token_weights=token_weight)
  return run


def compose_classes(model: api.LoadedModel, global_class: int, regions: list[Region], *,
                    num_samples: int = 4, seed: int = 0, variant: str = "B",
                    cfg_scale: float | None = None, local_scale: float | None = None,
                    num_steps: int | None = None, overlap: str = "sum", feather: float = 0.0,
                    local_interval: tuple[float, float] = (0.0, 1.0)) -> dict:
  """Samples GLoD compositions and, from the same noise, CFG on the global class alone.

  Returns ``{'glod': (x0, g0), 'global': (x0, g0), 'settings': {...}}`` with
  model-space states (``model.decode`` gives images).  Sample ``i`` starts
  from the noise of ``(seed, i)``, as ``model.sample``.
  """
  preset = model.preset
  w_g = preset.cfg_scale if cfg_scale is None else cfg_scale
  w_l = w_g if local_scale is None else local_scale
  w_cls = preset.global_cfg_scale if preset.global_cfg_scale is not None else w_g
  if w_cls <= 0:        # the official rule: the conditional [CLS] velocity
    w_cls = 1.0
  cfg = model.config
  run = _sampler(model.graphdef, (cfg.input_size, cfg.input_size, cfg.in_channels),
                 cfg.global_token_dim, preset.sampler, num_steps or preset.num_steps,
                 preset.t_last, tuple(preset.interval), tuple(local_interval))
  keys = samplers.per_sample_keys(seed, jnp.arange(num_samples))
  # The reference row is plain CFG (no local conditions: 2 network evaluations
  # per step instead of 2 + len(regions)).
  plain = compose.cfg_conditions(np.full((num_samples,), cfg.num_classes, np.int32),
                                 np.full((num_samples,), global_class, np.int32), w_g,
                                 (cfg.input_size, cfg.input_size))
  glod = class_conditions(model, global_class, regions, num_samples=num_samples, cfg_scale=w_g,
                          local_scale=w_l, variant=variant, overlap=overlap, feather=feather)
  out = {name: run(model.params, conds, keys, jnp.float32(w_cls))
         for name, conds in (("global", plain), ("glod", glod))}
  out["settings"] = dict(
      checkpoint=model.directory, step=model.step, global_class=global_class,
      locals=[dataclasses.asdict(r) for r in regions], variant=variant, cfg_scale=w_g,
      local_scale=w_l, cls_scale=w_cls, guidance_interval=list(preset.interval),
      local_interval=list(local_interval), sampler=preset.sampler,
      num_steps=num_steps or preset.num_steps, overlap=overlap, feather=feather, seed=seed,
      num_samples=num_samples)
  return out


def draw_boxes(images: np.ndarray, regions: list[Region], colour=(255, 255, 255)) -> np.ndarray:
  """Copies of uint8 NHWC ``images`` with each region's box outlined (1 px)."""
  out = np.array(images, copy=True)
  h, w = out.shape[1:3]
  for r in regions:
    x0, y0 = int(r.box[0] * w), int(r.box[1] * h)
    x1, y1 = max(x0 + 1, int(round(r.box[2] * w)) - 1), max(y0 + 1, int(round(r.box[3] * h)) - 1)
    out[:, y0:y1 + 1, [x0, min(x1, w - 1)]] = colour
    out[:, [y0, min(y1, h - 1)], x0:x1 + 1] = colour
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", required=True, help="a directory load_model opens")
  ap.add_argument("--global_class", type=int, required=True)
  ap.add_argument("--local", action="append", default=[], metavar="LABEL:x0,y0,x1,y1",
                  help="a local class in a box (repeat for more)")
  ap.add_argument("--variant", default="B", choices=sorted(compose.VARIANTS))
  ap.add_argument("--cfg_scale", type=float, default=None, help="default: the preset's")
  ap.add_argument("--local_scale", type=float, default=None, help="default: --cfg_scale")
  ap.add_argument("--num_steps", type=int, default=None, help="default: the preset's")
  ap.add_argument("--num_samples", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--overlap", default="sum", choices=compose.OVERLAP_RULES)
  ap.add_argument("--feather", type=float, default=0.0, help="mask fall-off, latent cells")
  ap.add_argument("--vae", default=None, help="SD-VAE weights for checkpoints that store none")
  ap.add_argument("--out", required=True, help="PNG path (settings go to <out>.json)")
  args = ap.parse_args(argv)
  try:
    regions = [parse_region(s) for s in args.local]
  except ValueError as e:
    ap.error(str(e))
  if not regions:
    ap.error("give at least one --local=LABEL:x0,y0,x1,y1")
  model = api.load_model(args.checkpoint)
  model.first_stage(args.vae)           # missing VAE weights fail before sampling
  out = compose_classes(model, args.global_class, regions, num_samples=args.num_samples,
                        seed=args.seed, variant=args.variant, cfg_scale=args.cfg_scale,
                        local_scale=args.local_scale, num_steps=args.num_steps,
                        overlap=args.overlap, feather=args.feather)
  rows = [model.decode(out[k][0], vae=args.vae) for k in ("global", "glod")]
  rows[1] = draw_boxes(rows[1], regions)
  grid = writers.image_grid(np.concatenate(rows), ncols=args.num_samples)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  writers.save_png(args.out, grid)
  writers.save_json(os.path.splitext(args.out)[0] + ".json", out["settings"])
  logging.info("wrote %s", args.out)
  print(json.dumps(out["settings"]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
