"""Camera rays and emission-absorption volume rendering (pure JAX).

Camera convention (NeRF / Blender, also ShapeNet "learnit" renders): a
camera-to-world matrix ``c2w`` (4x4 or 3x4); the camera looks down its -z
axis with +y up and +x right.  Pixel (row i, col j) of an HxW image with focal
length f (pixels) has the camera-space direction
``((j + c - W/2) / f, -(i + c - H/2) / f, -1)`` with ``c = pixel_center``
(0.5: through the pixel centre; NeRF's original code uses 0).  Directions are
normalised, so depths t are Euclidean distances along the ray.

Quadrature: [near, far] is cut into ``num_samples`` equal bins of width
``delta``; each bin is represented by one sample (its midpoint, or a uniform
random point in the bin when a key is given: stratified sampling) and its
density is taken as constant over the bin:
  alpha_i = 1 - exp(-sigma_i delta),  T_i = exp(-sum_{j<i} sigma_j delta),
  w_i = T_i alpha_i,  C = sum_i w_i c_i + (1 - sum_i w_i) * background.
The last bin ends at ``far`` (NeRF instead gives it an infinite length, which
makes the background invisible behind any density; ``last_bin='infinite'``).
For a piecewise-constant field whose pieces align with bin edges this is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def camera_rays(c2w: jax.Array, height: int, width: int, focal, *,
                pixel_center: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Origins and unit directions ``(..., H, W, 3)`` for poses ``(..., 3|4, 4)``.

  ``focal`` broadcasts against the leading axes of ``c2w`` (a scalar, or one
  focal length per pose).
  """
  c2w = jnp.asarray(c2w, jnp.float32)
  if c2w.shape[-2:] not in ((3, 4), (4, 4)):
    raise ValueError(f"camera_rays: pose shape {c2w.shape}, expected (..., 3|4, 4)")
  lead = c2w.shape[:-2]
  focal = jnp.broadcast_to(jnp.asarray(focal, jnp.float32), lead)[..., None, None]
  rows = jnp.arange(height, dtype=jnp.float32)[:, None] + pixel_center
  cols = jnp.arange(width, dtype=jnp.float32)[None, :] + pixel_center
  x = (cols - width / 2.0) / focal                         # (..., 1|H, W)
  y = -(rows - height / 2.0) / focal
  x, y = jnp.broadcast_arrays(x, y)
  cam = jnp.stack([x, y, -jnp.ones_like(x)], -1)           # (..., H, W, 3)
  rot = c2w[..., :3, :3]
  dirs = jnp.einsum("...ij,...hwj->...hwi", rot, cam)
  dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
  origins = jnp.broadcast_to(c2w[..., None, None, :3, 3], dirs.shape)
  return origins, dirs


def sample_depths(batch_shape, near: float, far: float, num_samples: int,
                  key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Depths ``(*batch_shape, S)`` and the bin width (scalar).

  Without a key: bin midpoints; with a key: one uniform point per bin.
  """
  delta = (far - near) / num_samples
  edges = near + delta * jnp.arange(num_samples, dtype=jnp.float32)
  shape = tuple(batch_shape) + (num_samples,)
  u = (jnp.full(shape, 0.5, jnp.float32) if key is None
       else jax.random.uniform(key, shape, jnp.float32))
  return edges + u * delta, jnp.float32(delta)


def volume_render(rgb: jax.Array, density: jax.Array, delta, *,
                  background=1.0, last_bin: str = "far") -> dict:
  """Alpha compositing along the sample axis.

  Args:
    rgb: (..., S, C) colours; density: (..., S) non-negative sigma.
    delta: bin widths, a scalar or (..., S).
    background: colour behind the volume (1.0 = white), scalar or (..., C).
    last_bin: 'far' (the last bin ends at far) or 'infinite' (NeRF).
  Returns:
    {'rgb': (..., C), 'opacity': (...), 'weights': (..., S)}.
  """
  delta = jnp.broadcast_to(jnp.asarray(delta, jnp.float32), density.shape)
  if last_bin == "infinite":
    delta = delta.at[..., -1].set(1e10)
  elif last_bin != "far":
    raise ValueError(f"volume_render: last_bin={last_bin!r} ('far' | 'infinite')")
  tau = density.astype(jnp.float32) * delta
  alpha = 1.0 - jnp.exp(-tau)
  # exclusive cumulative optical depth -> transmittance before each bin
  trans = jnp.exp(-(jnp.cumsum(tau, axis=-1) - tau))
  weights = trans * alpha
  opacity = weights.sum(-1)
  color = jnp.einsum("...s,...sc->...c", weights, rgb.astype(jnp.float32))
  color = color + (1.0 - opacity)[..., None] * jnp.asarray(background, jnp.float32)
  return {"rgb": color, "opacity": opacity, "weights": weights}


def render_rays(field_fn, origins: jax.Array, dirs: jax.Array, *, near: float, far: float,
                num_samples: int, key: jax.Array | None = None, background=1.0,
                last_bin: str = "far") -> dict:
  """Renders rays ``(..., 3)`` through ``field_fn(points (..., S, 3), dirs (..., 3))
  -> (rgb (..., S, C), density (..., S))``."""
  t, delta = sample_depths(origins.shape[:-1], near, far, num_samples, key)
  points = origins[..., None, :] + t[..., None] * dirs[..., None, :]
  rgb, density = field_fn(points, dirs)
  out = volume_render(rgb, density, delta, background=background, last_bin=last_bin)
  out["depth"] = (out["weights"] * t).sum(-1)
  return out

