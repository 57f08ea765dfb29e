"""Compile REGLUE for TPU topologies that are not present; XLA's predictions.

With libtpu installed (``pip install "jax[tpu]==<jax version>"``) XLA compiles
for a TPU topology from its description.  For each (model, topology) the
*real* train step is built from the real config
(``glue_jax/configs/reglue.py:model=...,method=reglue,bf16,tpu=<generation>``: mesh,
sharding rules, remat, scan, dtype from the config; ``glue_jax.train.aot``)
at global batch 256, compiled, and reported per chip:

- arguments / temporaries / peak (arguments + outputs - donated + temporaries)
  against the chip's HBM;
- FLOPs per step: the analytic model count (3 x forward matmuls + attention,
  no rematerialisation; ``bench/sit_throughput.py``) and XLA's count of the
  executable (valid only for unrolled blocks: a ``lax.scan`` body is counted
  once, so a scanned executable's figure is marked);
- ``optimal_seconds``: the TPU compiler's estimate of the step time (also
  counts a scan body once, so only an unrolled step gives a step time;
  negative values mean "no estimate" and are flagged), and from it the
  predicted img/s per chip and MFU against the chip's bf16 peak.

Also (``--sampler``/``--precompute`` topologies): the 250-step SDE sampler
with CFG (its scan body = one guided step, compared with one forward) and
the feature-precompute step (DINOv2-B/14 blocks 8-11 + compressor + SD-VAE
encode).  Every number is a compiler prediction, not a measurement.

  python bench/tpu_compile.py                                  # the full table (slow)
  python bench/tpu_compile.py --models XL/2 --topologies v5e:2x4 --set remat=dots
  python bench/tpu_compile.py --tiny --topologies v5e:2x2 --no-sampler --no-precompute
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # eager work stays on the host CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_jax.configs import reglue  # noqa: E402
from glue_jax.train import aot  # noqa: E402
import bench_io  # noqa: E402
import sit_throughput as st  # noqa: E402
import workloads  # noqa: E402

NAME = "tpu_compile"
# v5p:4x4x4 is 64 chips (Cloud's name for it: v5p-128, v5p names count TensorCores).
TOPOLOGIES = {"v5p:2x2x1": "v5p-8", "v5p:4x4x4": "v5p 64 chips", "v6e:2x4": "v6e-8",
              "v5e:2x4": "v5e-8"}
TINY = dict(depth=2, hidden_size=64, num_heads=2, encoder_depth=1, projector_dim=128)


def config_for(model: str, topology: str, sets: list[str], tiny: bool, batch: int):
  gen = topology.split(":")[0]
  c = reglue.get_config(f"model={model},method=reglue,bf16,tpu={gen}")
  c.train.batch_size = batch
  align = None
  if tiny:
    c.model.overrides = {**dict(c.model.overrides), **TINY}
  for item in sets:
    key, _, val = item.partition("=")
    over = dict(c.model.overrides)
    if key in ("remat", "attention_impl"):
      over[key] = None if val == "none" and key == "attention_impl" else val
    elif key == "scan":
      over["scan_layers"] = val.lower() in ("1", "true", "yes")
    elif key == "mesh":                       # mesh=data:1,fsdp:-1 -> 'data:1;fsdp:-1'
      c.mesh = {k: int(v) for k, v in (p.split(":") for p in val.split(";"))}
    elif key == "align_dtype":
      align = val
    else:
      raise ValueError(f"--set {item}: key must be remat, attention_impl, scan, mesh "
                       "or align_dtype")
    c.model.overrides = over
  return c, align


def train_row(model, topology, devices, args) -> dict:
  chip = aot.chip_of(topology)
  c, align = config_for(model, topology, args.set, args.tiny, args.batch)
  run = aot.build(c, devices, align_dtype=align)
  n, batch = len(devices), args.batch
  abs_params = workloads.abstract_params(lambda: _sit(run.net_cfg))
  model_flops = 3.0 * st.analytic_forward_flops(run.net_cfg, abs_params) * batch
  _, rep = aot.compile_train_step(run)
  cfg = run.net_cfg
  row = dict(kind="train", model=model, topology=topology, name=TOPOLOGIES.get(topology),
             chips=n, chip=chip.name, hbm_gib=chip.hbm_gib, mesh=dict(run.mesh.shape),
             rules=[list(r) for r in run.rules], remat=cfg.remat, scan=cfg.scan_layers,
             dtype=cfg.dtype, attention=cfg.attention_impl or "xla (default)",
             align_dtype=str(run.batch_spec.get("align_target", (0, "-"))[1]),
             global_batch=batch, per_chip_batch=batch / n,
             model_flops_per_step=model_flops, **rep)
  row["fits"] = rep["peak_gib"] <= chip.hbm_gib
  row["xla_flops_valid"] = not cfg.scan_layers
  _predict(row, rep.get("optimal_seconds"), model_flops / n, batch / n, chip,
           valid=not cfg.scan_layers)
  return row


def _predict(row, seconds, flops_per_chip, items_per_chip, chip, valid):
  row["optimal_seconds_flag"] = ("scanned: body counted once, not a step time" if not valid
                                 else "negative: no estimate" if seconds is None or seconds <= 0
                                 else "")
  ok = valid and seconds is not None and seconds > 0
  row["predicted_step_s"] = seconds if ok else None
  row["predicted_per_chip_per_s"] = items_per_chip / seconds if ok else None
  row["predicted_mfu"] = flops_per_chip / seconds / chip.bf16_peak if ok else None


def sampler_rows(model, topology, devices, args) -> list[dict]:
  """Sampler (scan over steps: see :func:`derive_sampler`) vs one forward."""
  c, align = config_for(model, topology, args.set, args.tiny, args.batch)
  run = aot.build(c, devices, align_dtype=align)
  cfg = dataclasses.replace(run.net_cfg, remat="none")
  n = len(devices)
  b = args.batch
  mesh = run.mesh
  batch_sh = NamedSharding(mesh, P(tuple(mesh.axis_names)))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        workloads.abstract_params(lambda: _sit(cfg)),
                        run.state_shardings["params"])
  with_sh = lambda a, s: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  out = []
  fwd_cfg = dataclasses.replace(cfg, scan_layers=False)
  for name, fn, inputs in (
      ("forward (one, unrolled)", workloads.forward(fwd_cfg),
       [with_sh(a, batch_sh) for a in workloads.forward_inputs(cfg, b)]),
      ("sampler step (SDE + CFG, unrolled blocks)", workloads.sampler(fwd_cfg, num_steps=args.sampler_steps),
       [with_sh(jax.ShapeDtypeStruct((b,), jnp.int32), batch_sh)] * 2)):
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(params, *inputs).compile()
    rep_ = aot.analyze(compiled)
    row = dict(kind="sampler", model=model, topology=topology, chips=n, what=name,
               global_batch=b, compile_s=time.perf_counter() - t0, **rep_)
    seconds = rep_.get("optimal_seconds")
    row["optimal_seconds_flag"] = "" if seconds and seconds > 0 else "negative: no estimate"
    out.append(row)
  derive_sampler(out[0], out[1], args.sampler_steps, b, n)
  return out


# The SDE sampler's executable holds the scan body (one step) and, outside the
# scan, the last "mean" step: XLA's flops / optimal_seconds count both once.
# With REGLUE's preset both are guided (t_last = 0.04 is inside [0, 0.9]).
STEPS_IN_SAMPLER_EXECUTABLE = 2


def derive_sampler(fwd: dict, smp: dict, steps: int, batch: int, chips: int) -> None:
  """Per-step figures of the sampler row from XLA's (two-step) executable counts."""
  lo, hi = workloads.REGLUE_CFG.interval
  assert lo <= workloads.REGLUE_CFG.t_last <= hi, "the last step is not guided"
  k = STEPS_IN_SAMPLER_EXECUTABLE
  nfe = workloads.sampler_nfe(workloads.REGLUE_CFG, steps)
  smp["note"] = ("XLA counts the sampler's scan body once, plus the last (mean) step outside "
                 f"the scan: its flops / optimal_seconds are {k} guided steps (each 2 forwards "
                 "at batch B as one 2B batch); per-step figures divide by that")
  smp["steps_in_executable"] = k
  if fwd.get("xla_flops_per_device") and smp.get("xla_flops_per_device"):
    smp["step_over_forward_flops"] = smp["xla_flops_per_device"] / k / fwd["xla_flops_per_device"]
  if fwd.get("optimal_seconds", 0) > 0 and smp.get("optimal_seconds", 0) > 0:
    smp["step_over_forward_seconds"] = smp["optimal_seconds"] / k / fwd["optimal_seconds"]
    smp["predicted_sample_s"] = smp["optimal_seconds"] / k * steps
    smp["forward_bound_sample_s"] = fwd["optimal_seconds"] * nfe
    smp["predicted_images_per_s_per_chip"] = batch / chips / smp["predicted_sample_s"]
  smp["nfe_per_sample"] = nfe


def _sit(cfg):
  from glue_jax import models
  return models.build("sit", cfg)


def precompute_row(topology, devices, args) -> dict:
  chip = aot.chip_of(topology)
  shape = workloads.PrecomputeShape(dtype="bfloat16")
  if args.tiny:
    shape = dataclasses.replace(shape, image_size=64, dinov2_overrides=(
        ("dim", 64), ("depth", 12), ("num_heads", 2)), vae_channels=(32, 32, 32, 32), vae_groups=8,
        compressor_hidden=32)
  fn, params = workloads.precompute(shape)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  rep = NamedSharding(mesh, P())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), params)
  b = args.batch
  images = jax.ShapeDtypeStruct((b, shape.image_size, shape.image_size, 3), jnp.uint8,
                                sharding=NamedSharding(mesh, P("data")))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn).lower(params, images).compile()
  rep_ = aot.analyze(compiled)
  row = dict(kind="precompute", topology=topology, chips=len(devices), global_batch=b,
             dtype=shape.dtype, compile_s=time.perf_counter() - t0, hbm_gib=chip.hbm_gib,
             note="DINOv2 blocks run in a lax.scan: XLA's flops/optimal_seconds count "
                  "one block once (a lower bound)", **rep_)
  s = rep_.get("optimal_seconds")
  row["optimal_seconds_flag"] = "scanned DINOv2 blocks: a lower bound" if s and s > 0 \
      else "negative: no estimate"
  return row


def print_table(rows):
  print("\nTPU train step, XLA compiler predictions (not measurements):")
  print("| model | topology | chips | mesh | remat | scan | per-chip args / temp / peak GiB "
        "(HBM) | fits | TFLOP/step (model) | optimal_s | img/s/chip | MFU % | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if r["kind"] != "train":
      continue
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items())
    opt = r.get("optimal_seconds")
    f = lambda v, fmt: (fmt.format(v) if v is not None else "n/a")
    print(f"| {r['model']} | {r['topology']} ({r['name']}) | {r['chips']} | {mesh} "
          f"| {r['remat']} | {r['scan']} | {r['argument_gib']:.1f} / {r['temp_gib']:.1f} / "
          f"{r['peak_gib']:.1f} ({r['hbm_gib']:.0f}) | {'yes' if r['fits'] else 'NO'} "
          f"| {r['model_flops_per_step'] / 1e12:.1f} | {f(opt, '{:.4f}')}"
          f"{' (' + r['optimal_seconds_flag'] + ')' if r['optimal_seconds_flag'] else ''} "
          f"| {f(r['predicted_per_chip_per_s'], '{:.1f}')} "
          f"| {f(r['predicted_mfu'] and 100 * r['predicted_mfu'], '{:.1f}')} "
          f"| {r['compile_s']:.0f} |")
  for r in rows:
    if r["kind"] == "train_failed":
      print(f"{r['model']} {r['topology']} {r['sets']}: FAILED {r['error']}")
    if r["kind"] == "sampler":
      print(f"sampler {r['model']} {r['topology']} {r['what']}: batch {r['global_batch']}, "
            f"GFLOP/chip {r.get('xla_flops_per_device', 0) / 1e9:.1f}, optimal_s "
            f"{r.get('optimal_seconds')}, peak {r.get('peak_gib', 0):.2f} GiB"
            + (f", step/forward flops {r['step_over_forward_flops']:.2f}"
               if "step_over_forward_flops" in r else "")
            + (f", step/forward s {r['step_over_forward_seconds']:.2f}, predicted "
               f"{r['predicted_images_per_s_per_chip']:.2f} img/s/chip (250 steps)"
               if "step_over_forward_seconds" in r else ""))
    if r["kind"] == "precompute":
      s = r.get("optimal_seconds")
      rate = f", >= {r['global_batch'] / r['chips'] / s:.0f} img/s/chip bound" \
          if s and s > 0 else ""
      print(f"precompute {r['topology']}: batch {r['global_batch']}, GFLOP/chip "
            f"{r.get('xla_flops_per_device', 0) / 1e9:.1f} (scanned: lower bound), optimal_s "
            f"{s} ({r['optimal_seconds_flag']}){rate}, peak {r.get('peak_gib', 0):.2f} GiB")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="XL/2,B/2")
  ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
  ap.add_argument("--batch", type=int, default=256, help="global batch")
  ap.add_argument("--set", action="append", default=[],
                  help="override: remat=none|dots|full, scan=0|1, attention_impl=..., "
                       "mesh=data:1;fsdp:-1, align_dtype=float32")
  ap.add_argument("--tiny", action="store_true", help="tiny network (CI)")
  ap.add_argument("--no-train", action="store_true")
  ap.add_argument("--sampler", default="v5p:2x2x1", help="topologies ('' = none)")
  ap.add_argument("--sampler-model", default="XL/2")
  ap.add_argument("--sampler-steps", type=int, default=250)
  ap.add_argument("--precompute", default="v5p:2x2x1", help="topologies ('' = none)")
  ap.add_argument("--no-sampler", action="store_true")
  ap.add_argument("--no-precompute", action="store_true")
  ap.add_argument("--out", default=os.path.join("bench", "results", NAME + ".json"))
  args = ap.parse_args(argv)
  if args.tiny:
    args.models = "B/2" if args.models == "XL/2,B/2" else args.models
  rows = []
  t_start = time.perf_counter()

  def flush():
    bench_io.write_json(args.out, dict(
        name=NAME, jax=jax.__version__, libtpu=_libtpu_version(), tiny=args.tiny,
        chips={k: dataclasses.asdict(v) for k, v in aot.CHIPS.items()},
        note="XLA compiler predictions for TPU topologies compiled on a CPU host; "
             "not measurements", total_s=time.perf_counter() - t_start, results=rows))

  topos = [t for t in args.topologies.split(",") if t]
  if not args.no_train:
    for model in args.models.split(","):
      for topo in topos:
        print(f"compiling {model} train step for {topo} ...", flush=True)
        try:
          rows.append(train_row(model, topo, aot.tpu_devices(topo), args))
        except jax.errors.JaxRuntimeError as e:     # e.g. RESOURCE_EXHAUSTED: does not fit
          rows.append(dict(kind="train_failed", model=model, topology=topo, sets=args.set,
                           error=str(e).splitlines()[0][:500]))
          print(f"  failed: {rows[-1]['error']}", flush=True)
          flush()
          continue
        r = rows[-1]
        print(f"  {r['compile_s']:.0f} s: peak {r['peak_gib']:.2f} GiB/chip of "
              f"{r['hbm_gib']:.0f}, optimal_seconds {r.get('optimal_seconds')}, "
              f"MFU {r['predicted_mfu']}", flush=True)
        flush()
  if not args.no_sampler:
    for topo in [t for t in args.sampler.split(",") if t]:
      print(f"compiling sampler for {topo} ...", flush=True)
      rows.extend(sampler_rows(args.sampler_model if not args.tiny else "B/2", topo,
                               aot.tpu_devices(topo), args))
      flush()
  if not args.no_precompute:
    for topo in [t for t in args.precompute.split(",") if t]:
      print(f"compiling precompute for {topo} ...", flush=True)
      rows.append(precompute_row(topo, aot.tpu_devices(topo), args))
      flush()
  print_table(rows)
  flush()
  return rows


def _libtpu_version():
  try:
    from importlib import metadata
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return None


if __name__ == "__main__":
  main()
