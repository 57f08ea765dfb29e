"""GLoD composition sampling: global contexts and local details in velocity space.

Yamada, "GLoD: Composing Global Contexts and Local Details in Image
Generation" (arXiv 2404.15447), training-free on any conditional velocity
model.  Every step evaluates the model on the null condition, the N_g global
conditions and the N_l local conditions (one batched call) and composes

  v = v_0 + sum_i w_i G_i (v_gi - v_0) + sum_j w_j M_j (v_lj - ref_j)

with M_j the local mask (box or bitmap at latent resolution, broadcast over
all spatial channels, also REGLUE's semantic ones) and, per variant (a
reconstruction of the GLoD paper's composition rule, whose exact equation
we could not read; the variant is a switch):

- ``A`` additive (Composable Diffusion inside the box): G_i = 1, ref_j = v_0;
- ``B`` relative to global (default): G_i = 1, ref_j = v_{g parent(j)};
- ``C`` replacement: G_i = 1 - union of the active local masks refining
  global i, ref_j = v_0.

Local terms act only for ``t`` inside ``local_interval`` (t=1 noise); a local
weight of 0 removes its term exactly, so with all local weights 0 (or outside
the interval) the result is classifier-free guidance on the global
condition(s).  REGLUE's global token is guided by the global conditions only
(``v_g0 + sum_i w_i (v_gi - v_g0)``), never masked.

Conditions are a :class:`Conditions` pytree passed as the samplers' ``y``
(``samplers.euler_maruyama``/``heun`` hand it to the velocity function), so
every sample carries its own prompts, masks, weights and variant and one
compiled sampler serves all variants.  A condition is whatever the model
takes as ``y``: a class label, a token prompt (B, L) or embeddings (B, L, E).

A ``guidance_interval`` (Kynkaenniemi et al.; the presets of REGLUE, REG and
REPA) applies the weights only for ``t`` inside it; outside, every active
weight is 1 (local weights of 0 stay 0), so plain CFG composed this way gives
the conditional velocity there, as ``guidance.classifier_free`` does.

Optional layout guidance (Chen et al. 2023 backward guidance, as a velocity
term): for t >= ``t_min`` the velocity gets ``scale * grad_x E`` (the sampler
moves towards t=0 with dt < 0, so this descends E) where E is the mean over
objects of ``(1 - sum_{p in box} A[p] / sum_p A[p])^2`` and A the attention
of image tokens on the object's words of its parent global prompt, given by a
model-specific ``attention_fn`` (``SiT.prompt_attention``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from glue_jax.sampling import sample_from_keys
from glue_jax.sampling.guidance import ApplyFn, VelocityFn

Array = jax.Array

# variant -> (reference of a local term is v_0, local masks replace the global term)
VARIANTS = {"A": (True, False), "B": (False, False), "C": (True, True)}
OVERLAP_RULES = ("sum", "average", "priority")


class Conditions(NamedTuple):
  """Per-sample composition inputs (the samplers' ``y``); B = batch.

  ``P`` is the shape of one condition (``()`` labels, ``(L,)`` tokens,
  ``(L, E)`` embeddings); H, W the latent resolution.
  """
  null: Array             # (B, *P) null condition
  globals_: Array         # (B, Ng, *P)
  global_weights: Array   # (B, Ng) float
  locals_: Array          # (B, Nl, *P)
  local_weights: Array    # (B, Nl) float
  masks: Array            # (B, Nl, H, W) float in [0, 1] (overlap rule applied)
  parents: Array          # (B, Nl) int: the global condition each local refines
  ref_null: Array         # (B,) bool: local reference is v_0 (A, C) or the parent (B)
  replace: Array          # (B,) bool: local masks remove the parent's global term (C)
  object_tokens: Array | None = None   # (B, Nl, L) bool: the object's words in its parent

  @property
  def num_conditions(self) -> int:
    return 1 + self.globals_.shape[1] + self.locals_.shape[1]


# -- masks ----------------------------------------------------------------------------------

def box_masks(boxes, height: int, width: int) -> np.ndarray:
  """Hard masks (..., H, W) of normalized ``(x0, y0, x1, y1)`` boxes (..., 4).

  Rows and columns are chosen separately, so a mask is always a rectangle: a
  row (column) is inside when the box covers at least half of it; when the box
  covers no row (column) that much, its best-covered one is inside (boxes never
  vanish).  A 2D half-coverage test would instead turn a box of 0.7x0.7 cells
  centred on a cell into a plus shape (its corner cells are 0.49 covered).
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes have shape {boxes.shape}; expected (..., 4) xyxy in [0, 1]")

  def inside(lo, hi, n):                # (..., n) bool along one axis
    cells = np.arange(n, dtype=np.float64)
    a = np.clip(lo[..., None] * n, cells, cells + 1)
    b = np.clip(hi[..., None] * n, cells, cells + 1)
    cover = np.maximum(b - a, 0.0)      # overlap of [lo, hi]*n with each unit cell
    half = cover >= 0.5 - 1e-9
    best = np.arange(n) == cover.argmax(-1)[..., None]
    fallback = ~half.any(-1, keepdims=True) & (cover.max(-1, keepdims=True) > 0)
    return half | (fallback & best)
  rows = inside(boxes[..., 1], boxes[..., 3], height)
  cols = inside(boxes[..., 0], boxes[..., 2], width)
  return (rows[..., :, None] & cols[..., None, :]).astype(np.float32)


def feather(masks, sigma: float) -> np.ndarray:
  """Soft masks: 1 inside, a Gaussian fall-off (std ``sigma`` cells) outside."""
  masks = np.asarray(masks, np.float32)
  if sigma <= 0:
    return masks
  r = max(1, int(np.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  blur = masks
  for axis in (-2, -1):
    pad = [(0, 0)] * blur.ndim
    pad[axis] = (r, r)
    padded = np.pad(blur, pad)
    blur = sum(k[i] * np.take(padded, np.arange(i, i + masks.shape[axis]), axis=axis)
               for i in range(2 * r + 1))
  return np.clip(np.maximum(masks, blur), 0.0, 1.0).astype(np.float32)


def resolve_overlap(masks: Array, weights: Array, rule: str = "sum") -> Array:
  """Applies an overlap rule to (B, Nl, H, W) masks of locals with weights (B, Nl).

  ``sum``: every local adds its full term; ``average``: per-pixel
  normalisation by the number (soft: total mask) of overlapping active
  locals; ``priority``: a later local wins where it overlaps earlier ones.
  Locals with weight 0 take no part.
  """
  if rule not in OVERLAP_RULES:
    raise ValueError(f"overlap rule {rule!r}; one of {OVERLAP_RULES}")
  masks = jnp.asarray(masks, jnp.float32)
  active = (jnp.asarray(weights) != 0)[..., None, None]
  if rule == "sum":
    return masks
  m = jnp.where(active, masks, 0.0)
  if rule == "average":
    return masks / jnp.maximum(1.0, m.sum(axis=1, keepdims=True))
  # priority: multiply by prod_{k > j} (1 - m_k)
  later = jnp.cumprod((1.0 - m)[:, ::-1], axis=1)[:, ::-1]
  later = jnp.concatenate([later[:, 1:], jnp.ones_like(later[:, :1])], axis=1)
  return masks * later


def make_conditions(null, globals_, locals_, masks, *, global_weights, local_weights,
                    parents=None, variant: str = "B", overlap: str = "sum",
                    feather_sigma: float = 0.0, object_tokens=None) -> Conditions:
  """Validates and assembles :class:`Conditions`.

  Args:
    null: (B, *P) null condition.
    globals_: (B, Ng, *P) global conditions.
    locals_: (B, Nl, *P) local conditions (Nl may be 0).
    masks: (B, Nl, H, W) local masks (hard 0/1 or soft) at latent resolution.
    global_weights: scalar, (Ng,) or (B, Ng) guidance weights.
    local_weights: scalar, (Nl,) or (B, Nl).
    parents: (Nl,) or (B, Nl) index of the global each local refines (default 0).
    variant: 'A' | 'B' | 'C' (see the module docstring).
    overlap: overlap rule of :func:`resolve_overlap`.
    feather_sigma: > 0 feathers the masks (:func:`feather`, host-side).
    object_tokens: (B, Nl, L) bool, the words of each local's object in its
      parent global prompt (layout guidance only).
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r}; one of {sorted(VARIANTS)}")
  null = jnp.asarray(null)
  globals_, locals_ = jnp.asarray(globals_), jnp.asarray(locals_)
  b, ng, nl = null.shape[0], globals_.shape[1], locals_.shape[1]
  p = null.shape[1:]
  if globals_.shape != (b, ng) + p or ng < 1:
    raise ValueError(f"globals_ has shape {globals_.shape}; expected ({b}, Ng>=1, *{p})")
  if locals_.shape != (b, nl) + p:
    raise ValueError(f"locals_ has shape {locals_.shape}; expected ({b}, Nl, *{p})")
  if feather_sigma > 0:
    masks = feather(masks, feather_sigma)
  masks = jnp.asarray(masks, jnp.float32)
  if masks.ndim != 4 or masks.shape[:2] != (b, nl):
    raise ValueError(f"masks have shape {masks.shape}; expected ({b}, {nl}, H, W)")
  gw = jnp.broadcast_to(jnp.asarray(global_weights, jnp.float32), (b, ng))
  lw = jnp.broadcast_to(jnp.asarray(local_weights, jnp.float32), (b, nl))
  parents = jnp.zeros((b, nl), jnp.int32) if parents is None else \
      jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (b, nl))
  if nl and (int(parents.min()) < 0 or int(parents.max()) >= ng):
    raise ValueError(f"parents must index the {ng} global conditions")
  ref_null, replace = VARIANTS[variant]
  return Conditions(null, globals_, gw, locals_, lw, resolve_overlap(masks, lw, overlap),
                    parents, jnp.full((b,), ref_null), jnp.full((b,), replace),
                    None if object_tokens is None else jnp.asarray(object_tokens, bool))


def cfg_conditions(null, prompt, scale: float, mask_shape: tuple[int, int]) -> Conditions:
  """Plain classifier-free guidance on one condition, as a composition."""
  null, prompt = jnp.asarray(null), jnp.asarray(prompt)
  b = null.shape[0]
  return make_conditions(null, prompt[:, None], jnp.zeros((b, 0) + null.shape[1:], null.dtype),
                         jnp.zeros((b, 0) + tuple(mask_shape)), global_weights=scale,
                         local_weights=jnp.zeros((b, 0)))


def composable_conditions(null, prompts, weights, mask_shape: tuple[int, int]) -> Conditions:
  """Composable Diffusion (AND): v_0 + sum_i w_i (v_i - v_0), no masks."""
  null, prompts = jnp.asarray(null), jnp.asarray(prompts)
  b = null.shape[0]
  return make_conditions(null, prompts, jnp.zeros((b, 0) + null.shape[1:], null.dtype),
                         jnp.zeros((b, 0) + tuple(mask_shape)), global_weights=weights,
                         local_weights=jnp.zeros((b, 0)))


# -- the composed velocity ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayoutGuidance:
  """Backward layout guidance on the parent global prompt's object words.

  ``attention_fn(x, t, y, g) -> (B, N, L)``: attention of the N image tokens
  (a square grid dividing the latent grid) on the L prompt tokens.
  """
  attention_fn: Callable
  scale: float = 1.0
  t_min: float = 0.8           # guided for t >= t_min (the early steps)


def _stack_conditions(conds: Conditions) -> Array:
  """(K*B, *P): null, globals, locals, condition-major."""
  b = conds.null.shape[0]
  move = lambda a: jnp.moveaxis(a, 1, 0).reshape((-1,) + a.shape[2:])
  ys = [conds.null, move(conds.globals_)]
  if conds.locals_.shape[1]:
    ys.append(move(conds.locals_))
  out = jnp.concatenate(ys, axis=0)
  assert out.shape[0] == conds.num_conditions * b
  return out


def _evaluate(apply_fn, x, g, t, conds: Conditions, batch_conditions: bool):
  """Model outputs for every condition: v (K, B, ...), v_g (K, B, G) or None."""
  k, b = conds.num_conditions, x.shape[0]
  ys = _stack_conditions(conds)
  if batch_conditions:
    tile = lambda a: None if a is None else jnp.concatenate([a] * k, axis=0)
    v, v_g, _ = apply_fn(tile(x), t, ys, tile(g))
    v = v.reshape((k, b) + v.shape[1:])
    v_g = None if v_g is None else v_g.reshape((k, b) + v_g.shape[1:])
    return v, v_g
  outs = [apply_fn(x, t, ys[i * b:(i + 1) * b], g) for i in range(k)]
  v = jnp.stack([o[0] for o in outs])
  v_g = None if outs[0][1] is None else jnp.stack([o[1] for o in outs])
  return v, v_g


def compose(v: Array, conds: Conditions, local_on: Array) -> Array:
  """GLoD composition of per-condition velocities v (K, B, H, W, C) -> (B, H, W, C)."""
  ng, nl = conds.globals_.shape[1], conds.locals_.shape[1]
  b = v.shape[1]
  v0, vg, vl = v[0], v[1:1 + ng], v[1 + ng:]
  bcast = lambda a: a.reshape(a.shape + (1,) * (v.ndim - a.ndim))   # (N, B) -> (N, B, 1, 1, 1)
  lw = conds.local_weights.T * local_on                              # (Nl, B)
  masks = jnp.moveaxis(conds.masks, 1, 0)[..., None]                 # (Nl, B, H, W, 1)
  # Global terms; variant C removes them inside the active locals refining them.
  keep = jnp.ones((ng, b) + v.shape[2:4] + (1,), v.dtype)
  if nl:
    active = (lw != 0).astype(v.dtype)                               # (Nl, B)
    is_child = (conds.parents.T[None] == jnp.arange(ng)[:, None, None])  # (Ng, Nl, B)
    free = jnp.prod(jnp.where(is_child[..., None, None, None],
                              1.0 - bcast(active)[None] * masks[None], 1.0), axis=1)
    keep = jnp.where(bcast(conds.replace[None]), free, keep)
  out = v0 + jnp.sum(bcast(conds.global_weights.T) * keep * (vg - v0[None]), axis=0)
  if not nl:
    return out
  parent_v = vg[conds.parents.T, jnp.arange(b)[None, :]]              # (Nl, B, H, W, C)
  ref = jnp.where(bcast(conds.ref_null[None]), v0[None], parent_v)
  return out + jnp.sum(bcast(lw) * masks * (vl - ref), axis=0)


def compose_global_token(v_g: Array, conds: Conditions, weights: Array | None) -> Array:
  """Global token: v_g0 + sum_i w_i (v_gi - v_g0) over the global conditions only."""
  ng = conds.globals_.shape[1]
  w = conds.global_weights if weights is None else jnp.broadcast_to(
      jnp.asarray(weights, jnp.float32), conds.global_weights.shape)
  return v_g[0] + jnp.sum(w.T[..., None] * (v_g[1:1 + ng] - v_g[0][None]), axis=0)


def layout_energy(attention: Array, conds: Conditions, grid: int) -> Array:
  """Per-sample layout energy from (Ng, B, N, L) attention maps -> (B,)."""
  if conds.object_tokens is None:
    raise ValueError("layout guidance needs Conditions.object_tokens")
  b, nl, h, w = conds.masks.shape
  if h % grid or w % grid:
    raise ValueError(f"latent grid {h}x{w} not divisible into {grid}x{grid} tokens")
  m = conds.masks.reshape(b, nl, grid, h // grid, grid, w // grid).mean((3, 5))
  m = m.reshape(b, nl, grid * grid)
  att = attention[conds.parents, jnp.arange(b)[:, None]]            # (B, Nl, N, L)
  tok = conds.object_tokens.astype(att.dtype)                        # (B, Nl, L)
  a = jnp.einsum("bjnl,bjl->bjn", att, tok) / jnp.maximum(tok.sum(-1), 1.0)[..., None]
  inside = jnp.sum(a * m, -1) / jnp.maximum(jnp.sum(a, -1), 1e-12)
  valid = ((conds.local_weights != 0) & conds.object_tokens.any(-1)).astype(att.dtype)
  return jnp.sum(valid * jnp.square(1.0 - inside), -1) / jnp.maximum(valid.sum(-1), 1.0)


def unit_weights_outside(conds: Conditions, guided: Array) -> Conditions:
  """``conds`` whose active weights are 1 where ``guided`` (a scalar bool) is False."""
  one = lambda w: jnp.where(guided, w, jnp.where(w != 0, 1.0, 0.0).astype(w.dtype))
  return conds._replace(global_weights=one(conds.global_weights),
                        local_weights=one(conds.local_weights))


def composed_velocity(apply_fn: ApplyFn, *, local_interval: tuple[float, float] = (0.0, 1.0),
                      global_token_weights=None, batch_conditions: bool = True,
                      layout: LayoutGuidance | None = None,
                      guidance_interval: tuple[float, float] | None = None) -> VelocityFn:
  """``velocity_fn(x, g, t, conds)`` for ``samplers.euler_maruyama`` / ``heun``.

  Args:
    apply_fn: ``(x, t, y, g) -> (v, v_g | None, extras)`` velocity model.
    local_interval: (lo, hi): local terms act for lo <= t <= hi.
    global_token_weights: weights of the global token's guidance (default
      the global weights).
    batch_conditions: one model call on the (1+Ng+Nl)-times batch (default)
      or one call per condition (same result; for tests and memory).
    layout: optional backward layout guidance.
    guidance_interval: (lo, hi): the weights act for lo <= t <= hi; outside,
      every active weight (the global token's included) is 1.  None: always.
  """
  lo, hi = local_interval

  def vel(x, g, t, conds: Conditions, guide_t=None):
    # guide_t: the time the interval is tested at (Heun's corrector: t_cur,
    # as REPA's sampler decides its guidance interval).
    tg = t if guide_t is None else guide_t
    v_all, vg_all = _evaluate(apply_fn, x, g, t, conds, batch_conditions)
    local_on = jnp.logical_and(tg >= lo, tg <= hi).astype(jnp.float32)
    token_w = global_token_weights
    if guidance_interval is not None:
      guided = jnp.logical_and(tg >= guidance_interval[0], tg <= guidance_interval[1])
      conds = unit_weights_outside(conds, guided)
      if token_w is not None:
        token_w = jnp.where(guided, jnp.asarray(token_w, jnp.float32), 1.0)
    v = compose(v_all.astype(jnp.float32), conds, local_on)
    v_g = None if vg_all is None else compose_global_token(
        vg_all.astype(jnp.float32), conds, token_w)
    if layout is not None:
      v = v + _layout_term(layout, x, g, t, conds)
    return v, v_g
  return vel


def _layout_term(layout: LayoutGuidance, x, g, t, conds: Conditions) -> Array:
  ng = conds.globals_.shape[1]
  b = x.shape[0]
  ys = jnp.moveaxis(conds.globals_, 1, 0).reshape((-1,) + conds.globals_.shape[2:])

  def energy(xx):
    tile = lambda a: None if a is None else jnp.concatenate([a] * ng, axis=0)
    att = layout.attention_fn(tile(xx), t, ys, tile(g))
    att = att.reshape((ng, b) + att.shape[1:])
    grid = int(round(np.sqrt(att.shape[2])))
    return jnp.sum(layout_energy(att, conds, grid))

  def guided(xx):
    return layout.scale * jax.grad(energy)(xx)
  return jax.lax.cond(t >= layout.t_min, guided, jnp.zeros_like, x)


def sample(apply_fn: ApplyFn, conds: Conditions, keys: Array, spatial_shape, global_dim: int = 0,
           *, sampler: str = "sde", num_steps: int = 50, t_last: float = 0.04,
           **velocity_kw):
  """Composed sampling from the per-sample keys' noise -> (x0, g0).

  ``sampler``: 'sde' (Euler-Maruyama, REGLUE's) or 'ode' (Heun);
  ``velocity_kw`` go to :func:`composed_velocity`.
  """
  vel = composed_velocity(apply_fn, **velocity_kw)
  return sample_from_keys.sample_velocity(vel, keys, conds, spatial_shape=spatial_shape,
                                          global_dim=global_dim, sampler=sampler,
                                          num_steps=num_steps, t_last=t_last)
