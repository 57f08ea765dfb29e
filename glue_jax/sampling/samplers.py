"""Euler-Maruyama SDE and Heun ODE samplers over a multimodal state.

The state is ``(x, g)``: the spatial tensor (B,H,W,C) and the optional global
token (B,G) (None for networks without one).  Integration runs from t=1
(noise) to t=0 (data) in float32 inside ``lax.scan``.

Noise is drawn from *per-sample* keys (``keys`` has the batch as leading
axis) folded with the step index, so a sample's trajectory depends on its own
key only: results do not change with batch size or with the number of
devices the batch is split over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glue_jax.sampling.guidance import VelocityFn
from glue_jax.transport import interpolants

Array = jax.Array


def sde_time_grid(num_steps: int = 250, t_last: float = 0.04) -> Array:
  """REGLUE's grid: linspace(1, t_last, num_steps) followed by 0."""
  return jnp.concatenate([jnp.linspace(1.0, t_last, num_steps, dtype=jnp.float32),
                          jnp.zeros((1,), jnp.float32)])


def per_sample_keys(seed: int, indices: Array) -> Array:
  """Key of sample ``i`` derived from ``(seed, i)`` alone."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices))


def initial_noise(keys: Array, spatial_shape, global_dim: int = 0):
  """x_1 ~ N(0, I) (and g_1) from per-sample keys."""
  def one(k):
    kx, kg = jax.random.split(jax.random.fold_in(k, 0x5EED))
    x = jax.random.normal(kx, tuple(spatial_shape), jnp.float32)
    g = jax.random.normal(kg, (global_dim,), jnp.float32) if global_dim else None
    return x, g
  return jax.vmap(one)(keys)


def _step_noise(keys, step, x, g):
  def one(k):
    kx, kg = jax.random.split(jax.random.fold_in(k, step))
    nx = jax.random.normal(kx, x.shape[1:], jnp.float32)
    ng = None if g is None else jax.random.normal(kg, g.shape[1:], jnp.float32)
    return nx, ng
  return jax.vmap(one)(keys)


def _drift(path, x, v, t):
  """SDE drift d = v - w(t)/2 * score(x, v, t)."""
  return v - 0.5 * path.diffusion(t) * path.score(x, v, t)


def euler_maruyama(velocity_fn: VelocityFn, x: Array, g: Array | None,
                   y: Array, keys: Array, *, num_steps: int = 250,
                   t_last: float = 0.04, interpolant: str = "linear"):
  """REGLUE's Euler-Maruyama sampler.

  ``num_steps`` intervals on :func:`sde_time_grid`; the first
  ``num_steps - 1`` add noise ``sqrt(w(t) |dt|) xi`` with ``w(t) = 2 sigma(t)``
  (= 2t on the linear path); the last interval (t_last -> 0) is the
  deterministic "mean" step with the full drift.

  Returns:
    (x_0, g_0) in float32.
  """
  path = interpolants.get(interpolant)
  grid = sde_time_grid(num_steps, t_last)
  x = x.astype(jnp.float32)
  g = None if g is None else g.astype(jnp.float32)

  def drifts(x, g, t):
    v, v_g = velocity_fn(x, g, t, y)
    d = _drift(path, x, v.astype(jnp.float32), t)
    d_g = None if g is None else _drift(path, g, v_g.astype(jnp.float32), t)
    return d, d_g

  def body(carry, i):
    x, g = carry
    t_cur, t_next = grid[i], grid[i + 1]
    dt = t_next - t_cur
    d, d_g = drifts(x, g, t_cur)
    nx, ng = _step_noise(keys, i, x, g)
    amp = jnp.sqrt(path.diffusion(t_cur) * jnp.abs(dt))
    x = x + d * dt + amp * nx
    if g is not None:
      g = g + d_g * dt + amp * ng
    return (x, g), None

  (x, g), _ = jax.lax.scan(body, (x, g), jnp.arange(num_steps - 1))
  t_cur, t_next = grid[num_steps - 1], grid[num_steps]
  d, d_g = drifts(x, g, t_cur)
  x = x + (t_next - t_cur) * d
  if g is not None:
    g = g + (t_next - t_cur) * d_g
  return x, g


def heun(velocity_fn: VelocityFn, x: Array, g: Array | None, y: Array, *,
         num_steps: int = 50):
  """Heun ODE on linspace(1, 0, num_steps+1); the last step is Euler.

  Uses ``2 * num_steps - 1`` network evaluations (REPA's ODE sampler).
  """
  grid = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  x = x.astype(jnp.float32)
  g = None if g is None else g.astype(jnp.float32)
  def vel(x, g, t):
    v, v_g = velocity_fn(x, g, t, y)
    return v.astype(jnp.float32), (None if v_g is None else v_g.astype(jnp.float32))

  def body(carry, i):
    state = carry
    t_cur, t_next = grid[i], grid[i + 1]
    dt = t_next - t_cur
    d1 = vel(*state, t_cur)
    euler = jax.tree.map(lambda s, d: s + dt * d, state, d1)
    d2 = vel(*euler, t_next)
    new = jax.tree.map(lambda s, a, b: s + dt * 0.5 * (a + b), state, d1, d2)
    return new, None

  state, _ = jax.lax.scan(body, (x, g), jnp.arange(num_steps - 1))
  dt = grid[num_steps] - grid[num_steps - 1]
  d = vel(*state, grid[num_steps - 1])
  return jax.tree.map(lambda s, v: s + dt * v, state, d)
