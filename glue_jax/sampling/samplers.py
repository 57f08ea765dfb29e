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
import numpy as np

from glue_jax.sampling.guidance import VelocityFn
from glue_jax.transport import interpolants

Array = jax.Array


def linspace64(start: float, stop: float, num: int) -> np.ndarray:
  """``torch.linspace(start, stop, num, dtype=float64)`` on the host.

  The official samplers build their grids in float64 with torch, which fills
  the first half as ``start + i * step`` and the second as
  ``stop - (num - 1 - i) * step`` (our values equal torch's to a float64 ulp).
  Rounding that grid to float32 keeps grid points that equal a guidance bound
  in float64 equal to the float32 bound, so the interval test (in float32)
  decides as the official one (REPA's 50-step ODE grid has t = 0.7 exactly;
  ``jnp.linspace`` in float32 gives 0.70000005 there, outside REPA's
  [0, 0.7]).  Remaining difference: a grid point within float32 rounding of a
  bound but not equal to it in float64 counts as on the bound (none for the
  presets' step counts and bounds).
  """
  if num == 1:
    return np.array([start], np.float64)
  i = np.arange(num, dtype=np.float64)
  step = (stop - start) / (num - 1)
  return np.where(i < num // 2, start + step * i, stop - step * (num - 1 - i))


def sde_time_grid(num_steps: int = 250, t_last: float = 0.04) -> Array:
  """REGLUE's grid: linspace(1, t_last, num_steps) followed by 0 (float32)."""
  grid = np.concatenate([linspace64(1.0, t_last, num_steps), [0.0]])
  return jnp.asarray(grid.astype(np.float32))


def ode_time_grid(num_steps: int = 50) -> Array:
  """REPA's ODE grid: linspace(1, 0, num_steps + 1) (float32)."""
  return jnp.asarray(linspace64(1.0, 0.0, num_steps + 1).astype(np.float32))


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
                   t_last: float = 0.04, interpolant: str = "linear",
                   last_velocity_fn: VelocityFn | None = None):
  """REGLUE's Euler-Maruyama sampler.

  ``num_steps`` intervals on :func:`sde_time_grid`; the first
  ``num_steps - 1`` add noise ``sqrt(w(t) |dt|) xi`` with ``w(t) = 2 sigma(t)``
  (= 2t on the linear path); the last interval (t_last -> 0) is the
  deterministic "mean" step with the full drift, using ``last_velocity_fn``
  when given (REGLUE's ``vae_cfg`` mode guides its last step with the
  standard CFG formula).

  Returns:
    (x_0, g_0) in float32.
  """
  path = interpolants.get(interpolant)
  grid = sde_time_grid(num_steps, t_last)
  x = x.astype(jnp.float32)
  g = None if g is None else g.astype(jnp.float32)

  def drifts(x, g, t, fn=velocity_fn):
    v, v_g = fn(x, g, t, y)
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
  d, d_g = drifts(x, g, t_cur, last_velocity_fn or velocity_fn)
  x = x + (t_next - t_cur) * d
  if g is not None:
    g = g + (t_next - t_cur) * d_g
  return x, g


def heun(velocity_fn: VelocityFn, x: Array, g: Array | None, y: Array, *,
         num_steps: int = 50, corrector_guide: str = "t_cur"):
  """Heun ODE on linspace(1, 0, num_steps+1); the last step is Euler.

  REPA's ``euler_sampler(heun=True)``: ``2 * num_steps - 1`` network
  evaluations.  The corrector evaluates the velocity at ``t_next`` but REPA
  decides whether it is guided from ``t_cur`` (the predictor's time);
  ``corrector_guide='t_cur'`` (default) does the same by passing
  ``guide_t=t_cur`` to ``velocity_fn``; ``'t_next'`` tests the interval at
  the corrector's own time.
  """
  if corrector_guide not in ("t_cur", "t_next"):
    raise ValueError(f"corrector_guide {corrector_guide!r}: 't_cur' or 't_next'")
  grid = ode_time_grid(num_steps)
  x = x.astype(jnp.float32)
  g = None if g is None else g.astype(jnp.float32)
  def vel(x, g, t, **kw):
    v, v_g = velocity_fn(x, g, t, y, **kw)
    return v.astype(jnp.float32), (None if v_g is None else v_g.astype(jnp.float32))

  def body(carry, i):
    state = carry
    t_cur, t_next = grid[i], grid[i + 1]
    dt = t_next - t_cur
    d1 = vel(*state, t_cur)
    euler = jax.tree.map(lambda s, d: s + dt * d, state, d1)
    kw = {"guide_t": t_cur} if corrector_guide == "t_cur" else {}
    d2 = vel(*euler, t_next, **kw)
    new = jax.tree.map(lambda s, a, b: s + dt * 0.5 * (a + b), state, d1, d2)
    return new, None

  state, _ = jax.lax.scan(body, (x, g), jnp.arange(num_steps - 1))
  dt = grid[num_steps] - grid[num_steps - 1]
  d = vel(*state, grid[num_steps - 1])
  return jax.tree.map(lambda s, v: s + dt * v, state, d)
