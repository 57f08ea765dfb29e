"""Fitting an auxiliary network on in-memory arrays with the one trainer.

The demo's encoder and compressor, GLoD's probes and the digits classifier
are small supervised networks: :func:`fit` wraps them as a trainer job
(``loss(module, batch, key) -> scalar``, BatchNorm statistics carried as the
state's ``rest``), trains it in ``workdir`` (sharded, resumable, with the
non-finite guard and progress) and writes the trained variables back into
the module.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from glue_jax.data.pipeline import ArraySource
from glue_jax.train import trainer, trainer_config


def fit(module: nnx.Module, loss_fn: Callable, arrays: dict, *, workdir: str, name: str,
        steps: int, batch_size: int, tx, seed: int = 0, log_every: int = 50,
        meta: dict | None = None) -> dict:
  """Trains ``module`` in place on ``arrays`` (dict of equally long arrays);
  returns the trainer's last metrics.

  ``meta`` (JSON) is stored with the checkpoints and must match on resume:
  it keys the run to the settings that produced it.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss(p, r, batch, key, step):
    del step
    m = nnx.merge(graphdef, p, r if r is not None else rest)
    value = loss_fn(m, batch, key)
    return value, ({}, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param))))

  def build(seed_):
    del seed_          # the module arrives initialised: start from its variables
    return nnx.merge(graphdef, params, rest)

  config = trainer_config.sections(steps=steps, batch_size=batch_size, log_every=log_every,
                                   ckpt_every=max(steps // 2, 1), keep=1, seed=seed)
  job = trainer.Job(name=name, meta={"model": dict(meta or {})}, model=build, loss=loss,
                    source=ArraySource(arrays, name=name), tx=tx)
  last = trainer.train(job, config, workdir)
  state, _ = trainer.latest_state(workdir)
  nnx.update(module, nnx.state(nnx.merge(graphdef, state["params"], state.get("rest", rest))))
  return last
