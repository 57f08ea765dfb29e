"""LA-INR few-shot novel view synthesis as a job of the one trainer.

Objects of a multi-view set (the procedural primitives of
``glue_jax.projects.lainr.multiview_data`` or ShapeNet renders) are the examples; the Grain
pipeline picks disjoint support and query views per object
(``radiance_field.choose_views``), the step encodes the support views and volume
renders random query rays (``radiance_field.make_loss``).  Held-out objects are
rendered from their first ``support_views`` views and scored by PSNR.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from flax import nnx

from glue_jax.data.pipeline import ArraySource
from glue_jax.models import lainr as lainr_lib
from glue_jax.projects.lainr import multiview_data as multiview
from glue_jax.projects.lainr import reconstruction
from glue_jax.projects.lainr import radiance_field as nvs_lib
from glue_jax.train import trainer, writers


def multiview_data(config, split: str) -> dict:
  nc = config.nvs
  if nc.dataset == "procedural":
    n = nc.num_objects if split == "train" else nc.num_test_objects
    return multiview.procedural(n, nc.num_views, nc.image_size,
                                seed=config.seed * 2 + (split != "train"))
  if nc.dataset == "shapenet":
    return multiview.load_shapenet(nc.root, nc.category, split, image_size=nc.image_size,
                                   near=nc.near, far=nc.far)
  raise ValueError(f"config.nvs.dataset={nc.dataset!r}: procedural | shapenet")


def setup(config) -> tuple[lainr_lib.LAINRConfig, nvs_lib.RenderConfig]:
  nc = config.nvs
  rcfg = nvs_lib.RenderConfig(near=nc.near, far=nc.far, num_samples=nc.num_samples,
                              white_background=nc.white_background,
                              density_activation=nc.density_activation,
                              scene_scale=nc.scene_scale, view_dirs=nc.view_dirs,
                              last_bin=nc.last_bin)
  mcfg = reconstruction.model_config(
      config, image_size=nc.image_size, in_channels=9, coord_dim=rcfg.coord_dim, out_dim=4,
      output_bias=0.0, patch_size=nc.patch_size, patch_padding=0,
      sigmas=tuple(nc.sigmas), sigma_q=nc.sigma_q)
  return mcfg, rcfg


def build_job(config):
  """``(job, model config, render config, graphdef)``."""
  nc = config.nvs
  train = multiview_data(config, "train")
  source = ArraySource({k: train[k] for k in ("images", "poses", "focal")},
                       name=f"{nc.dataset}/train")
  mcfg, rcfg = setup(config)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: lainr_lib.LAINR(mcfg, rngs=nnx.Rngs(0))))
  job = trainer.Job(
      name="lainr-nvs", meta={"task": "nvs", "model": dataclasses.asdict(mcfg),
                              "render": dataclasses.asdict(rcfg)},
      model=lambda seed: lainr_lib.LAINR(mcfg, rngs=nnx.Rngs(seed)),
      loss=nvs_lib.make_loss(graphdef, rcfg, nc.rays_per_instance),
      source=source, tx=reconstruction.make_optimizer(config),
      augment=functools.partial(nvs_lib.choose_views, nc.support_views, nc.query_views),
      check=functools.partial(trainer.check_meta, keys=("model", "render")))
  return job, mcfg, rcfg, graphdef


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  nc = config.nvs
  job, mcfg, rcfg, graphdef = build_job(config)
  last = trainer.train(job, config, workdir)
  _, _, params, _ = reconstruction.load_trained(workdir)
  test = multiview_data(config, "test")
  render_fn = jax.jit(nvs_lib.make_render_views(graphdef, rcfg, nc.chunk))
  scores, renders = nvs_lib.evaluate(render_fn, params, test, nc.support_views)
  k = min(4, len(test["images"]))
  rows = [test["images"][:k, :nc.support_views], test["images"][:k, nc.support_views:],
          reconstruction.uint8(renders[:k])]
  grid = np.concatenate(rows, 1)                       # per object: support | GT | render
  writers.save_png(os.path.join(workdir, "novel_views.png"),
                   writers.image_grid(grid.reshape(-1, *grid.shape[2:]), ncols=grid.shape[1]),
                   scale=3)
  result = {"test_psnr": float(scores.mean()), "test_psnr_std": float(scores.std()),
            "num_test_views": int(len(scores)), "train": last, "variant": mcfg.variant}
  writers.save_json(os.path.join(workdir, "metrics.json"), result)
  return result
