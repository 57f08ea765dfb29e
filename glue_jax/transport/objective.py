"""The training objective of the diffusion families (SiT / REPA / REG / ReDi / REGLUE).

:func:`make_loss` turns a batch into REGLUE's multimodal velocity loss
(``losses.velocity_loss``) for the one trainer's generic step
(``glue_jax.train.step.make_step``): the method prepares the batch (latent
posterior sample, [latents; semantics] stack, [CLS]), t and the noises are
drawn from the step's key, and label dropout happens inside the network.
Per-sample losses are also summed per time bucket for logging.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glue_jax import methods as methods_lib
from glue_jax.train import step as step_lib
from glue_jax.transport import interpolants, losses


@dataclasses.dataclass(frozen=True)
class StepConfig:
  method: methods_lib.Method
  loss: losses.LossConfig
  time_dist: str = "uniform"
  latent_scale: float = 0.18215
  latent_shift: float = 0.0
  ema_decay: float = 0.9999
  # REGLUE: constant decay from an exact copy (False).  Short runs (the demo)
  # use decay_t = min(decay, (1 + t) / (10 + t)) so the EMA tracks early
  # training instead of staying close to the zero-initialised heads.
  ema_warmup: bool = False
  time_buckets: int = 4


def bucket_sums(values: jax.Array, t: jax.Array, n: int):
  """Per-time-bucket sums and counts of per-sample ``values`` (t in [0, 1])."""
  idx = jnp.clip((t * n).astype(jnp.int32), 0, n - 1)
  onehot = jax.nn.one_hot(idx, n)
  return (onehot * values[:, None]).sum(0), onehot.sum(0)


def make_loss(graphdef: Any, cfg: StepConfig, features_fn=None):
  """``loss_fn(params, rest, batch, key, step, *aux)`` of the generic step.

  ``features_fn(aux, images) -> {'semantic', 'cls', 'align_target'}`` computes
  the semantic features inside the step ("online"): the batch then carries
  ``image`` (uint8) instead of the precomputed entries, and ``aux`` holds the
  frozen encoder's arrays (see ``semantic_encoder.SemanticEncoder``).
  """

  def loss_fn(params, rest, batch, key, step, aux=None):
    del rest
    if features_fn is not None:
      batch = dict(batch)
      images = batch.pop("image")
      feats = jax.lax.stop_gradient(features_fn(aux, images))
      batch.update({k: v for k, v in feats.items() if k in cfg.method.required_features()})
    k_prep, k_t, k_n, k_ng, k_drop = jax.random.split(key, 5)
    lb = methods_lib.prepare_batch(cfg.method, batch, k_prep,
                                   latent_scale=cfg.latent_scale,
                                   latent_shift=cfg.latent_shift)
    b = lb["x"].shape[0]
    t = interpolants.sample_time(k_t, (b,), cfg.time_dist)
    noise = jax.random.normal(k_n, lb["x"].shape, jnp.float32)
    g = lb.get("global")
    noise_g = None if g is None else jax.random.normal(k_ng, g.shape, jnp.float32)
    net = nnx.merge(graphdef, params)
    apply = lambda x, tt, y, gg: net(x, tt, y, gg, train=True, key=k_drop)
    loss, aux_m = losses.velocity_loss(apply, lb, t, noise, noise_g, cfg.loss, step)
    metrics = dict(aux_m)
    sums, counts = bucket_sums(metrics.pop("per_sample"), t, cfg.time_buckets)
    metrics.update(bucket_loss_sum=sums, bucket_count=counts)
    return loss, (metrics, None)

  return loss_fn


def make_train_step(graphdef: Any, tx, cfg: StepConfig, features_fn=None):
  """The diffusion train step ``step(state, batch, base_key[, aux])`` (pure)."""
  return step_lib.make_step(make_loss(graphdef, cfg, features_fn), tx,
                            ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup)


def summarize(window: list[dict]) -> dict:
  """Host metrics of a logging window: means of the scalars and the mean loss
  per time bucket (``loss_t<i>``)."""
  import numpy as np
  out = {k: float(np.mean([m[k] for m in window])) for k in window[0]
         if k not in ("bucket_loss_sum", "bucket_count")}
  if "bucket_loss_sum" in window[0]:
    sums = np.sum([m["bucket_loss_sum"] for m in window], axis=0)
    counts = np.sum([m["bucket_count"] for m in window], axis=0)
    for i, (s, c) in enumerate(zip(sums, counts)):
      if c:
        out[f"loss_t{i}"] = float(s / c)
  return out
