"""Classifier-free guidance with a guidance interval (pure).

The rules are those of the official samplers (REGLUE ``samplers.py``
``euler_maruyama_sampler``; REPA ``samplers.py`` ``euler_sampler``):

- Guidance is on only when ``scale > 1`` and ``low <= t <= high``
  (Kynkaenniemi et al.'s interval).  With ``scale <= 1`` nothing is guided,
  the global token ([CLS]) included, whatever its own scale.  Outside the
  interval (or with ``scale <= 1``) the conditional velocity is returned
  unchanged (``lax.cond``: exactly the unguided value, one un-doubled call).
- Spatial channels, ``mode='standard'``: ``v_u + w (v_c - v_u)`` on all
  channels (latents and semantics).
- Spatial channels, ``mode='vae'`` (REGLUE's ``--vae_cfg true``): only the
  first ``latent_channels`` channels are guided, with the different formula
  ``v_c + w (v_c - v_u)``; the other (semantic) channels get the conditional
  velocity.  The official sampler uses this mode on all steps but its last,
  mean step, which uses the standard formula (the sampler handles that, see
  ``presets.make_sampler``).
- Global token: ``v_gu + w_g (v_gc - v_gu)`` when ``w_g > 0``; with
  ``w_g <= 0`` the conditional global velocity (not the unconditional one).

Both halves come from ONE network call on the doubled batch.

The interval is tested at ``guide_t`` when the sampler gives one, else at
``t``: REPA's Heun corrector evaluates the velocity at ``t_next`` but decides
whether to guide from ``t_cur`` (see ``samplers.heun``).

The official samplers combine SDE drifts rather than velocities; with the same
state in both halves the drift is affine in the velocity with weights summing
to one in every formula above, so both give the same guided drift (up to float
rounding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
# apply_fn(x, t, y, g) -> (v, v_g | None, projections | None)
ApplyFn = Callable
# velocity_fn(x, g, t, y, guide_t=None) -> (v, v_g | None); guide_t: the time
# at which interval decisions are made (default t).
VelocityFn = Callable[..., tuple[Array, Array | None]]

MODES = ("standard", "vae")


def conditional(apply_fn: ApplyFn) -> VelocityFn:
  def vel(x, g, t, y, guide_t=None):
    del guide_t
    v, v_g, _ = apply_fn(x, t, y, g)
    return v, v_g
  return vel


def is_guided(scale: float) -> bool:
  """The official rule: guidance exists only for ``cfg_scale > 1``."""
  return float(scale) > 1.0


def classifier_free(apply_fn: ApplyFn, *, null_label: int, scale: float = 1.0,
                    global_scale: float | None = None,
                    interval: tuple[float, float] = (0.0, 1.0),
                    mode: str = "standard", latent_channels: int | None = None
                    ) -> VelocityFn:
  """CFG velocity.

  Args:
    apply_fn: the network, ``(x, t, y, g) -> (v, v_g, extras)``.
    null_label: the unconditional label.
    scale: spatial guidance scale w (no guidance at all when ``<= 1``).
    global_scale: global-token scale; ``None`` uses ``scale``; ``<= 0`` gives
      the conditional global velocity.
    interval: ``(low, high)`` in t (t=1 noise), both ends included.
    mode: ``'standard'`` or ``'vae'`` (see the module docstring).
    latent_channels: guided channels of ``mode='vae'`` (the official code: 4).
  """
  if mode not in MODES:
    raise ValueError(f"CFG mode {mode!r}: one of {MODES}")
  if mode == "vae" and not latent_channels:
    raise ValueError("CFG mode 'vae' needs latent_channels (the official code guides 4)")
  global_scale = scale if global_scale is None else global_scale
  cond = conditional(apply_fn)
  if not is_guided(scale):
    return cond
  lo, hi = interval

  def guided(x, g, t, y):
    b = x.shape[0]
    y2 = jnp.concatenate([y, jnp.full_like(y, null_label)])
    g2 = None if g is None else jnp.concatenate([g, g])
    v, v_g, _ = apply_fn(jnp.concatenate([x, x]), t, y2, g2)
    v_c, v_u = v[:b], v[b:]
    if mode == "standard":
      v = v_u + scale * (v_c - v_u)
    else:
      c = latent_channels
      v = jnp.concatenate([v_c[..., :c] + scale * (v_c[..., :c] - v_u[..., :c]),
                           v_c[..., c:]], axis=-1)
    if v_g is not None:
      v_g = (v_g[b:] + global_scale * (v_g[:b] - v_g[b:]) if global_scale > 0
             else v_g[:b])
    return v, v_g

  def vel(x, g, t, y, guide_t=None):
    tg = t if guide_t is None else guide_t
    inside = jnp.logical_and(tg >= lo, tg <= hi)
    return jax.lax.cond(inside, guided, lambda *a: cond(*a), x, g, t, y)
  return vel
