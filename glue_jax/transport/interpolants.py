"""Interpolants ``x_t = alpha(t) * x_data + sigma(t) * noise`` (t=0 data, t=1 noise).

Every function is pure and works on arrays of times of any shape.  The
velocity target is ``d x_t / dt = alpha'(t) x_data + sigma'(t) noise``; for the
linear path (REGLUE/REPA/REG) that is ``noise - x_data``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Interpolant:
  """alpha, sigma and their time derivatives."""
  name: str
  alpha: Callable[[Array], Array]
  sigma: Callable[[Array], Array]
  d_alpha: Callable[[Array], Array]
  d_sigma: Callable[[Array], Array]

  def interpolate(self, x_data: Array, noise: Array, t: Array) -> Array:
    t = _expand(t, x_data)
    return self.alpha(t) * x_data + self.sigma(t) * noise

  def velocity(self, x_data: Array, noise: Array, t: Array) -> Array:
    t = _expand(t, x_data)
    return self.d_alpha(t) * x_data + self.d_sigma(t) * noise

  def split_velocity(self, x: Array, v: Array, t: Array) -> tuple[Array, Array]:
    """(x_data, noise) implied by state ``x`` and velocity ``v`` at time t.

    Solves ``x = a x0 + s e`` and ``v = a' x0 + s' e`` for ``(x0, e)``.
    """
    t = _expand(t, x)
    a, s, da, ds = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
    det = a * ds - s * da
    return (ds * x - s * v) / det, (a * v - da * x) / det

  def score(self, x: Array, v: Array, t: Array) -> Array:
    """Score ``grad log p_t(x) = -noise / sigma`` from the velocity."""
    _, noise = self.split_velocity(x, v, t)
    return -noise / self.sigma(_expand(t, x))

  def diffusion(self, t: Array) -> Array:
    """SDE diffusion coefficient w(t) = 2 sigma(t) (REPA/REGLUE: 2t)."""
    return 2.0 * self.sigma(t)


def _expand(t: Array, like: Array) -> Array:
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


LINEAR = Interpolant(
    name="linear",
    alpha=lambda t: 1.0 - t,
    sigma=lambda t: t,
    d_alpha=lambda t: -jnp.ones_like(t),
    d_sigma=lambda t: jnp.ones_like(t),
)

# Generalised variance preserving (cosine) path used by SiT's 'GVP'.
GVP = Interpolant(
    name="gvp",
    alpha=lambda t: jnp.cos(0.5 * math.pi * t),
    sigma=lambda t: jnp.sin(0.5 * math.pi * t),
    d_alpha=lambda t: -0.5 * math.pi * jnp.sin(0.5 * math.pi * t),
    d_sigma=lambda t: 0.5 * math.pi * jnp.cos(0.5 * math.pi * t),
)

INTERPOLANTS = {"linear": LINEAR, "gvp": GVP, "cosine": GVP}


def get(name: str) -> Interpolant:
  if name not in INTERPOLANTS:
    raise ValueError(f"unknown interpolant {name!r}; one of {sorted(INTERPOLANTS)}")
  return INTERPOLANTS[name]


def sample_time(key: Array, shape, kind: str = "uniform", *, mean: float = 0.0,
                std: float = 1.0, eps: float = 0.0) -> Array:
  """Training times in [eps, 1-eps].

  kind: 'uniform' (REGLUE/REPA), 'logit_normal' (sigmoid of N(mean, std)) or
  'lognormal' (EDM: sigma ~ exp(N(mean, std)), t = sigma / (1 + sigma)).
  """
  if kind == "uniform":
    t = jax.random.uniform(key, shape)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))
  elif kind == "lognormal":
    s = jnp.exp(mean + std * jax.random.normal(key, shape))
    t = s / (1.0 + s)
  else:
    raise ValueError(f"unknown time distribution {kind!r}")
  return jnp.clip(t, eps, 1.0 - eps) if eps else t
