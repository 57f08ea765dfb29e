"""Throughput of the full-size SD VAE (random weights) on the local device.

Encodes ``size x size x 3`` images to ``size/8 x size/8 x 4`` posterior
moments and decodes latents back; reports compile time and steady-state
images/s separately.  ``--torch`` also times diffusers' ``AutoencoderKL`` on
the CPU for reference.

  python bench/vae_throughput.py                 # batch 4, 256x256, fp32
  python bench/vae_throughput.py --iters 3 --warmup 1 --dtype bfloat16

On a 2-core CPU one fp32 batch of 4 takes roughly 1 min (encode) and 2 min
(decode), so the defaults time a single ahead-of-time-compiled run of each.
  python bench/vae_throughput.py --batch 1 --iters 1 --size 128
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
from glue_jax.models import vae as vae_lib  # noqa: E402
import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)


NAME = "vae_throughput"


def build(cfg: vae_lib.VAEConfig, seed: int = 0):
  """Random-weight model as (graphdef, state).

  Weights are drawn with numpy (fan-in scaled normals, unit norm scales):
  traced or eager JAX initialisation of 84M parameters takes about a minute
  on a small CPU, and the values do not matter for throughput.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: vae_lib.AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "scale" in names[-2:]:  # GroupNorm scale (last entry may be '.value')
      return jnp.ones(leaf.shape, jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    std = 0.02 if len(leaf.shape) == 1 else 1.0 / np.sqrt(fan_in)
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * std)

  state = jax.tree_util.tree_map_with_path(draw, abstract)
  return graphdef, jax.block_until_ready(state)


def time_op(graphdef, state, method: str, x: np.ndarray, iters: int, warmup: int):
  fn = jax.jit(lambda st, a: getattr(nnx.merge(graphdef, st), method)(a))
  t0 = time.perf_counter()
  compiled = fn.lower(state, x).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    out = jax.block_until_ready(compiled(state, x))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = jax.block_until_ready(compiled(state, x))
  per_iter = (time.perf_counter() - t0) / iters
  shape = jax.tree.leaves(out)[0].shape
  return dict(op=method, batch=x.shape[0], input=list(x.shape), output=list(shape),
              compile_s=compile_s, s_per_iter=per_iter,
              img_per_s=x.shape[0] / per_iter)


def time_torch(batch: int, size: int, iters: int, warmup: int):
  import torch
  from diffusers import AutoencoderKL
  cfg = vae_lib.VAEConfig().to_diffusers()
  cfg.pop("_class_name")
  ref = AutoencoderKL(**cfg).eval()
  x = torch.rand(batch, 3, size, size) * 2 - 1
  z = torch.randn(batch, 4, size // 8, size // 8)
  rows = []
  for op, f in (("encode_moments", lambda: ref.encode(x).latent_dist.mean),
                ("decode", lambda: ref.decode(z).sample)):
    with torch.no_grad():
      for _ in range(warmup):
        f()
      t0 = time.perf_counter()
      for _ in range(iters):
        f()
    per_iter = (time.perf_counter() - t0) / iters
    rows.append(dict(op=f"torch {op}", batch=batch, s_per_iter=per_iter,
                     img_per_s=batch / per_iter, threads=torch.get_num_threads()))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256, help="image side (pixels)")
  p.add_argument("--iters", type=int, default=1, help="timed iterations")
  p.add_argument("--warmup", type=int, default=0, help="untimed runs after compile")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--ops", default="encode_moments,decode")
  p.add_argument("--torch", action="store_true", help="also time diffusers (CPU)")
  p.add_argument("--out", default=os.path.join("bench", "results", f"{NAME}.json"))
  args = p.parse_args(argv)

  cfg = vae_lib.VAEConfig(dtype=jnp.dtype(args.dtype))
  t0 = time.perf_counter()
  graphdef, state = build(cfg)
  init_s = time.perf_counter() - t0
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
  rng = np.random.default_rng(0)
  f = cfg.downsample_factor
  inputs = {
      "encode_moments": rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)),
      "decode": rng.standard_normal((args.batch, args.size // f, args.size // f,
                                     cfg.latent_channels)),
  }
  rows = [time_op(graphdef, state, op, inputs[op].astype(np.float32), args.iters,
                  args.warmup) for op in args.ops.split(",")]
  if args.torch:
    rows += time_torch(args.batch, args.size, args.iters, args.warmup)

  print(f"SD-VAE ({n_params / 1e6:.1f}M params, {args.dtype}) on "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}; init {init_s:.1f}s")
  print(f"{'op':<22}{'batch':>6}{'compile s':>11}{'s/iter':>9}{'img/s':>9}")
  for r in rows:
    print(f"{r['op']:<22}{r['batch']:>6}{r.get('compile_s', float('nan')):>11.1f}"
          f"{r['s_per_iter']:>9.2f}{r['img_per_s']:>9.2f}")
  result = dict(name=NAME, size=args.size, dtype=args.dtype, iters=args.iters,
                params=n_params, init_s=init_s, rows=rows,
                device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax=jax.__version__, cpu_count=os.cpu_count(),
                machine=platform.machine())
  bench_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
