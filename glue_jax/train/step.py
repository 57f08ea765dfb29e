"""Train state, optimizer and the (pure) diffusion train step.

The state is a plain pytree ``{'params', 'opt_state', 'ema', 'step',
'bad_step'}`` with parameters as nested dicts (``nnx.to_pure_dict``), so it
shards, donates and checkpoints without NNX objects in the way.

The step draws every random number from ``fold_in(base_key, step)``:
the label dropout, the posterior sample of the latents, t and the noise.
With JAX's partitionable threefry the values do not depend on how the batch
is sharded, so a sharded step equals the single-device step.

A non-finite loss or gradient norm does not update the parameters; the first
such step is recorded in ``bad_step`` so the loop can stop with the step named
(and never checkpoint a bad state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glue_jax import methods as methods_lib
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


def make_optimizer(lr: float = 1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float = 1.0,
                   warmup_steps: int = 0, schedule: str = "constant",
                   total_steps: int = 0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (REGLUE: lr 1e-4 constant, wd 0, clip 1)."""
  if schedule == "constant":
    lr_s = optax.constant_schedule(lr)
  elif schedule == "cosine":
    lr_s = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  else:
    raise ValueError(f"unknown lr schedule {schedule!r}")
  if warmup_steps:
    lr_s = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), lr_s],
                                [warmup_steps])
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(lr_s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
  """Fresh state; EMA starts as an exact copy of the parameters."""
  return {"params": params, "opt_state": tx.init(params),
          "ema": jax.tree.map(jnp.copy, params), "step": jnp.zeros((), jnp.int32),
          "bad_step": jnp.full((), -1, jnp.int32)}


def _bucket_means(values: jax.Array, t: jax.Array, n: int):
  idx = jnp.clip((t * n).astype(jnp.int32), 0, n - 1)
  onehot = jax.nn.one_hot(idx, n)
  return (onehot * values[:, None]).sum(0), onehot.sum(0)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, cfg: StepConfig,
                    features_fn=None):
  """``step(state, batch, base_key, aux=None) -> (state, metrics)`` (pure).

  ``features_fn(aux, images) -> {'semantic', 'cls', 'align_target'}`` computes
  the semantic features inside the step ("online"): the batch then carries
  ``image`` (uint8) instead of the precomputed entries, and ``aux`` holds the
  frozen encoder's arrays (see ``semantic_encoder.SemanticEncoder``).
  """

  def step_fn(state, batch, base_key, aux=None):
    if features_fn is not None:
      batch = dict(batch)
      images = batch.pop("image")
      feats = jax.lax.stop_gradient(features_fn(aux, images))
      batch.update({k: v for k, v in feats.items() if k in cfg.method.required_features()})
    step = state["step"]
    key = jax.random.fold_in(base_key, step)
    k_prep, k_t, k_n, k_ng, k_drop = jax.random.split(key, 5)
    lb = methods_lib.prepare_batch(cfg.method, batch, k_prep,
                                   latent_scale=cfg.latent_scale,
                                   latent_shift=cfg.latent_shift)
    b = lb["x"].shape[0]
    t = interpolants.sample_time(k_t, (b,), cfg.time_dist)
    noise = jax.random.normal(k_n, lb["x"].shape, jnp.float32)
    g = lb.get("global")
    noise_g = None if g is None else jax.random.normal(k_ng, g.shape, jnp.float32)

    def loss_of(params):
      net = nnx.merge(graphdef, params)
      apply = lambda x, tt, y, gg: net(x, tt, y, gg, train=True, key=k_drop)
      return losses.velocity_loss(apply, lb, t, noise, noise_g, cfg.loss, step)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    d = jnp.asarray(cfg.ema_decay, jnp.float32)
    if cfg.ema_warmup:
      d = jnp.minimum(d, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
    keep = lambda new, old: jax.tree.map(lambda a, o: jnp.where(finite, a, o), new, old)
    new_state = {
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "ema": keep(ema, state["ema"]),
        "step": step + 1,
        "bad_step": jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"]),
    }
    sums, counts = _bucket_means(aux.pop("per_sample"), t, cfg.time_buckets)
    metrics = {k: v for k, v in aux.items()}
    metrics.update(grad_norm=gnorm, bucket_loss_sum=sums, bucket_count=counts)
    return new_state, metrics

  return step_fn
