"""The config sections the one trainer reads, the same for every job.

``sections(c, ...)`` adds ``seed``, ``mesh``, ``sharding_rules``, ``train``,
``optim``, ``checkpoint`` and ``debug`` to a ``ConfigDict``; job configs
(``configs/*.py``) call it and then set their own numbers, and jobs built in
code (auxiliary networks, ``module_fit``) call it directly.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from glue_jax import sharding


def sections(c: ml_collections.ConfigDict | None = None, *, steps: int, batch_size: int,
             log_every: int = 100, ckpt_every: int = 1000, keep: int = 3,
             lr: float = 1e-4, grad_clip: float = 1.0, ema_decay=None,
             ema_warmup: bool = False, seed: int = 0) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict() if c is None else c
  c.seed = c.get("seed", seed)
  c.mesh = {"data": -1, "fsdp": 1}
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  c.train = ml_collections.ConfigDict({
      "steps": steps, "batch_size": batch_size, "log_every": log_every,
      # EMA of the parameters (checkpoint item 'ema'); None: none kept.
      "ema_decay": config_dict.placeholder(float) if ema_decay is None else ema_decay,
      "ema_warmup": ema_warmup,
      "aot_compile": True,       # compile the step at start-up, log its memory analysis
      "profile_steps": (),       # (start, stop): profiler trace of those steps
      # jax.transfer_guard around the step in the hot loop: 'allow' | 'log' |
      # 'disallow' (tests: no implicit host<->device transfers per step).
      "transfer_guard": "allow",
      # jax.distributed.initialize(): None = auto-detect (TPU pods, SLURM).
      "distributed": config_dict.placeholder(bool),
  })
  c.optim = ml_collections.ConfigDict({
      "lr": lr, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
      "grad_clip": grad_clip, "warmup_steps": 0, "schedule": "constant", "total_steps": 0,
      "alpha": 0.0, "steps_per_epoch": 0, "t_max_epochs": 0, "eta_min": 0.0})
  c.checkpoint = ml_collections.ConfigDict({
      "every": ckpt_every, "keep": keep, "keep_every": 0,
      # When checkpoints exist but none can be restored the run stops; True
      # starts from step 0 instead (the unreadable ones stay quarantined).
      "allow_fresh_start": False})
  c.debug = ml_collections.ConfigDict({
      # Fault injection for the tests (signals after / during these steps).
      "kill_at_step": -1, "sigterm_at_step": -1, "kill_during_checkpoint": -1,
      "kill_after_checkpoint": -1})
  if "data" not in c:
    c.data = data_defaults()
  return c


def data_defaults(**fields) -> ml_collections.ConfigDict:
  """A ``data`` section: the job's fields plus the trainer's input options
  (``exclude``: example indices the trainer skips, e.g. a bad record named
  by a non-finite-loss error)."""
  d = {"workers": 0, "read_threads": 0, "prefetch": 0, "exclude": ()}
  d.update(fields)
  return ml_collections.ConfigDict(d)
