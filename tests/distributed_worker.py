"""One process of the localhost multi-process tests (run by test_distributed.py).

  python -m tests.distributed_worker PORT NUM_PROCESSES PROCESS_ID DEVICES FEATURES WORKDIR STEPS MODE

MODE
- ``curve``: ``diffusion_job.train`` on mesh data x fsdp=4 (resuming from WORKDIR's
  checkpoints, written at the last step), the loss logged at every step and
  printed as ``RESULT {... "losses": {step: loss}}``.
- ``curve_ref:N``: the single-process reference of ``curve`` run on N
  processes: no ``jax.distributed``, one device, no sharding, and the data
  pipeline replaced by the concatenation (in process order) of the N
  per-process Grain pipelines ``diffusion_job.train`` would build on N processes, so
  every step sees the same global batch as the distributed run.
"""
import json
import os
import resource
import sys

import numpy as np


class ConcatIterator:
  """Batches of N per-process iterators concatenated in process order.

  Checkpointable like a Grain iterator (``get_state`` bytes / ``set_state``).
  """

  def __init__(self, datasets):
    self._iters = [iter(d) for d in datasets]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iters]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self._iters]).encode()

  def set_state(self, state: bytes) -> None:
    for it, s in zip(self._iters, json.loads(state)):
      it.set_state(s)

  def start_prefetch(self) -> None:
    pass


def emulate_processes(n: int) -> None:
  """Makes ``pipeline.make_dataset`` return what N processes would read, joined."""
  from glue_jax.data import pipeline
  real = pipeline.make_dataset

  def make_dataset(source, *, batch_size, process_index=0, process_count=1, **kw):
    assert (process_index, process_count) == (0, 1), (process_index, process_count)
    if batch_size % n:
      raise ValueError(f"batch {batch_size} not divisible by {n} emulated processes")
    return ConcatIterator([real(source, batch_size=batch_size // n, process_index=k,
                                process_count=n, **kw) for k in range(n)])
  pipeline.make_dataset = make_dataset


def record_losses() -> dict:
  """Wraps the trainer's metric writer so every logged loss lands in a dict."""
  from glue_jax.train import writers
  real = writers.create_writer
  losses = {}

  def create_writer(logdir):
    w = real(logdir)
    write = w.write_scalars

    def write_scalars(step, scalars):
      if "loss" in scalars:      # (clu's ReportProgress writes steps_per_sec here too)
        losses[int(step)] = float(scalars["loss"])
      return write(step, scalars)
    w.write_scalars = write_scalars
    return w
  writers.create_writer = create_writer
  return losses


def main():
  port, nproc, pid, ndev, features, workdir, steps = sys.argv[1:8]
  mode = sys.argv[8]
  if mode != "curve" and not mode.startswith("curve_ref:"):
    raise SystemExit(f"MODE {mode!r}: 'curve' or 'curve_ref:N'")
  from tests import jax_setup
  # as tests/conftest.py (tiny nets, compile time dominates; shared compilation cache)
  jax_setup.configure(int(ndev), exact=True)
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  distributed = not mode.startswith("curve_ref")
  if distributed:
    jax.distributed.initialize(f"localhost:{port}", num_processes=int(nproc),
                               process_id=int(pid), initialization_timeout=120)
  from glue_jax import diffusion_job
  from tests import train_utils
  losses = record_losses()
  if distributed:
    mesh = {"data": -1, "fsdp": 4}
  else:
    emulate_processes(int(mode.partition(":")[2]))
    mesh = {"data": -1, "fsdp": 1}
  cfg = train_utils.tiny_config(features, steps=int(steps), mesh=mesh)
  cfg.train.log_every, cfg.checkpoint.every = 1, 1000
  out = diffusion_job.train(cfg, workdir)
  result = {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "step": out["step"], "loss": out.get("loss"),
            "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}
  result["losses"] = losses
  print("RESULT " + json.dumps(result), flush=True)
  if distributed:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
