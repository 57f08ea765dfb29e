"""Entry point: ``python -m glue_jax.main --config=configs/<family>.py:<args> --workdir=DIR``.

``config.kind`` chooses what runs (see ``KINDS``): 'diffusion' (the trainer),
'demo' (the embedded digits pipeline), 'compressor', 'lainr', 'scenes'.
``--config.x=...`` overrides any field.
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
FLAGS = flags.FLAGS


# config.kind -> module whose ``run(config, workdir) -> dict`` runs it.
KINDS = {
    "diffusion": "glue_jax.train.loop",      # SiT / REPA / REG / ReDi / REGLUE training
    "demo": "glue_jax.demo",                 # the embedded digits pipeline
    "compressor": "glue_jax.compressor_train",  # REGLUE's semantic compressor
    "lainr": "glue_jax.lainr",               # LA-INR reconstruction / NVS / generation
    "scenes": "glue_jax.scenes",             # GLoD's prompt-conditioned scenes model
    "precompute": "glue_jax.tools.precompute",  # the feature store (also its own CLI)
    "evaluate": "glue_jax.evaluate",         # sampling + FID/sFID/IS/P/R (also its own CLI)
}


def run(config, workdir: str) -> dict:
  import importlib
  if "://" in workdir:
    # os.makedirs would silently create a local directory named 'gs:'.
    raise ValueError(f"--workdir={workdir}: URLs are not supported; give a file path "
                     "(local disk, NFS, or a gcsfuse mount such as /mnt/gcs/run; "
                     "launch/README.md 'Known limits')")
  kind = config.get("kind", "diffusion")
  if kind not in KINDS:
    raise ValueError(f"config.kind={kind!r}; one of {sorted(KINDS)}")
  mod = importlib.import_module(KINDS[kind])
  return (mod.train if kind == "diffusion" else mod.run)(config, workdir)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  result = run(FLAGS.config, FLAGS.workdir)
  print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
  # Required only when this module is the program: other CLIs (glue_jax.evaluate)
  # share absl's global FLAGS within one process.
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
