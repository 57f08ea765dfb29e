"""Camera rays, volume rendering against closed forms, multi-view data, NVS step."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from glue_jax.projects.lainr import multiview_data as multiview
from glue_jax.projects.lainr import volume_rendering as rays


def test_camera_rays_geometry():
  pose = multiview.look_at((0.0, -4.0, 1.0))
  o, d = jax.jit(rays.camera_rays, static_argnums=(1, 2))(pose, 4, 6, 5.0)
  o, d = np.asarray(o), np.asarray(d)
  assert o.shape == d.shape == (4, 6, 3)
  np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(o, np.broadcast_to([0.0, -4.0, 1.0], o.shape), atol=1e-6)
  # the optical axis (between the 4 central pixels) points at the target
  axis = d[1:3, 2:4].mean((0, 1))
  want = -np.array([0.0, -4.0, 1.0]) / np.linalg.norm([0.0, -4.0, 1.0])
  np.testing.assert_allclose(axis / np.linalg.norm(axis), want, atol=1e-6)
  assert d[0, 0, 2] > d[-1, 0, 2]            # row 0 is the top of the image (+z is up)
  assert (d[0, -1] - d[0, 0]) @ np.array([1.0, 0.0, 0.0]) > 0     # columns go right
  o2, d2 = multiview.pinhole_rays(pose.astype(np.float64), 6, 5.0)
  o4, d4 = rays.camera_rays(pose, 6, 6, 5.0)
  np.testing.assert_allclose(np.asarray(d4), d2, atol=1e-6)


def test_slab_matches_closed_form_transmittance():
  """A constant-density slab aligned with the bins is integrated exactly."""
  near, far, n = 2.0, 6.0, 64                         # bin width 1/16
  sigma, color, bg = 1.7, np.array([0.2, 0.6, 0.9]), np.array([1.0, 1.0, 1.0])

  def field(points, dirs):
    t = points[..., 2]                                # rays along +z from the origin
    inside = (t > 3.0) & (t < 4.5)
    rgb = jnp.broadcast_to(jnp.asarray(color, jnp.float32), points.shape)
    return rgb, jnp.where(inside, sigma, 0.0)

  o = jnp.zeros((3, 3))
  d = jnp.tile(jnp.asarray([[0.0, 0.0, 1.0]]), (3, 1))
  render = jax.jit(lambda o, d, k: rays.render_rays(field, o, d, near=near, far=far,
                                                    num_samples=n, key=k))
  out = render(o, d, None)
  trans = math.exp(-sigma * 1.5)
  np.testing.assert_allclose(np.asarray(out["opacity"]), 1 - trans, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["rgb"]),
                             np.tile(color * (1 - trans) + bg * trans, (3, 1)), rtol=1e-5)
  # stratified samples stay inside their bins: the same exact answer
  out_k = render(o, d, jax.random.key(3))
  np.testing.assert_allclose(np.asarray(out_k["opacity"]), 1 - trans, rtol=1e-5)
  w = np.asarray(out["weights"][0])
  assert abs(w.sum() - (1 - trans)) < 1e-5 and (w[:16] == 0).all()


def test_volume_render_last_bin_and_weights():
  density = jnp.asarray([[0.0, 0.0, 2.0]])
  rgb = jnp.zeros((1, 3, 3))
  far = rays.volume_render(rgb, density, 0.5, background=1.0)
  inf = rays.volume_render(rgb, density, 0.5, background=1.0, last_bin="infinite")
  np.testing.assert_allclose(np.asarray(far["rgb"]), math.exp(-1.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(inf["rgb"]), 0.0, atol=1e-6)   # background hidden
  with pytest.raises(ValueError, match="last_bin"):
    rays.volume_render(rgb, density, 0.5, last_bin="open")


def test_sphere_image_matches_closed_form():
  """Constant-density sphere: opacity 1 - exp(-sigma * chord) per pixel."""
  size, focal, sigma, radius = 12, 14.0, 1.5, 1.0
  pose = multiview.look_at((0.0, -4.0, 0.0))

  def field(points, dirs):
    inside = jnp.sum(points ** 2, -1) < radius ** 2
    return jnp.zeros(points.shape), jnp.where(inside, sigma, 0.0)

  @jax.jit
  def render(pose):
    o, d = rays.camera_rays(pose, size, size, focal)
    return rays.render_rays(field, o, d, near=2.0, far=6.0, num_samples=1024)["rgb"][..., 0]
  img = np.asarray(render(pose))                     # black medium on white: 1 - opacity
  o, d = multiview.pinhole_rays(pose.astype(np.float64), size, focal)
  b = (d * o).sum(-1)
  dist2 = (o * o).sum(-1) - b * b                    # squared distance centre-ray
  chord = 2 * np.sqrt(np.maximum(radius ** 2 - dist2, 0.0))
  want = np.exp(-sigma * chord)
  assert (chord > 0).sum() > 20 and (chord == 0).sum() > 20
  # two boundary crossings, each off by at most half a bin of optical depth
  np.testing.assert_allclose(img, want, atol=sigma * 4.0 / 1024 + 1e-5)


def test_procedural_views_agree_with_volume_rendering():
  """The analytic renderer == volume rendering of an opaque, shaded sphere."""
  rng = np.random.default_rng(0)
  scene = [dict(kind="sphere", center=np.array([0.2, 0.0, 0.1]), radius=0.6,
                color=np.array([0.9, 0.4, 0.1]))]
  pose = multiview.orbit_poses(rng, 1)[0]
  size, focal = 16, 20.0
  o, d = multiview.pinhole_rays(pose.astype(np.float64), size, focal)
  analytic = multiview.render_scene(scene, o, d)
  c = jnp.asarray(scene[0]["center"], jnp.float32)
  light = jnp.asarray(multiview._LIGHT, jnp.float32)

  def field(points, dirs):
    rel = points - c
    normal = rel / jnp.linalg.norm(rel, axis=-1, keepdims=True)
    shade = 0.3 + 0.7 * jnp.clip(normal @ light, 0.0, 1.0)
    rgb = shade[..., None] * jnp.asarray(scene[0]["color"], jnp.float32)
    return rgb, jnp.where(jnp.sum(rel ** 2, -1) < 0.36, 2000.0, 0.0)
  vol = jax.jit(lambda o, d: rays.render_rays(field, o, d, near=2.0, far=6.0,
                                              num_samples=1024)["rgb"])(
      jnp.asarray(o, jnp.float32), jnp.asarray(d, jnp.float32))
  err = np.abs(np.asarray(vol) - analytic).max(-1)
  assert (analytic.min(-1) < 0.99).sum() > 20              # the sphere is in view
  assert np.median(err) < 1e-3 and (err > 0.05).mean() < 0.1, err  # edges may differ


def test_procedural_dataset_format():
  a = multiview.procedural(3, 4, 16, seed=5)
  b = multiview.procedural(3, 4, 16, seed=5)
  assert a["images"].shape == (3, 4, 16, 16, 3) and a["images"].dtype == np.uint8
  assert a["poses"].shape == (3, 4, 4, 4) and a["focal"].shape == (3,)
  np.testing.assert_array_equal(a["images"], b["images"])
  assert (a["images"][:, :, 0, 0] == 255).all()             # white background corners
  assert (a["images"] < 250).any(axis=(2, 3, 4)).all()       # every view shows the object
  dist = np.linalg.norm(a["poses"][..., :3, 3], axis=-1)
  np.testing.assert_allclose(dist, multiview.CAMERA_RADIUS, rtol=1e-5)


def test_shapenet_loader_layout(tmp_path):
  root = tmp_path / "learnit"
  with pytest.raises(FileNotFoundError, match="chair_splits.json"):
    multiview.load_shapenet(str(root), "chair", "train")
  os.makedirs(root / "chair" / "obj1" / "rgb")
  (root / "chair_splits.json").write_text(json.dumps({"train": ["obj1"], "test": []}))
  frames = []
  for i in range(2):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = [255, 0, 0, 255]                      # opaque red square
    Image.fromarray(rgba).save(root / "chair" / "obj1" / "rgb" / f"{i:03d}.png")
    frames.append({"file_path": f"rgb/{i:03d}", "transform_matrix": np.eye(4).tolist()})
  (root / "chair" / "obj1" / "transforms.json").write_text(
      json.dumps({"camera_angle_x": 0.6911, "frames": frames}))
  d = multiview.load_shapenet(str(root), "chair", "train")
  assert d["images"].shape == (1, 2, 8, 8, 3) and d["poses"].shape == (1, 2, 4, 4)
  np.testing.assert_array_equal(d["images"][0, 0, 0, 0], [255, 255, 255])  # onto white
  np.testing.assert_array_equal(d["images"][0, 0, 3, 3], [255, 0, 0])
  np.testing.assert_allclose(d["focal"], 4.0 / math.tan(0.6911 / 2), rtol=1e-6)
  with pytest.raises(KeyError, match="no split 'val'"):
    multiview.load_shapenet(str(root), "chair", "val")


def test_nvs_training_step_lowers_loss():
  from glue_jax.configs import lainr as lainr_configs
  from glue_jax.models import lainr as lainr_lib
  from glue_jax.projects.lainr import novel_views
  from glue_jax.projects.lainr import radiance_field as nvs
  from glue_jax.train import step as step_lib
  c = lainr_configs.get_config("task=nvs,runlocal")
  c.nvs.update(image_size=8, patch_size=4, num_samples=8, rays_per_instance=32)
  data = multiview.procedural(4, 3, 8, seed=0)
  mcfg, rcfg = novel_views.setup(c)
  assert (mcfg.in_channels, mcfg.coord_dim, mcfg.out_dim) == (9, 3, 4)
  graphdef, params = lainr_lib.init(mcfg, 0)
  tx = step_lib.make_optimizer(lr=3e-3, grad_clip=0.0)
  step = jax.jit(step_lib.make_step(nvs.make_loss(graphdef, rcfg, 32), tx))
  rng = np.random.default_rng(0)
  views = [nvs.choose_views(1, 2, {k: data[k][i] for k in ("images", "poses", "focal")}, rng)
           for i in range(4)]
  batch = {k: np.stack([v[k] for v in views]) for k in views[0]}
  assert batch["support"].shape == (4, 1, 8, 8, 3) and batch["query"].shape == (4, 2, 8, 8, 3)
  with pytest.raises(ValueError, match="views per object"):
    nvs.choose_views(2, 2, {k: data[k][0] for k in ("images", "poses", "focal")}, rng)
  state = step_lib.init_state(params, tx, ema=False)
  losses = []
  for _ in range(10):
    state, m = step(state, batch, jax.random.key(0))
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses
