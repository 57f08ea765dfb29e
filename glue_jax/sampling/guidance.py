"""Classifier-free guidance with a guidance interval (pure).

The guided velocity is ``v_u + w (v_c - v_u)`` for the spatial channels (all
of them: latents and semantics) and ``v_gu + w_g (v_gc - v_gu)`` for the
global token, computed in ONE network call on the doubled batch, and only for
``low <= t <= high`` (Kynkaenniemi et al.); outside the interval the
conditional velocity is returned unchanged (``lax.cond``, so it is exactly
the unguided value and costs one un-doubled call).

REGLUE's sampler combines SDE drifts rather than velocities; with the same
state in both branches the drift is affine in the velocity, so both give the
same guided drift (up to float rounding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# apply_fn(x, t, y, g) -> (v, v_g | None, projections | None)
ApplyFn = Callable
# velocity_fn(x, g, t, y) -> (v, v_g | None)
VelocityFn = Callable[[Array, Array | None, Array, Array], tuple[Array, Array | None]]


def conditional(apply_fn: ApplyFn) -> VelocityFn:
  def vel(x, g, t, y):
    v, v_g, _ = apply_fn(x, t, y, g)
    return v, v_g
  return vel


def classifier_free(apply_fn: ApplyFn, *, null_label: int, scale: float = 1.0,
                    global_scale: float | None = None,
                    interval: tuple[float, float] = (0.0, 1.0)) -> VelocityFn:
  """CFG velocity; ``global_scale=None`` uses ``scale`` for the global token."""
  global_scale = scale if global_scale is None else global_scale
  cond = conditional(apply_fn)
  if scale == 1.0 and global_scale == 1.0:
    return cond
  lo, hi = interval

  def guided(x, g, t, y):
    b = x.shape[0]
    y2 = jnp.concatenate([y, jnp.full_like(y, null_label)])
    g2 = None if g is None else jnp.concatenate([g, g])
    v, v_g, _ = apply_fn(jnp.concatenate([x, x]), t, y2, g2)
    v = v[b:] + scale * (v[:b] - v[b:])
    if v_g is not None:
      v_g = v_g[b:] + global_scale * (v_g[:b] - v_g[b:])
    return v, v_g

  def vel(x, g, t, y):
    inside = jnp.logical_and(t >= lo, t <= hi)
    return jax.lax.cond(inside, guided, cond, x, g, t, y)
  return vel
