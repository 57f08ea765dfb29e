"""Trains the tiny config in a subprocess (used by test_train's kill test).

  python -m tests.kill_worker FEATURES WORKDIR STEPS KILL_AFTER MESH_DATA MESH_FSDP
"""
import os
import sys


def main():
  features, workdir, steps, kill, data, fsdp = sys.argv[1:7]
  from tests import jax_setup
  jax_setup.configure(8)   # the settings of tests/conftest.py: programs compile identically
  from glue_jax import diffusion_job
  from tests import train_utils
  cfg = train_utils.tiny_config(features, steps=int(steps),
                                mesh={"data": int(data), "fsdp": int(fsdp)})
  cfg.debug.kill_after_checkpoint = int(kill)
  diffusion_job.train(cfg, workdir)


if __name__ == "__main__":
  main()
