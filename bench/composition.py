"""GLoD vs baselines on held-out procedural scenes: global/local alignment, leakage, preservation.

Trains (once; cached in ``--workdir``) a tiny prompt-conditioned SiT on the
procedural scenes (``glue_jax/configs/scenes.py``) and probes on the real scenes, then
samples the held-out test scene specifications with

- ``single``: CFG on the single concatenated caption (global + locals),
- ``composable``: Composable Diffusion over the global and local captions,
- ``glod_A`` / ``glod_B`` / ``glod_C``: GLoD composition variants (local captions
  confined to their boxes; ``glue_jax.sampling.compose``),
- (``--layout``) ``glod_B_layout``: B + backward layout guidance,

plus ``global`` (CFG on the global caption: the preservation reference), every
method from the same per-scene noise, for several seeds, and reports mean ± std
over seeds of the four scores of ``glue_jax.projects.glod.composition_eval``.  The claim
tested: GLoD raises local alignment while keeping global alignment.

  python bench/composition.py                        # default: ~75 min on 2 busy CPU cores
  python bench/composition.py --seeds 0,1,2,3 --num_scenes 200 --train_steps 4000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glue_jax.configs import scenes as scenes_config  # noqa: E402
from glue_jax.projects.glod import composition_eval as ec  # noqa: E402
from glue_jax.projects.glod import scenes_pipeline as scenes  # noqa: E402
import bench_io  # noqa: E402

NAME = "composition"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/bench_composition",
                  help="cache of dataset, generator and probes (reused when present)")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--num_scenes", type=int, default=48)
  ap.add_argument("--num_steps", type=int, default=0, help="sampler steps (0: config)")
  ap.add_argument("--train_steps", type=int, default=0, help="generator steps (0: config)")
  ap.add_argument("--cfg_scale", type=float, default=0.0)
  ap.add_argument("--local_scale", type=float, default=0.0)
  ap.add_argument("--layout", action="store_true", help="also glod_B_layout")
  ap.add_argument("--config_arg", default="", help="argument of glue_jax/configs/scenes.py")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", f"{NAME}.json"))
  args = ap.parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  arg = args.config_arg
  if args.train_steps:
    arg = ",".join(filter(None, [arg, f"steps={args.train_steps}"]))
  config = scenes_config.get_config(arg or None)
  ev = config.eval
  if args.num_steps:
    ev.num_steps = args.num_steps
  if args.cfg_scale:
    ev.cfg_scale = args.cfg_scale
  if args.local_scale:
    ev.local_scale = args.local_scale
  methods = ["single", "composable", "glod_A", "glod_B", "glod_C"]
  if args.layout:
    methods.append("glod_B_layout")
    if not ev.layout_scale:
      ev.layout_scale = 1.0
  seeds = [int(s) for s in args.seeds.split(",")]

  t0 = time.time()
  ctx, train_metrics = scenes.prepare(config, args.workdir)
  t_prepare = time.time() - t0
  t0 = time.time()
  result = ec.evaluate(ctx.model, ctx.first_stage, ctx.probes, ctx.test, ev, methods=methods,
                       seeds=seeds, num_scenes=args.num_scenes, image_dir=args.workdir)
  t_eval = time.time() - t0

  table = ec.format_table(result)
  print(f"\n{len(seeds)} seeds x {result['num_scenes']} held-out scenes, sampler "
        f"{ev.sampler} {ev.num_steps} steps, w_g={ev.cfg_scale} w_l={ev.local_scale}; "
        f"probe accuracy on real test scenes {ctx.probes.accuracy}")
  print(table)
  m = result["methods"]
  for v in ("glod_A", "glod_B", "glod_C"):
    d_loc = m[v]["local_alignment"]["mean"] - m["single"]["local_alignment"]["mean"]
    d_glob = m[v]["global_alignment"]["mean"] - m["single"]["global_alignment"]["mean"]
    print(f"{v} vs single prompt: local alignment {d_loc:+.3f}, global alignment {d_glob:+.3f}")
  print(f"prepare (data+generator+probes) {t_prepare:.0f} s, evaluation {t_eval:.0f} s")
  bench_io.write_json(args.out, {
      "name": NAME, "table": table, "result": result,
      "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ev.items()},
      "generator": {"train_steps": config.train.train.steps,
                    "model": dict(config.train.model.overrides),
                    "last_train_metrics": train_metrics},
      "seconds": {"prepare": t_prepare, "evaluate": t_eval}})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
