"""LA-INR as a generalizable radiance field: few-shot novel view synthesis (pure).

Support views enter the encoder as 9-channel images (RGB mapped to [-1, 1],
ray origin, ray direction per pixel, as in IPC/TransINR); the decoder maps a
3-D point (divided by ``scene_scale`` so the object spans about [-1, 1]; with
``view_dirs`` the unit view direction is appended: 6 coordinates) to
(RGB logits, density logit).  RGB = sigmoid; density = relu (NeRF) or
softplus (the default here: its gradient is never exactly zero, so empty
space cannot get stuck at zero density).  Colours are volume rendered
(``volume_rendering.render_rays``) against a white background; the loss is the MSE of
randomly chosen rays of the query views.  ``choose_views`` draws disjoint
support/query views per object (on the host, in the Grain pipeline);
``evaluate`` renders held-out views.

Not fixed by the LA-INR paper and therefore switches: whether the view direction is
an input (``view_dirs``, default False: the ShapeNet renders and the
procedural set are close to view independent), the density activation, and
the length of the last bin (``last_bin``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glue_jax.models import lainr as lainr_lib
from glue_jax.projects.lainr import volume_rendering as rays_lib


@dataclasses.dataclass(frozen=True)
class RenderConfig:
  near: float = 2.0
  far: float = 6.0
  num_samples: int = 128
  white_background: bool = True
  density_activation: str = "softplus"   # 'relu' (NeRF) | 'softplus'
  scene_scale: float = 1.5
  view_dirs: bool = False
  last_bin: str = "far"

  def __post_init__(self):
    if self.density_activation not in ("relu", "softplus"):
      raise ValueError(f"density_activation={self.density_activation!r} ('relu' | 'softplus')")
    if not 0 < self.near < self.far:
      raise ValueError(f"need 0 < near < far, got near={self.near}, far={self.far}")

  @property
  def coord_dim(self) -> int:
    return 6 if self.view_dirs else 3


def support_input(images: jax.Array, poses: jax.Array, focal: jax.Array) -> jax.Array:
  """(B, S, H, W, 3) uint8/[0,1] views + poses (B, S, 4, 4) -> (B, S, H, W, 9)."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  h, w = images.shape[2:4]
  o, d = rays_lib.camera_rays(poses, h, w, focal[:, None])
  return jnp.concatenate([2 * x - 1, o, d], axis=-1)


def render_chunk(decoder: lainr_lib.Decoder, prepared: dict, rays: jax.Array,
                 rcfg: RenderConfig, key: jax.Array | None = None) -> jax.Array:
  """Rays (B, K, 6) = [origin, unit direction] -> rendered RGB (B, K, 3)."""
  b, k = rays.shape[:2]

  def field(points, dirs):
    coords = points / rcfg.scene_scale                          # (B, K, S, 3)
    if rcfg.view_dirs:
      coords = jnp.concatenate([coords, jnp.broadcast_to(dirs[..., None, :], coords.shape)], -1)
    s = coords.shape[2]
    out, _ = decoder.query(prepared, coords.reshape(b, k * s, -1))
    out = out.reshape(b, k, s, -1)
    act = jax.nn.relu if rcfg.density_activation == "relu" else jax.nn.softplus
    return jax.nn.sigmoid(out[..., :3]), act(out[..., 3])

  out = rays_lib.render_rays(field, rays[..., :3], rays[..., 3:], near=rcfg.near,
                             far=rcfg.far, num_samples=rcfg.num_samples, key=key,
                             background=1.0 if rcfg.white_background else 0.0,
                             last_bin=rcfg.last_bin)
  return out["rgb"]


def query_rays(images: jax.Array, poses: jax.Array, focal: jax.Array):
  """Query views (B, Q, H, W, 3) -> rays (B, Q*H*W, 6) and targets (B, Q*H*W, 3)."""
  b, q, h, w, _ = images.shape
  o, d = rays_lib.camera_rays(poses, h, w, focal[:, None])
  rays = jnp.concatenate([o, d], -1).reshape(b, q * h * w, 6)
  target = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    target = target / 255.0
  return rays, target.reshape(b, q * h * w, 3)


def make_loss(graphdef, rcfg: RenderConfig, rays_per_instance: int):
  """The trainer's ``loss(params, rest, batch, key, step)``: MSE of
  ``rays_per_instance`` random query rays per object, rendered from the
  support views' latent tokens; batch from :func:`choose_views`."""
  def loss(params, rest, batch, key, step):
    del rest, step
    model = nnx.merge(graphdef, params)
    k_rays, k_strat, k_drop = jax.random.split(key, 3)
    z = model.encode(support_input(batch["support"], batch["support_poses"], batch["focal"]),
                     key=k_drop)
    rays, target = query_rays(batch["query"], batch["query_poses"], batch["focal"])
    b, n = rays.shape[:2]
    idx = jax.random.randint(k_rays, (b, rays_per_instance), 0, n)
    rays = jnp.take_along_axis(rays, idx[..., None], 1)
    target = jnp.take_along_axis(target, idx[..., None], 1)
    rgb = render_chunk(model.decoder, model.decoder.prepare(z), rays, rcfg, k_strat)
    per = jnp.mean(jnp.square(rgb - target), axis=(1, 2))
    return per.mean(), ({"psnr": jnp.mean(-10.0 * jnp.log10(per))}, None)
  return loss


def make_render_views(graphdef, rcfg: RenderConfig, chunk: int = 1024):
  """``f(params, support, support_poses, query_poses, focal) -> (B, Q, H, W, 3)``
  rendered with bin-midpoint samples, ``chunk`` rays at a time."""
  def f(params, support, support_poses, query_poses, focal):
    model = nnx.merge(graphdef, params)
    z = model.encode(support_input(support, support_poses, focal))
    b, q = query_poses.shape[:2]
    h, w = support.shape[2:4]
    o, d = rays_lib.camera_rays(query_poses, h, w, focal[:, None])
    rays = jnp.concatenate([o, d], -1).reshape(b, q * h * w, 6)
    rgb = lainr_lib.decode_chunked(model.decoder, z, rays, chunk,
                                   fn=lambda dec, prep, c: render_chunk(dec, prep, c, rcfg))
    return rgb.reshape(b, q, h, w, 3)
  return f


def choose_views(support: int, query: int, example: dict, rng: np.random.Generator) -> dict:
  """Disjoint random support and query views of one object (a Grain
  ``random_map``: every epoch draws anew, deterministically in the seed and
  the element's position) from a ``glue_jax.projects.lainr.multiview_data`` object
  ``{'images' (V,H,W,3), 'poses' (V,4,4), 'focal'}``."""
  v = example["images"].shape[0]
  if support + query > v:
    raise ValueError(f"nvs: {support} support + {query} query views > {v} views per object")
  views = rng.permutation(v)[:support + query]
  s, q = views[:support], views[support:]
  return {"support": example["images"][s], "support_poses": example["poses"][s],
          "query": example["images"][q], "query_poses": example["poses"][q],
          "focal": np.float32(example["focal"])}


def evaluate(render_fn, params, data: dict, support: int, batch_size: int = 4):
  """Support = the first ``support`` views of each object, queries = the rest.

  Returns per-view PSNR (unclipped, -10 log10 MSE) and the renders."""
  n = len(data["images"])
  scores, renders = [], []
  for i in range(0, n, batch_size):
    sl = slice(i, min(i + batch_size, n))
    out = np.asarray(render_fn(params, data["images"][sl, :support],
                               data["poses"][sl, :support], data["poses"][sl, support:],
                               data["focal"][sl]))
    target = data["images"][sl, support:].astype(np.float32) / 255.0
    mse = np.square(out - target).reshape(out.shape[0] * out.shape[1], -1).mean(-1)
    scores.append(-10.0 * np.log10(mse))
    renders.append(out)
  return np.concatenate(scores), np.concatenate(renders)
