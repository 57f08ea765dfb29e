"""Entry point: ``python -m glue_jax.main --config=configs/<family>.py:<args> --workdir=DIR``.

``config.kind`` chooses what runs: 'diffusion' (the trainer) or 'demo' (the
embedded digits pipeline).  ``--config.x=...`` overrides any field.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:   # configs/ is importable from the repo root
  sys.path.insert(0, _REPO)

config_flags.DEFINE_config_file("config", None, "config file[:args]", lock_config=True)
flags.DEFINE_string("workdir", None, "working directory (checkpoints, logs, samples)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run(config, workdir: str) -> dict:
  kind = config.get("kind", "diffusion")
  if kind == "diffusion":
    from glue_jax.train import loop
    return loop.train(config, workdir)
  if kind == "demo":
    from glue_jax import demo
    return demo.run(config, workdir)
  raise ValueError(f"config.kind={kind!r}: 'diffusion' or 'demo'")


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  result = run(FLAGS.config, FLAGS.workdir)
  print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
  app.run(main)
