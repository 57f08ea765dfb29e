"""Throughput of FID Inception feature extraction (pool3 + logits).

Random weights (real architecture, 23.9M parameters), 256x256 inputs resized
to 299x299 inside the jitted function as pytorch-fid does.  Prints a table and
writes JSON.

  python bench/inception_throughput.py                 # batch 8, fp32
  python bench/inception_throughput.py --batch 2 --iters 2 --dtype float32,bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from glue_jax.models.inception_weights import random_inception  # noqa: E402
import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)



def bench_one(dtype_name: str, batch: int, size: int, iters: int,
              warmup: int) -> dict:
  """Compile time and steady-state img/s for one compute dtype."""
  model = random_inception(0, dtype=jnp.dtype(dtype_name))
  graphdef, state = nnx.split(model)

  @jax.jit
  def extract(state, images):
    out = nnx.merge(graphdef, state)(images)
    return out["pool3"], out["logits"]

  images = jnp.asarray(np.random.default_rng(0).uniform(
      0, 1, (batch, size, size, 3)).astype(np.float32))
  t0 = time.perf_counter()
  jax.block_until_ready(extract(state, images))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(extract(state, images))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(extract(state, images))
    times.append(time.perf_counter() - t0)
  step = float(np.median(times))
  return {"dtype": dtype_name, "batch": batch, "input": size,
          "compile_plus_first_s": round(compile_s, 3),
          "median_step_s": round(step, 4), "min_step_s": round(min(times), 4),
          "img_per_s": round(batch / step, 2)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dtype", default="float32",
                 help="comma-separated compute dtypes, e.g. float32,bfloat16")
  p.add_argument("--out", default=os.path.join("bench", "results",
                                                "inception_throughput.json"))
  args = p.parse_args(argv)

  rows = [bench_one(d.strip(), args.batch, args.size, args.iters, args.warmup)
          for d in args.dtype.split(",") if d.strip()]
  dev = jax.devices()[0]
  print(f"FID Inception v3 (pool3 + logits), {args.size}x{args.size} -> 299, "
        f"device {dev.platform} ({dev.device_kind}), "
        f"{os.cpu_count()} host cores")
  print(f"{'dtype':>9} {'batch':>5} {'compile+1st s':>13} {'step s':>8} {'img/s':>8}")
  for r in rows:
    print(f"{r['dtype']:>9} {r['batch']:>5} {r['compile_plus_first_s']:>13.2f} "
          f"{r['median_step_s']:>8.3f} {r['img_per_s']:>8.2f}")
  result = {"benchmark": "inception_throughput", "jax": jax.__version__,
            "platform": dev.platform, "device_kind": dev.device_kind,
            "host": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "iters": args.iters, "rows": rows}
  bench_io.write_json(args.out, result)


if __name__ == "__main__":
  main()
