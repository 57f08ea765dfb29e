"""Forward and train-step throughput of SiT and REGLUE at 256x256 (random weights).

For each model (SiT-S/2, SiT-B/2 on the 32x32x4 latent of a 256 px image) and
method ('sit': plain SiT; 'reglue': +16 semantic channels, a 768-d global
token and a 768-d REPA projector) times
- the eval forward, jitted ``nnx.merge(graphdef, params)(x, t, y, g)``, and
- the full train step (``make_train_step`` with AdamW + EMA, state donated),
reporting compile time separately from steady-state images/s.

FLOPs per step come from XLA's cost analysis and from an analytic count.
XLA counts a ``lax.scan`` body once, not once per layer, so the XLA figure is
taken from the same function built with ``scan_layers=False`` (lowered only,
``Lowered.cost_analysis()``; never compiled or run); the executable's own
(scanned) figure is kept in the JSON as ``xla_flops_scanned``.  The analytic
count is ``2 * tokens * (per-token matmul weights) + 2 * (per-sample matmul
weights) + 4 * L * T^2 * D`` per image forward, and 3x that for training.
The FLOP/s and MFU columns use XLA's figure when there is one.  MFU is
against a matmul peak measured in the same run (f32 on CPU; bf16 and f32 on
GPU, MFU against the run's compute dtype).

  python bench/sit_throughput.py                     # CPU: batch 4, f32, 1 iter
  python bench/sit_throughput.py --models B/2 --methods reglue --iters 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_jax import methods as methods_lib  # noqa: E402
from glue_jax import models  # noqa: E402
from glue_jax.models import sit  # noqa: E402
from glue_jax.train import step as step_lib  # noqa: E402
from glue_jax.transport import objective  # noqa: E402
from glue_jax.transport import losses  # noqa: E402
import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)


NAME = "sit_throughput"
ENCODER_DIM = 768          # DINOv2-B: width of [CLS] and of the REPA targets
GPU_BATCH = {"S/2": 128, "B/2": 64}
# Per-image (not per-token) matmuls: adaLN, timestep MLP, global token in/out.
PER_SAMPLE = ("blocks/adaln", "final_adaln", "t_embed", "global_in", "global_out")


def xla_flops(cost) -> float | None:
  """The 'flops' entry of a cost analysis (a dict, or a list of dicts)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def lowered_flops(fn, *args) -> float | None:
  """XLA's flops of ``jax.jit(fn)`` lowered (not compiled) on ``args``."""
  try:
    return xla_flops(jax.jit(fn).lower(*args).cost_analysis())
  except Exception as e:  # pylint: disable=broad-except
    print(f"  (no XLA cost analysis: {type(e).__name__}: {e})")
    return None


def analytic_forward_flops(cfg: sit.SiTConfig, params: dict) -> float:
  """Matmul + attention FLOPs of one image's forward pass."""
  per_token = per_sample = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if not name.endswith("kernel"):
      continue                     # biases, norms and the label table
    size = int(np.prod(leaf.shape))
    if name.startswith(PER_SAMPLE):
      per_sample += size
    else:
      per_token += size
  t, d = cfg.num_tokens, cfg.hidden_size
  return 2.0 * (t * per_token + per_sample) + 4.0 * cfg.depth * t * t * d


def measure_peak(dtype, n: int, reps: int, inner: int) -> float:
  """Best FLOP/s of a jitted ``n x n @ n x n`` matmul in ``dtype``."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, b))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [mm(a, b) for _ in range(inner)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - t0) / inner)
  return 2.0 * n ** 3 / best


def time_calls(call, iters: int, warmup: int) -> dict:
  """Seconds of ``call()`` (which returns arrays to wait on), warmup apart."""
  first = []
  for _ in range(warmup):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first.append(time.perf_counter() - t0)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
          "times_s": times, "warmup_s": first}


def make_batch(method: methods_lib.Method, b: int, seed: int = 1) -> dict:
  """A random data batch with every entry the method needs."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.standard_normal((b,) + s, np.float32))
  batch = {"latents": normal(32, 32, 4),
           "label": jnp.asarray(rng.integers(0, 1000, b), jnp.int32)}
  need = method.required_features()
  if "semantic" in need:
    batch["semantic"] = normal(16, 16, method.semantic_channels)
  if "cls" in need:
    batch["cls"] = normal(ENCODER_DIM)
  if "align_target" in need:
    batch["align_target"] = normal(256, ENCODER_DIM)
  return batch


def bench_one(model: str, method_name: str, args, batch_size: int) -> dict:
  """Forward and train-step timings and FLOPs of one (model, method)."""
  method = methods_lib.get(method_name)
  cfg = sit.config_for(model, input_size=32, dtype=args.dtype,
                       attention_impl=args.attention_impl,
                       **method.network_overrides(encoder_dim=ENCODER_DIM))
  unrolled = nnx.graphdef(models.build(
      "sit", dataclasses.replace(cfg, scan_layers=False), abstract=True))
  t0 = time.perf_counter()
  graphdef, state = models.init("sit", cfg, seed=0)
  init_s = time.perf_counter() - t0
  params = nnx.to_pure_dict(state)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  batch = make_batch(method, batch_size)
  loss_cfg = losses.LossConfig(**method.loss_overrides())
  step_cfg = objective.StepConfig(method=method, loss=loss_cfg)
  tx = step_lib.make_optimizer()
  key = jax.random.key(0)

  # (a) eval forward on the prepared (scaled, concatenated) inputs.
  lb = methods_lib.prepare_batch(method, batch, key, latent_scale=0.18215)
  fwd_args = (params, lb["x"], jnp.full((batch_size,), 0.5), lb["y"], lb.get("global"))

  def forward_of(gd):
    return lambda p, x, t, y, g: nnx.merge(gd, p)(x, t, y, g)
  t0 = time.perf_counter()
  fwd = jax.jit(forward_of(graphdef)).lower(*fwd_args).compile()
  fwd_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  fwd_xla = lowered_flops(forward_of(unrolled), *fwd_args)
  cost_s = time.perf_counter() - t0
  fwd_scanned = xla_flops(fwd.cost_analysis())
  fwd_t = time_calls(lambda a=fwd_args: fwd(*a), args.iters, args.warmup)

  # (b) full train step, state donated and threaded through the calls.
  train_state = jax.jit(lambda p: step_lib.init_state(p, tx))(params)
  del params, fwd_args
  t0 = time.perf_counter()
  train_xla = lowered_flops(objective.make_train_step(unrolled, tx, step_cfg),
                            train_state, batch, key)
  cost_s += time.perf_counter() - t0
  t0 = time.perf_counter()
  train = jax.jit(objective.make_train_step(graphdef, tx, step_cfg),
                  donate_argnums=0).lower(train_state, batch, key).compile()
  train_compile = time.perf_counter() - t0
  train_scanned = xla_flops(train.cost_analysis())
  holder = [train_state, None]

  def one_step():
    holder[0], holder[1] = train(holder[0], batch, key)
    return holder
  train_t = time_calls(one_step, args.iters, args.warmup)

  fwd_analytic = analytic_forward_flops(cfg, holder[0]["params"]) * batch_size
  train_flops = train_xla or 3.0 * fwd_analytic
  return dict(
      model=model, method=method_name, dtype=args.dtype, batch=batch_size,
      params=n_params, tokens=cfg.num_tokens, in_channels=cfg.in_channels,
      init_s=init_s, xla_cost_s=cost_s,
      fwd_compile_s=fwd_compile, train_compile_s=train_compile,
      fwd=fwd_t, train=train_t,
      fwd_images_per_s=batch_size / fwd_t["median_s"],
      train_images_per_s=batch_size / train_t["median_s"],
      fwd_flops_xla=fwd_xla, fwd_flops_analytic=fwd_analytic,
      train_flops_xla=train_xla, train_flops_analytic=3.0 * fwd_analytic,
      xla_flops_scanned={"fwd": fwd_scanned, "train": train_scanned},
      flops_source="xla" if train_xla else "analytic",
      fwd_flop_per_s=(fwd_xla or fwd_analytic) / fwd_t["median_s"],
      train_flop_per_s=train_flops / train_t["median_s"],
      final_loss=float(holder[1]["loss"]))


def main(argv=None):
  backend = jax.default_backend()
  gpu = backend in ("gpu", "cuda", "rocm")
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="S/2,B/2")
  ap.add_argument("--methods", default="sit,reglue")
  ap.add_argument("--batch", type=int, default=0,
                  help="0: 4 on CPU, per-model defaults on GPU")
  ap.add_argument("--iters", type=int, default=3 if gpu else 1,
                  help="timed calls (3 on GPU; 1 on CPU, where a B/2 step is ~25 s)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="bfloat16" if gpu else "float32",
                  choices=["float32", "bfloat16"])
  ap.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"])
  ap.add_argument("--peak-size", type=int, default=8192 if gpu else 2048)
  ap.add_argument("--out", default=os.path.join("bench", "results", NAME + ".json"))
  args = ap.parse_args(argv)

  load_before = os.getloadavg()
  t_start = time.perf_counter()
  peak_dtypes = ["bfloat16", "float32"] if gpu else ["float32"]
  if args.dtype not in peak_dtypes:
    peak_dtypes.insert(0, args.dtype)
  peaks = {d: measure_peak(getattr(jnp, d), args.peak_size, reps=3, inner=10 if gpu else 1)
           for d in peak_dtypes}
  peak = peaks[args.dtype]
  device = str(jax.devices()[0].device_kind)
  print(f"SiT throughput, 256x256 (latent 32x32x4), {backend} ({device}), "
        f"{os.cpu_count()} cpus, load avg {load_before[0]:.2f}/{load_before[1]:.2f}")
  print("matmul peak " + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items())
        + f" ({args.peak_size}^3)")

  results = []
  for model in args.models.split(","):
    for method in args.methods.split(","):
      bs = args.batch or (GPU_BATCH.get(model, 32) if gpu else 4)
      r = bench_one(model, method, args, bs)
      r["mfu_train"] = r["train_flop_per_s"] / peak
      r["mfu_fwd"] = r["fwd_flop_per_s"] / peak
      r["load_avg_1m_after"] = os.getloadavg()[0]
      results.append(r)
      print(f"  done {model} {method} ({time.perf_counter() - t_start:.0f} s)", flush=True)

  load_after = os.getloadavg()
  print(f"\nload avg 1 min: {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"FLOP/s and MFU use XLA's count (unrolled lowering) where available; "
        f"MFU vs {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
  print("| model | method | dtype | batch | fwd img/s | train img/s | train GFLOP/s "
        "| MFU % (train/fwd) | compile s (fwd/train) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| SiT-{r['model']} | {r['method']} | {r['dtype']} | {r['batch']} "
          f"| {r['fwd_images_per_s']:.2f} | {r['train_images_per_s']:.2f} "
          f"| {r['train_flop_per_s'] / 1e9:.1f} | {100 * r['mfu_train']:.1f} / "
          f"{100 * r['mfu_fwd']:.1f} | {r['fwd_compile_s']:.1f} / "
          f"{r['train_compile_s']:.1f} |")
  print("\nGFLOP per step (XLA unrolled / analytic / XLA scanned executable):")
  for r in results:
    g = lambda v: f"{v / 1e9:.0f}" if v else "n/a"
    print(f"  SiT-{r['model']} {r['method']}: fwd {g(r['fwd_flops_xla'])} / "
          f"{g(r['fwd_flops_analytic'])} / {g(r['xla_flops_scanned']['fwd'])}, "
          f"train {g(r['train_flops_xla'])} / {g(r['train_flops_analytic'])} / "
          f"{g(r['xla_flops_scanned']['train'])}")
  out = dict(name=NAME, backend=backend, device=device, cpus=os.cpu_count(),
             machine=platform.machine(), jax=jax.__version__, dtype=args.dtype,
             iters=args.iters, warmup=args.warmup, peak_size=args.peak_size,
             peak_flop_per_s=peaks, load_avg_before=load_before,
             load_avg_after=load_after, total_s=time.perf_counter() - t_start,
             flops_note="FLOP/s and MFU use XLA's flops of the scan_layers=False "
                        "lowering when available (the scanned executable counts "
                        "the layer loop body once), else the analytic count",
             results=results)
  bench_io.write_json(args.out, out)


if __name__ == "__main__":
  main()
