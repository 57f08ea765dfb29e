"""Runs the compressor job in a fresh process (tests/test_compressor_job.py).

  python -m tests.compressor_worker '{"tfds_dir": D, "n": 512, "vit": V, "workdir": W,
                                     "devices": 8, "kill_at_step": -1, ...}'

Configures JAX like tests/conftest.py (``devices`` fake CPU devices), trains
(:func:`tiles_config`, overrides from the JSON) and prints one JSON line:
the job's result and ``maxrss_mib``, this process's peak resident memory.
"""
import json
import resource
import sys

from glue_jax.configs import compressor as compressor_config


def tiles_config(*, tfds_dir: str, n: int, vit: str, epochs: int = 1, batch_size: int = 64,
                 checkpoint_every: int = 1000, kill_at_step: int = -1, mesh=None,
                 read_threads: int = 0, eps: float | None = None):
  """The compressor on ``tiles/n<n>`` (256 px) with the tiny encoder ``vit``:
  blocks 0-1 at their native resolution, own statistics over 64 images,
  stack -> 8 -> 16 channels."""
  c = compressor_config.get_config(
      f"data=tfds:tiles/n{n},dinov2={vit},stats=own,epochs={epochs},batch_size={batch_size}")
  c.layers = (0, 1)
  c.input_size = 0                  # 256 px / patch 32 = 8 x 8 tokens, no resize
  c.stats_images = 64
  c.hidden_channels = (8,)
  c.data.update(data_dir=tfds_dir, val_images=0, read_threads=read_threads)
  c.train.log_every = 4
  c.checkpoint.every = checkpoint_every
  c.debug.kill_at_step = kill_at_step
  if mesh:
    c.mesh = dict(mesh)
  if eps is not None:
    c.optim.eps = eps               # Adam's epsilon
  return c


def main():
  args = json.loads(sys.argv[1])
  from tests import jax_setup
  jax_setup.configure(int(args.pop("devices", 8)))   # tests/conftest.py's settings
  from tests import tfds_tiles  # noqa: F401  (registers tiles/n<N>)
  from glue_jax.projects.reglue import compressor_job
  workdir = args.pop("workdir")
  out = compressor_job.run(tiles_config(**args), workdir)
  out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
  main()
