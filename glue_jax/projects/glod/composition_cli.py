"""Scores composition methods on a finished GLoD scenes run (probe-based metrics).

  python -m glue_jax.projects.glod.composition_cli --workdir=workdirs/scenes \
      --methods=single,composable,glod_B --seeds=0,1,2

Writes ``<workdir>/composition.json`` (``--out`` elsewhere) and prints the table
of ``composition_eval.evaluate``.
"""

from __future__ import annotations

import argparse
import os

from glue_jax.projects.glod import composition_eval as ec
from glue_jax.projects.glod import scenes_pipeline as scenes_run
from glue_jax.train import writers


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a scenes run's workdir")
  ap.add_argument("--methods", default=None, help="comma list; default the run's config")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--num_scenes", type=int, default=0)
  ap.add_argument("--num_steps", type=int, default=0)
  ap.add_argument("--out", default="", help="JSON path (default <workdir>/composition.json)")
  args = ap.parse_args(argv)
  ctx = scenes_run.load(args.workdir)
  settings = ctx.config.eval
  if args.num_steps:
    with settings.unlocked():
      settings.num_steps = args.num_steps
  methods = tuple(args.methods.split(",")) if args.methods else tuple(settings.methods)
  unknown = set(methods) - set(ec.METHODS)
  if unknown:
    raise SystemExit(f"unknown methods {sorted(unknown)}; one of {ec.METHODS}")
  result = ec.evaluate(ctx.model, ctx.first_stage, ctx.probes, ctx.test, settings,
                    methods=methods, seeds=[int(s) for s in args.seeds.split(",")],
                    num_scenes=args.num_scenes or settings.num_scenes, image_dir=args.workdir)
  result["probe_accuracy"] = ctx.probes.accuracy       # on the real test scenes
  writers.save_json(args.out or os.path.join(args.workdir, "composition.json"), result)
  print(ec.format_table(result))
  print("probe accuracy on real test scenes:", ctx.probes.accuracy)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
