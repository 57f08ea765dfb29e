"""One command for a lent GPU: REGLUE train / sample / precompute throughput vs peak.

  python bench/gpu_run.py [--official /path/to/giorgospets/reglue] [--budget 450]
  python bench/gpu_run.py --dry-run          # the same code at tiny shapes on CPU (CI)

Needs jax[cuda], flax, optax (and torch + timm for the official column);
nothing of grain, clu, ml_collections or TFDS is imported.  Sections, in
order, each skipped (and recorded as skipped) once ``--budget`` seconds are
spent:

1. environment: versions, device, bf16 / fp32 matmul peak measured here;
2. bf16 vs fp32: one REGLUE B/2 train step from the same state and batch
   in both compute dtypes (loss, gradient norm, parameter update);
3. attention: ``xla`` vs ``cudnn`` (``jax.nn.dot_product_attention``): the
   same forward's outputs compared, and the train step timed with each;
4. train step (``glue_jax.transport.objective``: the trainer's step): REGLUE
   B/2 and XL/2, bf16, two batch sizes, remat off / full: img/s, TFLOP/s and
   MFU (analytic model FLOPs: 3 x forward, no recompute) against the bf16
   matmul peak of step 1;
5. the official PyTorch step (``--official``, a checkout of
   giorgospets/reglue; never vendored): bf16 autocast + TF32 as released,
   and with ``torch.compile`` (``bench/train_step.py`` builds it);
6. the 250-step SDE sampler with CFG vs its forward bound (NFE x one forward
   at the batch it runs: 2B inside the CFG interval, B outside);
7. feature precompute (SD-VAE encode + DINOv2-B/14 blocks 8-11 + compressor).

Writes ``bench/results/gpu_run.json`` (``gpu_run_dry.json`` for the dry run)
and prints a table.  Numbers of a dry run are not measurements of anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # bench_io, ...
from glue_jax import methods as methods_lib  # noqa: E402
from glue_jax import models  # noqa: E402
from glue_jax.models import sit  # noqa: E402
from glue_jax.train import step as step_lib  # noqa: E402
from glue_jax.transport import losses, objective  # noqa: E402
import bench_io  # noqa: E402
import sit_throughput as st  # noqa: E402
import train_step as ts  # noqa: E402
import workloads  # noqa: E402

NAME = "gpu_run"
METHOD = "reglue"
TINY = dict(depth=2, hidden_size=64, num_heads=2, encoder_depth=1, projector_dim=64)
# (model, batches) of section 4; the dry run: TINY at one batch (compile time).
GPU_ROWS = (("B/2", (64, 128)), ("XL/2", (32, 64)))
DRY_ROWS = (("B/2", (2,)),)


class Budget:
  def __init__(self, seconds: float):
    self.t0, self.seconds = time.perf_counter(), seconds

  def spent(self) -> float:
    return time.perf_counter() - self.t0

  def left(self) -> float:
    return self.seconds - self.spent()


def net_cfg(model: str, dtype: str, *, dry: bool, **over) -> sit.SiTConfig:
  method = methods_lib.get(METHOD)
  kw = dict(input_size=32, dtype=dtype, **method.network_overrides(encoder_dim=st.ENCODER_DIM))
  if dry:
    kw.update(TINY)
  kw.update(over)
  return sit.config_for(model, **kw)


class Ours:
  """The trainer's REGLUE step, jitted with the state donated, on one device."""

  def __init__(self, cfg: sit.SiTConfig, batch: dict, seed: int = 0):
    method = methods_lib.get(METHOD)
    self.cfg = cfg
    step_cfg = objective.StepConfig(method=method,
                                    loss=losses.LossConfig(**method.loss_overrides()))
    self.tx = step_lib.make_optimizer()
    graphdef, state = models.init("sit", cfg, seed=seed)
    params = nnx.to_pure_dict(state)
    self.model_flops = 3.0 * st.analytic_forward_flops(cfg, params) * len(batch["label"])
    self.batch = jax.device_put(batch)
    self.key = jax.random.key(0)
    self.state = jax.jit(lambda p: step_lib.init_state(p, self.tx))(params)
    fn = objective.make_train_step(graphdef, self.tx, step_cfg)
    t0 = time.perf_counter()
    self.fn = jax.jit(fn, donate_argnums=0).lower(self.state, self.batch, self.key).compile()
    self.compile_s = time.perf_counter() - t0
    self.metrics = None

  def step(self):
    self.state, self.metrics = self.fn(self.state, self.batch, self.key)
    jax.block_until_ready(self.metrics)


def time_it(fn, iters: int, warmup: int) -> float:
  """Median seconds of ``fn()`` (which waits for its own results)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


# -- sections ---------------------------------------------------------------------
def environment(args) -> dict:
  out = dict(ts.versions(), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
             devices=jax.device_count(), cpus=os.cpu_count(), machine=platform.machine(),
             dry_run=args.dry_run)
  for name in ("grain", "clu", "ml_collections", "tensorflow_datasets"):
    out[f"{name}_imported"] = name in sys.modules
  n, inner = (256, 1) if args.dry_run else (8192, 10)
  out["peak_flop_per_s"] = {d: st.measure_peak(getattr(jnp, d), n, reps=3, inner=inner)
                            for d in ("bfloat16", "float32")}
  return out


def agreement(args) -> dict:
  """One step of fp32 and of bf16 from the same initial state and batch."""
  b = 2 if args.dry_run else 16
  batch = st.make_batch(methods_lib.get(METHOD), b)
  res = {}
  for dtype in ("float32", "bfloat16"):
    o = Ours(net_cfg("B/2", dtype, dry=args.dry_run), batch)
    p0 = jax.tree.map(np.asarray, o.state["params"])
    o.step()
    upd = jax.tree.map(lambda a, b_: np.asarray(a) - b_, o.state["params"], p0)
    res[dtype] = dict(loss=float(o.metrics["loss"]), grad_norm=float(o.metrics["grad_norm"]),
                      update=upd)
  f, h = res["float32"], res["bfloat16"]
  uf = np.concatenate([x.ravel() for x in jax.tree.leaves(f["update"])])
  uh = np.concatenate([x.ravel() for x in jax.tree.leaves(h["update"])])
  return dict(batch=b, loss_fp32=f["loss"], loss_bf16=h["loss"],
              loss_rel_diff=abs(h["loss"] - f["loss"]) / abs(f["loss"]),
              grad_norm_fp32=f["grad_norm"], grad_norm_bf16=h["grad_norm"],
              grad_norm_rel_diff=abs(h["grad_norm"] - f["grad_norm"]) / abs(f["grad_norm"]),
              update_cosine=float(uf @ uh / (np.linalg.norm(uf) * np.linalg.norm(uh) + 1e-30)))


def attention(args, peak: float) -> dict:
  """cuDNN vs XLA attention: same forward outputs, and the train step timed."""
  b = 2 if args.dry_run else 64
  out = dict(batch=b)
  impls = ["xla", "cudnn"]
  if jax.default_backend() != "gpu":
    out["cudnn"] = "skipped: cuDNN attention needs a GPU"
    impls = ["xla"]
  method = methods_lib.get(METHOD)
  batch = st.make_batch(method, b)
  outs = {}
  for impl in impls:
    cfg = net_cfg("B/2", "bfloat16", dry=args.dry_run, attention_impl=impl)
    graphdef, state = models.init("sit", cfg, seed=0)
    lb = methods_lib.prepare_batch(method, batch, jax.random.key(0), latent_scale=0.18215)
    fwd = jax.jit(lambda p, x, y, g: nnx.merge(graphdef, p)(x, jnp.full((b,), 0.5), y, g))
    outs[impl] = np.asarray(fwd(nnx.to_pure_dict(state), lb["x"], lb["y"], lb["global"])[0],
                            np.float32)
    del state
    o = Ours(cfg, batch)
    s = time_it(o.step, args.iters, args.warmup)
    out[impl] = dict(step_s=s, images_per_s=b / s, mfu=o.model_flops / s / peak,
                     compile_s=o.compile_s)
  if "cudnn" in outs:
    d = np.abs(outs["cudnn"] - outs["xla"])
    out["max_abs_diff"] = float(d.max())
    out["rel_l2_diff"] = float(np.linalg.norm(d) / (np.linalg.norm(outs["xla"]) + 1e-30))
  return out


def train_rows(args, peak: float, budget: Budget) -> list[dict]:
  rows = []
  method = methods_lib.get(METHOD)
  for model, batches in (DRY_ROWS if args.dry_run else GPU_ROWS):
    for b in batches:
      for remat in ("none", "full"):
        if budget.left() < args.reserve:
          rows.append(dict(model=model, batch=b, remat=remat, skipped="time budget"))
          continue
        row = dict(model=model, batch=b, remat=remat, dtype="bfloat16")
        try:
          o = Ours(net_cfg(model, "bfloat16", dry=args.dry_run, remat=remat,
                           attention_impl=args.attention), st.make_batch(method, b))
          s = time_it(o.step, args.iters, args.warmup)
          row.update(step_s=s, images_per_s=b / s, model_flops=o.model_flops,
                     tflop_per_s=o.model_flops / s / 1e12, mfu=o.model_flops / s / peak,
                     compile_s=o.compile_s, loss=float(o.metrics["loss"]))
          del o
        except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"  train {row}", flush=True)
  return rows


def official(args, peak: float, budget: Budget) -> list[dict]:
  """The released PyTorch step (bf16 autocast + TF32), eager and torch.compile'd."""
  import torch
  gpu = jax.default_backend() == "gpu"
  identity = ts.official_identity(args.official)
  rows = []
  for model, batches in ((("small", (2,)),) if args.dry_run else (("B/2", (64,)), ("XL/2", (32,)))):
    b = batches[0]
    batch = st.make_batch(methods_lib.get(METHOD), b)
    flops = 3.0 * st.analytic_forward_flops(
        ts.net_config(model, "float32"),
        nnx.to_pure_dict(nnx.state(models.build("sit", ts.net_config(model, "float32"),
                                                abstract=True)))) * b
    for compiled in (False, True):
      if budget.left() < args.reserve:
        rows.append(dict(model=model, batch=b, torch_compile=compiled, skipped="time budget"))
        continue
      row = dict(model=model, batch=b, torch_compile=compiled, official=identity)
      original = ts.build_official
      try:
        if compiled:
          ts.build_official = lambda *a, **k: torch.compile(original(*a, **k))
        side = ts.setup_official(args.official, model, batch, gpu)
        s = time_it(side.step, args.iters, args.warmup)
        row.update(step_s=s, images_per_s=b / s, tflop_per_s=flops / s / 1e12,
                   mfu=flops / s / peak, loss=side.loss(), facts=side.facts)
        del side
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      finally:
        ts.build_official = original
      if gpu:
        torch.cuda.empty_cache()
      rows.append(row)
      print(f"  official {row.get('model')} compile={compiled}: "
            f"{row.get('images_per_s', row.get('error'))}", flush=True)
  return rows


def sampler(args) -> dict:
  """Full sampler (SDE, CFG 2.8 on [0, 0.9]) vs NFE x one forward."""
  b = 2 if args.dry_run else 64
  steps = 8 if args.dry_run else args.sampler_steps
  cfg = net_cfg("B/2", "bfloat16", dry=args.dry_run, attention_impl=args.attention)
  _, state = models.init("sit", cfg, seed=0)
  params = nnx.to_pure_dict(state)
  smp = jax.jit(workloads.sampler(cfg, num_steps=steps))
  labels, seeds = jnp.arange(b) % 1000, jnp.arange(b)
  t0 = time.perf_counter()
  jax.block_until_ready(smp(params, labels, seeds))
  first = time.perf_counter() - t0
  s = time_it(lambda: jax.block_until_ready(smp(params, labels, seeds)), max(args.iters // 2, 1), 0)
  fwd = jax.jit(workloads.forward(cfg))
  times = {}
  for n in (b, 2 * b):
    x, t, y, g = (jnp.zeros(a.shape, a.dtype) for a in workloads.forward_inputs(cfg, n))
    times[n] = time_it(lambda: jax.block_until_ready(fwd(params, x, t, y, g)),
                       args.iters, args.warmup)
  grid = np.asarray(workloads.samplers.sde_time_grid(steps, workloads.REGLUE_CFG.t_last))[:-1]
  lo, hi = workloads.REGLUE_CFG.interval
  guided = int(np.sum((grid >= lo) & (grid <= hi)))
  bound = guided * times[2 * b] + (steps - guided) * times[b]
  return dict(model="B/2", batch=b, steps=steps, guided_steps=guided, sample_s=s,
              first_call_s=first, forward_s={str(k): v for k, v in times.items()},
              forward_bound_s=bound, overhead=s / bound - 1.0, images_per_s=b / s)


def precompute(args) -> dict:
  b = 2 if args.dry_run else 64
  shape = workloads.PrecomputeShape(dtype="bfloat16")
  if args.dry_run:
    shape = dataclasses.replace(shape, image_size=32, dinov2_overrides=(
        ("dim", 32), ("depth", 12), ("num_heads", 2)), vae_channels=(8, 8, 8, 8), vae_groups=4,
        compressor_hidden=8)
  fn, _ = workloads.precompute(shape)

  def make():
    enc, ae = workloads.precompute_module(shape)
    return {"enc": nnx.to_pure_dict(nnx.state(enc)), "vae": nnx.to_pure_dict(nnx.state(ae))}
  params = jax.jit(make)()
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (b, shape.image_size, shape.image_size, 3), np.uint8))
  f = jax.jit(fn)
  t0 = time.perf_counter()
  out = jax.block_until_ready(f(params, images))
  compile_s = time.perf_counter() - t0
  s = time_it(lambda: jax.block_until_ready(f(params, images)), args.iters, args.warmup)
  return dict(batch=b, image_size=shape.image_size, dtype=shape.dtype, step_s=s,
              images_per_s=b / s, first_call_s=compile_s,
              outputs={k: list(v.shape) for k, v in out.items()})


# -- main -------------------------------------------------------------------------
def run_section(name, fn, out, budget, args, *a):
  if budget.left() < args.reserve:
    out[name] = {"skipped": "time budget"}
    return None
  t0 = time.perf_counter()
  print(f"[{budget.spent():5.0f} s] {name} ...", flush=True)
  try:
    out[name] = fn(*a)
  except Exception as e:  # pylint: disable=broad-except
    out[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                 "traceback": traceback.format_exc()[-2000:]}
    print(f"  {name} failed: {out[name]['error']}", flush=True)
    if args.strict:
      raise
  if isinstance(out[name], dict):
    out[name]["section_s"] = time.perf_counter() - t0
  return out[name]


def print_table(out):
  env = out["environment"]
  peak = env["peak_flop_per_s"]
  print(f"\n{env['device']} ({env['backend']}), jax {env['jax']}, torch {env.get('torch')}; "
        f"matmul peak bf16 {peak['bfloat16'] / 1e12:.1f} TFLOP/s, fp32 "
        f"{peak['float32'] / 1e12:.1f} TFLOP/s" + ("  [DRY RUN: tiny shapes]" if env["dry_run"] else ""))
  a = out.get("agreement", {})
  if "loss_rel_diff" in a:
    print(f"bf16 vs fp32 step: loss rel diff {a['loss_rel_diff']:.2e}, grad-norm rel diff "
          f"{a['grad_norm_rel_diff']:.2e}, update cosine {a['update_cosine']:.4f}")
  at = out.get("attention", {})
  if "xla" in at:
    line = f"attention xla {at['xla']['images_per_s']:.1f} img/s"
    if isinstance(at.get("cudnn"), dict):
      line += (f", cudnn {at['cudnn']['images_per_s']:.1f} img/s, max |diff| "
               f"{at['max_abs_diff']:.2e} (rel L2 {at['rel_l2_diff']:.2e})")
    else:
      line += f", cudnn {at.get('cudnn')}"
    print(line)
  print("| impl | model | batch | remat | img/s | TFLOP/s | MFU % | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in out.get("train", []) if isinstance(out.get("train"), list) else []:
    if "images_per_s" in r:
      print(f"| glue_jax bf16 | {r['model']} | {r['batch']} | {r['remat']} "
            f"| {r['images_per_s']:.1f} | {r['tflop_per_s']:.1f} | {100 * r['mfu']:.1f} "
            f"| {r['compile_s']:.0f} |")
    else:
      print(f"| glue_jax bf16 | {r['model']} | {r['batch']} | {r['remat']} "
            f"| {r.get('skipped') or r.get('error')} | | | |")
  for r in out.get("official", []) if isinstance(out.get("official"), list) else []:
    impl = "official torch bf16+TF32" + (" + torch.compile" if r["torch_compile"] else "")
    if "images_per_s" in r:
      print(f"| {impl} | {r['model']} | {r['batch']} | none | {r['images_per_s']:.1f} "
            f"| {r['tflop_per_s']:.1f} | {100 * r['mfu']:.1f} | |")
    else:
      print(f"| {impl} | {r['model']} | {r['batch']} | none | "
            f"{r.get('skipped') or r.get('error')} | | | |")
  s = out.get("sampler", {})
  if "sample_s" in s:
    print(f"sampler {s['model']} b{s['batch']}, {s['steps']} steps ({s['guided_steps']} "
          f"guided): {s['sample_s']:.2f} s = {s['images_per_s']:.2f} img/s; forward bound "
          f"{s['forward_bound_s']:.2f} s (overhead {100 * s['overhead']:+.1f}%)")
  p = out.get("precompute", {})
  if "images_per_s" in p:
    print(f"precompute b{p['batch']} {p['image_size']} px {p['dtype']}: "
          f"{p['images_per_s']:.1f} img/s")
  for k, v in out.items():
    if isinstance(v, dict) and ("skipped" in v or "error" in v):
      print(f"{k}: {v.get('skipped') or v.get('error')}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (CI)")
  ap.add_argument("--official", default="", help="checkout of giorgospets/reglue")
  ap.add_argument("--budget", type=float, default=0,
                  help="seconds for all sections (0: 420 on GPU, 120 for the dry run)")
  ap.add_argument("--reserve", type=float, default=0,
                  help="skip a section with fewer seconds left (0: 45 GPU, 2 dry run)")
  ap.add_argument("--iters", type=int, default=0, help="timed calls (0: 5 GPU, 1 dry run)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--attention", default=None, choices=[None, "xla", "cudnn"],
                  help="attention of sections 4 and 6 (default: XLA's choice)")
  ap.add_argument("--sampler-steps", type=int, default=250)
  ap.add_argument("--strict", action="store_true", help="a failing section fails the run")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  if args.dry_run:
    if jax.default_backend() != "cpu":
      ap.error("--dry-run runs on CPU: set JAX_PLATFORMS=cpu")
    jax.config.update("jax_disable_most_optimizations", True)   # tiny shapes: compile time rules
  args.budget = args.budget or (120.0 if args.dry_run else 420.0)
  args.reserve = args.reserve or (2.0 if args.dry_run else 45.0)
  args.iters = args.iters or (1 if args.dry_run else 5)
  args.out = args.out or os.path.join("bench", "results",
                                      NAME + ("_dry" if args.dry_run else "") + ".json")
  if args.official and not os.path.isdir(args.official):
    ap.error(f"--official {args.official}: no such directory")
  budget = Budget(args.budget)
  out = {}
  env = run_section("environment", environment, out, budget, args, args)
  peak = env["peak_flop_per_s"]["bfloat16"]
  run_section("agreement", agreement, out, budget, args, args)
  run_section("attention", attention, out, budget, args, args, peak)
  run_section("train", train_rows, out, budget, args, args, peak, budget)
  if args.official:
    run_section("official", official, out, budget, args, args, peak, budget)
  else:
    out["official"] = {"skipped": "no --official checkout given"}
  run_section("sampler", sampler, out, budget, args, args)
  run_section("precompute", precompute, out, budget, args, args)
  out["total_s"] = budget.spent()
  print_table(out)
  bench_io.write_json(args.out, dict(name=NAME, **out))
  return out


if __name__ == "__main__":
  main()
