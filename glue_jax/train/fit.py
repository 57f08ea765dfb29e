"""A small supervised fitting loop for auxiliary networks (demo encoder,
semantic compressor): NNX module + loss + optax, jitted, with BatchNorm
statistics carried functionally.  The diffusion trainer is ``loop.py``.
Also the shared train step of the LA-INR tasks (:func:`mse_step`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm


def fit(module: nnx.Module, loss_fn: Callable, batches: Iterator, *, steps: int,
        tx: optax.GradientTransformation, seed: int = 0, desc: str = "fit",
        log_every: int = 50, on_log: Callable[[int, float], None] | None = None):
  """Trains ``module`` in place; ``loss_fn(module, batch, key) -> scalar``.

  Returns the list of (step, loss) pairs logged every ``log_every`` steps.
  """
  graphdef, params_state, rest_state = nnx.split(module, nnx.Param, ...)
  # Pure dicts: fresh Variables are built inside each trace (NNX forbids
  # mutating a BatchStat created at another trace level).
  params, rest = nnx.to_pure_dict(params_state), nnx.to_pure_dict(rest_state)
  opt_state = tx.init(params)

  def step(params, rest, opt_state, batch, key):
    def f(p, r):
      m = nnx.merge(graphdef, p, r)
      loss = loss_fn(m, batch, key)
      return loss, nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
    (loss, new_rest), g = jax.value_and_grad(f, has_aux=True)(params, rest)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2))
  base = jax.random.key(seed)
  history = []
  bar = tqdm(range(steps), desc=desc, mininterval=5.0)
  for i in bar:
    params, rest, opt_state, loss = step(params, rest, opt_state, next(batches),
                                         jax.random.fold_in(base, i))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      val = float(loss)
      if not jax.numpy.isfinite(val):
        raise FloatingPointError(f"{desc}: non-finite loss at step {i}")
      history.append((i + 1, val))
      bar.set_postfix(loss=f"{val:.4f}")
      if on_log:
        on_log(i + 1, val)
  nnx.replace_by_pure_dict(params_state, params)
  nnx.replace_by_pure_dict(rest_state, rest)
  nnx.update(module, params_state, rest_state)
  return history


def batches_from(arrays: dict, batch_size: int, seed: int) -> Iterator[dict]:
  """Endless shuffled minibatches of in-memory arrays (numpy)."""
  import numpy as np
  n = len(next(iter(arrays.values())))
  if n < batch_size:          # no full batch: the loop below would never yield
    raise ValueError(f"batches_from: {n} examples (keys {sorted(arrays)}) are fewer than "
                     f"batch_size={batch_size}")
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx = np.sort(perm[i:i + batch_size])
      yield {k: v[idx] for k, v in arrays.items()}


def mse_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """``step(state, batch, base_key) -> (state, metrics)`` over a pure train state
  ``{'params', 'opt_state', 'step'}``; ``loss_fn(params, batch, key) -> (mean MSE,
  per-example MSE)``.  Step s draws its key as ``fold_in(base_key, s)``; the
  metrics are the loss, PSNR (mean over examples of -10 log10 MSE) and the
  gradient norm."""
  def step(state, batch, base_key):
    key = jax.random.fold_in(base_key, state["step"])
    (loss, per), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "psnr": jnp.mean(-10.0 * jnp.log10(per)),
               "grad_norm": optax.global_norm(grads)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
  return step
