"""Runs the tiny trainer config in a subprocess with fault switches.

  python -m tests.faults.worker FEATURES WORKDIR OVERRIDES_JSON [FILE_SIZE_LIMIT_BYTES]

``OVERRIDES_JSON`` sets config fields by dotted path (e.g. ``{"train.steps": 6,
"debug.kill_at_step": 4}``).  ``FILE_SIZE_LIMIT_BYTES`` caps the size of any
file this process writes (RLIMIT_FSIZE, SIGXFSZ ignored), so writes fail with
EFBIG as on a full disk.
"""
import json
import os
import sys


def main():
  features, workdir, overrides = sys.argv[1:4]
  if len(sys.argv) > 4:
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  from tests import jax_setup
  jax_setup.configure(8)   # the settings of tests/conftest.py: programs compile identically
  from glue_jax import diffusion_job
  from tests import train_utils
  cfg = train_utils.tiny_config(features)
  for k, v in json.loads(overrides).items():
    *parents, leaf = k.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = v
  diffusion_job.train(cfg, workdir)


if __name__ == "__main__":
  main()
