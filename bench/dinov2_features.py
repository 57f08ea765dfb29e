"""Throughput of REGLUE's DINOv2 feature extraction (random weights).

DINOv2-B/14 with 4 registers on uint8 ``size x size`` images: /255, ImageNet
normalisation, bicubic resize to ``224 * size // 256`` (PyTorch-exact), then
blocks 0..11 with the patch maps of blocks 8-11 and the last cls token passed
through the final LayerNorm.  Reports compile time and steady-state images/s
for the preprocessing alone and for the whole extraction.

  python bench/dinov2_features.py                  # batch 8, 256 px, fp32
  python bench/dinov2_features.py --batch 2 --iters 1
  python bench/dinov2_features.py --torch        # also HF transformers (CPU)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_jax.models import dinov2 as dv  # noqa: E402
import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)


NAME = "dinov2_features"


def build(cfg: dv.Dinov2Config, seed: int = 0):
  """Random-weight model as (graphdef, state), drawn with numpy.

  Eager JAX initialisation compiles every initialiser op, which is slow on a
  small CPU; the values do not matter for throughput.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: dv.Dinov2(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "scale" in names[-2:]:
      return jnp.ones(leaf.shape, jnp.float32)
    fan_in = int(np.prod(leaf.shape[-2:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))

  state = jax.tree_util.tree_map_with_path(draw, abstract)
  return graphdef, jax.block_until_ready(state)


def timed(fn, args, iters: int, warmup: int) -> dict:
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "median_s": float(np.median(times)),
          "min_s": float(np.min(times))}


def torch_reference(cfg: dv.Dinov2Config, images: np.ndarray, dino_size: int,
                    indices, iters: int, warmup: int) -> dict:
  """The same extraction with HF ``Dinov2WithRegistersModel`` on the CPU."""
  import torch
  import torch.nn.functional as F
  import transformers
  hf_cfg = transformers.Dinov2WithRegistersConfig(
      hidden_size=cfg.dim, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.num_heads, image_size=518, patch_size=14,
      num_register_tokens=cfg.num_registers)
  model = transformers.Dinov2WithRegistersModel(hf_cfg).eval()
  mean = torch.tensor(dv.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(dv.IMAGENET_STD).view(1, 3, 1, 1)
  x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)

  def run():
    with torch.no_grad():
      t = F.interpolate((x.float() / 255 - mean) / std, dino_size, mode="bicubic")
      hs = model(pixel_values=t, output_hidden_states=True).hidden_states
      return [model.layernorm(hs[i + 1]) for i in indices]
  for _ in range(warmup):
    run()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return {"compile_s": 0.0, "median_s": float(np.median(times)),
          "min_s": float(np.min(times))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="vitb14_reg")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=256, help="generator resolution")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--torch", action="store_true",
                  help="also time HF transformers' Dinov2WithRegistersModel")
  ap.add_argument("--out", default=os.path.join("bench", "results", NAME + ".json"))
  args = ap.parse_args(argv)

  cfg = dv.dinov2_config(args.variant, dtype=args.dtype)
  dino_size = 224 * (args.size // 256) if args.size >= 256 else 224
  graphdef, state = build(cfg)
  images = np.random.default_rng(1).integers(
      0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  images = jnp.asarray(images)
  indices = (8, 9, 10, 11) if cfg.depth == 12 else tuple(range(cfg.depth - 4, cfg.depth))

  def preprocess(x):
    return dv.preprocess_for_dinov2(x, dino_size)

  def extract(st, x):
    model = nnx.merge(graphdef, st)
    return model.intermediate_layers(preprocess(x), indices=indices, norm=True)

  rows = [("preprocess", timed(preprocess, (images,), args.iters, args.warmup)),
          ("extract (preprocess + blocks + norm)",
           timed(extract, (state, images), args.iters, args.warmup))]
  if args.torch:
    rows.append(("torch HF reference (same extraction)",
                 torch_reference(cfg, images, dino_size, indices, args.iters,
                                 args.warmup)))
  results = []
  print(f"DINOv2 {args.variant} ({cfg.dim}d x {cfg.depth}, {cfg.num_registers} reg), "
        f"{args.size}->{dino_size}px, batch {args.batch}, {args.dtype}, "
        f"taps {indices}, device {jax.devices()[0].device_kind}")
  print(f"{'stage':40s} {'compile s':>10s} {'ms/batch':>10s} {'img/s':>8s}")
  for name, r in rows:
    ips = args.batch / r["median_s"]
    print(f"{name:40s} {r['compile_s']:10.1f} {1e3 * r['median_s']:10.1f} {ips:8.2f}")
    results.append(dict(stage=name, images_per_s=ips, **r))
  out = dict(name=NAME, variant=args.variant, batch=args.batch, size=args.size,
             dino_size=dino_size, dtype=args.dtype, iters=args.iters,
             indices=list(indices), jax=jax.__version__,
             device=str(jax.devices()[0].device_kind), cpus=os.cpu_count(),
             machine=platform.machine(), results=results)
  bench_io.write_json(args.out, out)


if __name__ == "__main__":
  main()
