"""Sampler overhead beyond the network: 250-step SDE with CFG vs its forward bound.

A guided SDE step calls the network once on the doubled batch (2B: the
conditional and the null-label half) and then does the CFG combination, the
drift, per-sample noise (threefry keys folded per sample and step) and the
Euler-Maruyama update.  This benchmark times, for one network and batch B:

- ``fwd(2B)``: one jitted forward pass on 2B (median of calls);
- ``250 x fwd(2B)``: that time 250 times (per-call dispatch included);
- ``scan 250 fwd(2B)``: 250 forward passes in one jitted ``lax.scan`` with a
  trivial carry update (the model-call bound of the sampler);
- ``SDE+CFG``: the full sampler, ``presets.make_sampler`` with w = 2.8 and the
  interval [0, 1] (every step guided, i.e. exactly 250 doubled calls);
- ``SDE+CFG [0,0.9]``: REGLUE's preset (the first ~26 steps unguided);
- ``SDE+CFG without lax.cond``: the same guided steps with the guidance
  interval test removed (isolates the cost of ``guidance.py``'s ``lax.cond``);
- ``SDE no CFG``: w = 1 (250 calls on B) against its own scan bound.

overhead = sampler time / scan bound - 1.  The network is REGLUE-shaped
(4 latent + 16 semantic channels, a global token, 1000 classes); ``tiny``
(default) is a 4-block width-128 SiT on a 16x16 latent so that the benchmark
finishes on a CPU in minutes; ``--model S/2|B/2|L/2|XL/2`` times the real
sizes (32x32x20 latents, 768-d token).

  python bench/sampler_overhead.py                      # CPU: tiny, B=4
  python bench/sampler_overhead.py --model XL/2 --batch 64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_jax import models  # noqa: E402
from glue_jax.models import sit  # noqa: E402
from glue_jax.sampling import presets, samplers  # noqa: E402
import bench_io  # noqa: E402  (bench/ is sys.path[0] when run as a script)

NAME = "sampler_overhead"
NUM_STEPS = 250


def network_config(model: str, dtype: str) -> sit.SiTConfig:
  if model == "tiny":
    return sit.config_for("S/2", depth=4, hidden_size=128, num_heads=4, input_size=16,
                          semantic_channels=16, global_token_dim=64,
                          projector_out_dim=64, projector_dim=256, encoder_depth=2,
                          dtype=dtype)
  return sit.config_for(model, input_size=32, semantic_channels=16, global_token_dim=768,
                        projector_out_dim=768, dtype=dtype)


def time_interleaved(calls: dict, rounds: int, fwd_repeats: int, clock: str) -> dict:
  """Compile time and min/median run time of each ``name -> (fn, args)``.

  Every round runs each call once (forward calls ``fwd_repeats`` times), so
  load changes on a shared machine hit all variants alike.  Both wall time
  and process CPU time (all threads) are recorded; ``clock`` picks the one
  reported as ``min_s``/``median_s`` ('cpu' on a contended CPU host, where
  wall time measures the other tenants as much as the program).
  """
  out = {}
  for name, (fn, args) in calls.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out[name] = {"compile_s": time.perf_counter() - t0, "wall_s": [], "cpu_s": []}
  for _ in range(rounds):
    for name, (fn, args) in calls.items():
      reps = fwd_repeats if name.startswith("fwd") else 1
      for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        out[name]["wall_s"].append(time.perf_counter() - w0)
        out[name]["cpu_s"].append(time.process_time() - c0)
  for r in out.values():
    r["min_s"], r["median_s"] = float(np.min(r[clock + "_s"])), float(np.median(r[clock + "_s"]))
    r["min_wall_s"] = float(np.min(r["wall_s"]))
  return out


def bench(model: str, batch: int, rounds: int, dtype: str, fwd_repeats: int,
          clock: str) -> dict:
  cfg = network_config(model, dtype)
  graphdef, state = models.init("sit", cfg, seed=0)
  rng = np.random.default_rng(0)
  # Random (not zero-initialised) heads so nothing is trivially constant.
  params = jax.tree.map(lambda a: a + 0.02 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                        nnx.to_pure_dict(state))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  spatial = (cfg.input_size, cfg.input_size, cfg.in_channels)
  keys = samplers.per_sample_keys(0, jnp.arange(batch))
  x1, g1 = samplers.initial_noise(keys, spatial, cfg.global_token_dim)
  y = jnp.asarray(rng.integers(0, cfg.num_classes, batch), jnp.int32)
  apply = lambda p: (lambda x, t, yy, g: nnx.merge(graphdef, p)(x, t, yy, g))

  @jax.jit
  def forward(p, x, g, yy):
    v, vg, _ = apply(p)(x, jnp.full((x.shape[0],), 0.5), yy, g)
    return v, vg

  @jax.jit
  def forward_scan(p, x, g, yy):
    def body(carry, t):
      x, g = carry
      v, vg, _ = apply(p)(x, jnp.full((x.shape[0],), t), yy, g)
      return (x + 1e-3 * v.astype(x.dtype), g + 1e-3 * vg.astype(g.dtype)), None
    ts = jnp.linspace(1.0, 0.04, NUM_STEPS)
    return jax.lax.scan(body, (x, g), ts)[0]

  def sampler_of(preset):
    @jax.jit
    def run(p, x, g, yy, k):
      return presets.make_sampler(apply(p), preset, null_label=cfg.num_classes)(x, g, yy, k)
    return run

  x2, g2 = jnp.concatenate([x1, x1]), jnp.concatenate([g1, g1])
  y2 = jnp.concatenate([y, jnp.full_like(y, cfg.num_classes)])
  runs = {
      "sde_cfg_full": presets.SamplerPreset(cfg_scale=2.8, interval=(0.0, 1.0)),
      "sde_cfg_reglue": presets.PRESETS["reglue"],
      "sde_nocfg": presets.SamplerPreset(cfg_scale=1.0),
  }
  calls = {"fwd2": (forward, (params, x2, g2, y2)), "fwd1": (forward, (params, x1, g1, y)),
           "scan2": (forward_scan, (params, x2, g2, y2)),
           "scan1": (forward_scan, (params, x1, g1, y))}
  calls.update({name: (sampler_of(p), (params, x1, g1, y, keys)) for name, p in runs.items()})

  @jax.jit
  def sampler_without_cond(p, x, g, yy, k):
    """SDE+CFG with every step guided and no lax.cond (isolates its cost)."""
    def vel(x, g, t, yy):
      b = x.shape[0]
      v, vg, _ = apply(p)(jnp.concatenate([x, x]), t,
                          jnp.concatenate([yy, jnp.full_like(yy, cfg.num_classes)]),
                          jnp.concatenate([g, g]))
      return v[b:] + 2.8 * (v[:b] - v[b:]), vg[b:] + 2.8 * (vg[:b] - vg[b:])
    return samplers.euler_maruyama(vel, x, g, yy, k, num_steps=NUM_STEPS)
  calls["sde_cfg_nocond"] = (sampler_without_cond, (params, x1, g1, y, keys))
  timing = time_interleaved(calls, rounds, fwd_repeats, clock)
  out = dict(model=model, batch=batch, dtype=dtype, params=n_params,
             tokens=cfg.num_tokens, steps=NUM_STEPS, rounds=rounds, clock=clock,
             timing=timing)
  for name, r in timing.items():
    out[name + "_s"], out[name + "_compile_s"] = r["min_s"], r["compile_s"]
  grid = np.asarray(samplers.sde_time_grid(NUM_STEPS))[:NUM_STEPS]
  guided = int(((grid >= 0.0) & (grid <= 0.9)).sum())
  out["reglue_guided_steps"] = guided
  # Model-call bound of the REGLUE preset: guided steps on 2B, the rest on B.
  out["bound_reglue_s"] = (guided * out["scan2_s"] + (NUM_STEPS - guided) * out["scan1_s"]) \
      / NUM_STEPS
  out["overhead_cfg_full"] = out["sde_cfg_full_s"] / out["scan2_s"] - 1
  out["overhead_cfg_reglue"] = out["sde_cfg_reglue_s"] / out["bound_reglue_s"] - 1
  out["overhead_nocfg"] = out["sde_nocfg_s"] / out["scan1_s"] - 1
  out["overhead_cfg_nocond"] = out["sde_cfg_nocond_s"] / out["scan2_s"] - 1
  out["overhead_vs_calls_cfg_full"] = out["sde_cfg_full_s"] / (NUM_STEPS * out["fwd2_s"]) - 1
  return out


def main(argv=None):
  gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="tiny", help="tiny | S/2 | B/2 | L/2 | XL/2")
  ap.add_argument("--batch", type=int, default=0, help="B (0: 4 on CPU, 64 on GPU)")
  ap.add_argument("--rounds", type=int, default=3,
                  help="interleaved timing rounds (min reported)")
  ap.add_argument("--fwd-repeats", type=int, default=10, help="single forwards per round")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--clock", default="wall" if gpu else "cpu", choices=["wall", "cpu"],
                  help="time reported: wall (GPU) or process CPU time (CPU hosts)")
  ap.add_argument("--out", default=os.path.join("bench", "results", NAME + ".json"))
  args = ap.parse_args(argv)
  batch = args.batch or (64 if gpu else 4)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  results = []
  for model in args.model.split(","):
    r = bench(model, batch, args.rounds, args.dtype, args.fwd_repeats, args.clock)
    results.append(r)
    print(f"  done {model} ({time.perf_counter() - t0:.0f} s)", flush=True)
  device = str(jax.devices()[0].device_kind)
  print(f"\nSampler overhead, {NUM_STEPS}-step SDE, {jax.default_backend()} ({device}), "
        f"{os.cpu_count()} cpus, load avg {load_before[0]:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after; times are {args.clock} seconds "
        f"(min of {args.rounds} interleaved rounds)")
  print("| model | B | fwd(2B) ms | 250 x fwd(2B) s | scan 250 fwd(2B) s | SDE+CFG s "
        "| overhead vs scan | overhead vs calls | samples/s SDE+CFG | samples/s bound |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['model']} | {r['batch']} | {1e3 * r['fwd2_s']:.2f} "
          f"| {NUM_STEPS * r['fwd2_s']:.2f} | {r['scan2_s']:.2f} | {r['sde_cfg_full_s']:.2f} "
          f"| {100 * r['overhead_cfg_full']:+.1f}% | {100 * r['overhead_vs_calls_cfg_full']:+.1f}% "
          f"| {r['batch'] / r['sde_cfg_full_s']:.2f} | {r['batch'] / r['scan2_s']:.2f} |")
  print("\n| model | B | preset | sampler s | model-call bound s | overhead |")
  print("|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['model']} | {r['batch']} | w=2.8, [0, 1] | {r['sde_cfg_full_s']:.2f} "
          f"| {r['scan2_s']:.2f} | {100 * r['overhead_cfg_full']:+.1f}% |")
    print(f"| {r['model']} | {r['batch']} | REGLUE w=2.8, [0, 0.9] "
          f"({r['reglue_guided_steps']} guided) | {r['sde_cfg_reglue_s']:.2f} "
          f"| {r['bound_reglue_s']:.2f} | {100 * r['overhead_cfg_reglue']:+.1f}% |")
    print(f"| {r['model']} | {r['batch']} | w=2.8, [0, 1] without lax.cond "
          f"| {r['sde_cfg_nocond_s']:.2f} | {r['scan2_s']:.2f} "
          f"| {100 * r['overhead_cfg_nocond']:+.1f}% |")
    print(f"| {r['model']} | {r['batch']} | no CFG | {r['sde_nocfg_s']:.2f} "
          f"| {r['scan1_s']:.2f} | {100 * r['overhead_nocfg']:+.1f}% |")
  bench_io.write_json(args.out, dict(
      name=NAME, backend=jax.default_backend(), device=device, steps=NUM_STEPS,
      rounds=args.rounds, clock=args.clock, load_avg_before=load_before,
      load_avg_after=os.getloadavg(),
      total_s=time.perf_counter() - t0, results=results))


if __name__ == "__main__":
  main()
