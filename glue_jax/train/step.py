"""The one train state, optimizer and (pure) train step of every training job.

The state is a plain pytree, the same layout for every job::

  {'params', 'opt_state', 'step', 'bad_step'[, 'ema'][, 'rest']}

with parameters as nested dicts (``nnx.to_pure_dict``), so it shards, donates
and checkpoints without NNX objects in the way.  ``ema`` is present when the
job keeps an exponential moving average of the parameters; ``rest`` holds the
trained module's non-parameter variables (BatchNorm statistics).

A job contributes only its loss (see :func:`make_step`): every random number
of step s comes from ``fold_in(base_key, s)``.  With JAX's partitionable
threefry the values do not depend on how the batch is sharded, so a sharded
step equals the single-device step.

A non-finite loss or gradient norm does not update the state; the first such
step is recorded in ``bad_step`` so the trainer can stop with the step named
(and never checkpoint a bad state).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# loss_fn(params, rest, batch, key, step, *aux) -> (loss, (metrics, new_rest))
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]


def lr_schedule(lr: float, *, schedule: str = "constant", warmup_steps: int = 0,
                total_steps: int = 0, alpha: float = 0.0, steps_per_epoch: int = 0,
                t_max_epochs: int = 0, eta_min: float = 0.0) -> optax.Schedule:
  """Learning rate as a function of the step.

  - ``constant`` (REGLUE/SiT: 1e-4; LA-INR / IPC: 1e-4);
  - ``cosine``: ``optax.cosine_decay_schedule`` over ``total_steps`` (after
    warm-up) down to ``alpha * lr``;
  - ``cosine_per_epoch``: PyTorch ``CosineAnnealingLR`` stepped once per epoch
    (REGLUE's compressor recipe: T_max 100 epochs, eta_min 1e-4): the rate of
    step s is ``eta_min + (lr - eta_min) (1 + cos(pi e / T_max)) / 2`` with
    ``e = s // steps_per_epoch``.
  """
  if schedule == "constant":
    s = optax.constant_schedule(lr)
  elif schedule == "cosine":
    s = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1), alpha=alpha)
  elif schedule == "cosine_per_epoch":
    if steps_per_epoch <= 0 or t_max_epochs <= 0:
      raise ValueError(f"lr schedule 'cosine_per_epoch' needs steps_per_epoch > 0 and "
                       f"t_max_epochs > 0 (got {steps_per_epoch}, {t_max_epochs})")

    def s(count):
      epoch = (jnp.asarray(count) // steps_per_epoch).astype(jnp.float32)
      return eta_min + (lr - eta_min) * (1 + jnp.cos(jnp.pi * epoch / t_max_epochs)) / 2
  else:
    raise ValueError(f"unknown lr schedule {schedule!r}: constant | cosine | cosine_per_epoch")
  if warmup_steps:
    s = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), s],
                             [warmup_steps])
  return s


def make_optimizer(lr: float = 1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float = 1.0,
                   warmup_steps: int = 0, schedule: str = "constant",
                   total_steps: int = 0, alpha: float = 0.0, steps_per_epoch: int = 0,
                   t_max_epochs: int = 0, eta_min: float = 0.0) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping, for every job.

  REGLUE: lr 1e-4 constant, wd 0, clip 1.  With ``weight_decay=0`` this is
  Adam (LA-INR, the compressor): AdamW adds ``0 * params``, which changes no
  finite value.
  """
  lr_s = lr_schedule(lr, schedule=schedule, warmup_steps=warmup_steps,
                     total_steps=total_steps, alpha=alpha, steps_per_epoch=steps_per_epoch,
                     t_max_epochs=t_max_epochs, eta_min=eta_min)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(lr_s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def init_state(params: dict, tx: optax.GradientTransformation, *, ema: bool = True,
               rest: dict | None = None) -> dict:
  """Fresh state; the EMA (when kept) starts as an exact copy of the parameters."""
  state = {"params": params, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32), "bad_step": jnp.full((), -1, jnp.int32)}
  if ema:
    state["ema"] = jax.tree.map(jnp.copy, params)
  if rest is not None:
    state["rest"] = rest
  return state


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
              ema_decay: float | None = None, ema_warmup: bool = False):
  """``step(state, batch, base_key, *aux) -> (state, metrics)`` (pure).

  ``loss_fn(params, rest, batch, key, step, *aux) -> (loss, (metrics,
  new_rest))`` is the job: ``rest`` is ``state['rest']`` (None when absent),
  ``key = fold_in(base_key, step)``, ``aux`` frozen arrays the trainer passes
  to every step (e.g. a frozen encoder).  ``metrics`` may hold scalars and
  arrays; ``loss`` and ``grad_norm`` are added.

  EMA: ``ema = d ema + (1 - d) params`` after the update, with
  ``d = min(ema_decay, (1 + s) / (10 + s))`` when ``ema_warmup`` (short runs:
  the EMA tracks early training instead of staying near the initial heads).
  """

  def step_fn(state, batch, base_key, *aux):
    step = state["step"]
    key = jax.random.fold_in(base_key, step)

    def f(params):
      return loss_fn(params, state.get("rest"), batch, key, step, *aux)

    (loss, (metrics, rest)), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
    gnorm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state}
    if "ema" in state:
      d = jnp.asarray(ema_decay if ema_decay is not None else 0.0, jnp.float32)
      if ema_warmup:
        d = jnp.minimum(d, (1.0 + step) / (10.0 + step))
      new["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
    if "rest" in state:
      new["rest"] = rest
    keep = lambda a, o: jnp.where(finite, a, o)
    new = {k: jax.tree.map(keep, v, state[k]) for k, v in new.items()}
    new["step"] = step + 1
    new["bad_step"] = jnp.where((state["bad_step"] < 0) & ~finite, step, state["bad_step"])
    metrics = dict(metrics, loss=loss, grad_norm=gnorm)
    return new, metrics

  return step_fn
