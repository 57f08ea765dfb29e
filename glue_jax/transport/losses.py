"""Multimodal velocity loss and REPA alignment (pure functions).

REGLUE's objective (REGLUE paper, the multimodal velocity loss), with t shared by all modalities of a
sample and one noise tensor for the spatial stack and one for the global
token:

  L = L_z + lambda_s * L_s + lambda_g * L_global + lambda_align * L_align

Each term is a mean over its own elements per sample, then over the batch
(separate means: one mean over all 20 channels would down-weight z to 4/20).
SiT, REPA, REG and ReDi are the same function with some weights zero or some
inputs absent.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from glue_jax.transport import interpolants

Array = jax.Array
# apply_fn(x_t, t, y, global_t) -> (v_spatial, v_global | None, projections | None)
ApplyFn = Callable[[Array, Array, Array, Array | None],
                   tuple[Array, Array | None, Array | None]]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  interpolant: str = "linear"
  latent_channels: int = 4
  semantic_weight: float = 1.0
  # ((from_step, factor), ...): lambda_s is multiplied by the factor of the
  # last entry whose from_step <= step.  REGLUE's XL code path uses
  # ((250_000, 0.5), (500_000, 0.25)).
  semantic_weight_schedule: tuple[tuple[int, float], ...] = ()
  global_weight: float = 0.03
  align_weight: float = 0.5
  align_patches: bool = True   # align projected patch tokens to encoder patches
  align_global: bool = True    # align projected global token to the [CLS]


def semantic_weight_at(cfg: LossConfig, step) -> Array:
  """lambda_s at ``step`` (a traced int is fine)."""
  w = jnp.asarray(cfg.semantic_weight, jnp.float32)
  for from_step, factor in cfg.semantic_weight_schedule:
    w = jnp.where(jnp.asarray(step) >= from_step, cfg.semantic_weight * factor, w)
  return w


def _per_sample_mse(a: Array, b: Array) -> Array:
  return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


def negative_cosine(pred: Array, target: Array, eps: float = 1e-12) -> Array:
  """-cos along the last axis, like ``F.normalize`` (norm clamped at eps)."""
  pn = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), eps)
  tn = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), eps)
  return -jnp.sum(pn * tn, axis=-1)


def alignment_loss(projections: Array, patch_target: Array | None,
                   global_target: Array | None, *, align_patches: bool,
                   align_global: bool) -> Array:
  """Per-sample REPA loss: mean over the selected tokens of -cos.

  ``projections`` is (B, T, Z) over the network's tokens: T = 1 + N when the
  network has a global token (token 0), else N.  Patch targets are (B, N, Z),
  the global target (B, Z).
  """
  terms = []
  n_patch = patch_target.shape[1] if patch_target is not None else None
  has_global_slot = (n_patch is not None and projections.shape[1] == n_patch + 1) or (
      n_patch is None and global_target is not None)
  if align_global:
    if global_target is None or not has_global_slot:
      raise ValueError("align_global needs a global token and its target")
    terms.append(negative_cosine(projections[:, 0], global_target)[:, None])
  if align_patches:
    if patch_target is None:
      raise ValueError("align_patches needs encoder patch targets")
    proj = projections[:, 1:] if has_global_slot else projections
    if proj.shape[:2] != patch_target.shape[:2]:
      raise ValueError(f"projections {projections.shape} do not match patch "
                       f"targets {patch_target.shape}")
    terms.append(negative_cosine(proj, patch_target))
  if not terms:
    raise ValueError("alignment requested with neither patches nor global")
  return jnp.mean(jnp.concatenate(terms, axis=1), axis=1)


def velocity_loss(apply_fn: ApplyFn, batch: dict, t: Array, noise: Array,
                  noise_global: Array | None, cfg: LossConfig,
                  step=0) -> tuple[Array, dict]:
  """Multimodal velocity loss for one batch; pure given t and noise.

  Args:
    apply_fn: the velocity network (label dropout already bound).
    batch: 'x' (B,H,W,C) clean spatial target [latents; semantics], 'y' (B,),
      optionally 'global' (B,G) clean global token and 'align_target'
      (B,N,Z) encoder patch tokens.
    t: (B,) times; noise: like batch['x']; noise_global: like batch['global'].
    cfg: weights and switches.
    step: training step (for the semantic-weight schedule).
  Returns:
    (scalar loss, aux) where aux holds every term (scalars) and
    'per_sample' (B,) totals for per-time-bucket logging.
  """
  path = interpolants.get(cfg.interpolant)
  x0 = batch["x"]
  g0 = batch.get("global")
  x_t = path.interpolate(x0, noise, t)
  u = path.velocity(x0, noise, t)
  g_t = u_g = None
  if g0 is not None:
    g_t = path.interpolate(g0, noise_global, t)
    u_g = path.velocity(g0, noise_global, t)
  v, v_g, proj = apply_fn(x_t, t, batch["y"], g_t)

  lc = cfg.latent_channels
  terms = {"latent": _per_sample_mse(v[..., :lc], u[..., :lc])}
  per_sample = terms["latent"]
  if x0.shape[-1] > lc:
    terms["semantic"] = _per_sample_mse(v[..., lc:], u[..., lc:])
    per_sample = per_sample + semantic_weight_at(cfg, step) * terms["semantic"]
  if g0 is not None:
    terms["global"] = _per_sample_mse(v_g, u_g)
    per_sample = per_sample + cfg.global_weight * terms["global"]
  if cfg.align_weight and (cfg.align_patches or cfg.align_global):
    if proj is None:
      raise ValueError("align_weight > 0 but the network has no projector")
    terms["align"] = alignment_loss(
        proj, batch.get("align_target"), g0,
        align_patches=cfg.align_patches, align_global=cfg.align_global)
    per_sample = per_sample + cfg.align_weight * terms["align"]
  aux = {k: jnp.mean(val) for k, val in terms.items()}
  aux["semantic_weight"] = semantic_weight_at(cfg, step)
  aux["per_sample"] = per_sample
  loss = jnp.mean(per_sample)
  aux["loss"] = loss
  return loss, aux
