"""Multi-view datasets for few-shot novel view synthesis (posed images of objects).

Every loader returns the same dict (host numpy):
  'images' (N, V, H, W, 3) uint8, composited on a white background;
  'poses'  (N, V, 4, 4) float32 camera-to-world (camera looks down -z, +y up,
           see ``glue_jax.projects.lainr.volume_rendering``);
  'focal'  (N,) float32 focal length in pixels;
  'near', 'far' floats: the depth range of the rendering.

``procedural``: objects made of one or two primitives (spheres and boxes
rotated about the vertical axis, random sizes and colours), Lambertian under
a fixed world light (so a view-independent radiance field exists), rendered
*analytically* (ray-primitive intersection, no sampling) from cameras on a
sphere of radius 4 around the object: the same geometry as ShapeNet renders
(near 2, far 6, field of view 0.6911 rad).  Needs no files.

``load_shapenet``: the ShapeNet renders of Tancik et al. ("learnit") in this
layout (read by TransINR/IPC with the same conventions):
  <root>/<category>_splits.json             {"train": [ids], "test": [ids]}
  <root>/<category>/<id>/transforms.json    {"camera_angle_x": rad,
      "frames": [{"file_path": "rgb/000", "transform_matrix": 4x4}, ...]}
  <root>/<category>/<id>/<file_path>[.png]  RGBA (or RGB) images
``category`` e.g. 'chair', 'car', 'lamp' (split file ``chair_splits.json``,
objects under ``chair/``; ``objects_dir`` overrides the folder name).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image

NEAR, FAR, CAMERA_RADIUS, FOV = 2.0, 6.0, 4.0, 0.6911112070083618
_LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
  """Camera-to-world 4x4 (float32) for a camera at ``eye`` looking at ``target``."""
  eye = np.asarray(eye, np.float64)
  fwd = np.asarray(target, np.float64) - eye
  fwd /= np.linalg.norm(fwd)
  right = np.cross(fwd, up)
  right /= np.linalg.norm(right)
  cam_up = np.cross(right, fwd)
  pose = np.eye(4)
  pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, cam_up, -fwd, eye
  return pose.astype(np.float32)


def orbit_poses(rng: np.random.Generator, n: int, radius: float = CAMERA_RADIUS,
                elevation=(-0.2, 1.0)) -> np.ndarray:
  """(n, 4, 4) cameras on a sphere: uniform azimuth, elevation in radians."""
  az = rng.uniform(0, 2 * np.pi, n)
  el = rng.uniform(*elevation, n)
  eyes = radius * np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1)
  return np.stack([look_at(e) for e in eyes])


def pinhole_rays(poses: np.ndarray, size: int, focal: float):
  """numpy twin of ``render.rays.camera_rays`` (pixel centres): (..., H, W, 3) x 2."""
  c = np.arange(size) + 0.5 - size / 2.0
  x, y = np.meshgrid(c / focal, -c / focal)                # x varies along columns
  cam = np.stack([x, y, -np.ones_like(x)], -1)
  dirs = np.einsum("...ij,hwj->...hwi", poses[..., :3, :3], cam)
  dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
  origins = np.broadcast_to(poses[..., None, None, :3, 3], dirs.shape)
  return origins, dirs


def random_scene(rng: np.random.Generator) -> list[dict]:
  """One or two primitives inside a ball of radius ~1.2 around the origin."""
  prims = []
  for _ in range(rng.integers(1, 3)):
    center = rng.uniform(-0.4, 0.4, 3)
    color = rng.uniform(0.35, 1.0, 3)
    color[rng.integers(3)] = rng.uniform(0.0, 0.3)          # keep colours saturated
    if rng.random() < 0.5:
      prims.append(dict(kind="sphere", center=center, radius=rng.uniform(0.35, 0.7),
                        color=color))
    else:
      prims.append(dict(kind="box", center=center, half=rng.uniform(0.25, 0.6, 3),
                        angle=rng.uniform(0, np.pi / 2), color=color))
  return prims


def _hit_sphere(o, d, p):
  oc = o - p["center"]
  b = (d * oc).sum(-1)
  disc = b * b - ((oc * oc).sum(-1) - p["radius"] ** 2)
  t = -b - np.sqrt(np.maximum(disc, 0.0))
  t = np.where((disc > 0) & (t > 0), t, np.inf)
  normal = (o + np.where(np.isfinite(t), t, 0)[..., None] * d - p["center"]) / p["radius"]
  return t, normal


def _hit_box(o, d, p):
  ca, sa = math.cos(p["angle"]), math.sin(p["angle"])
  rot = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
  lo, ld = (o - p["center"]) @ rot, d @ rot                 # into the box frame
  with np.errstate(divide="ignore", invalid="ignore"):
    inv = 1.0 / np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    t1, t2 = (-p["half"] - lo) * inv, (p["half"] - lo) * inv
  tnear, tfar = np.minimum(t1, t2), np.maximum(t1, t2)
  t_in, t_out = tnear.max(-1), tfar.min(-1)
  t = np.where((t_out >= t_in) & (t_in > 0), t_in, np.inf)
  axis = tnear.argmax(-1)
  n_local = np.zeros_like(lo)
  np.put_along_axis(n_local, axis[..., None],
                    -np.sign(np.take_along_axis(ld, axis[..., None], -1)), -1)
  return t, n_local @ rot.T


def render_scene(scene: list[dict], origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
  """Analytic render (float in [0, 1]) on white: closest hit, Lambertian shading."""
  best = np.full(origins.shape[:-1], np.inf)
  color = np.ones(origins.shape)
  for p in scene:
    t, normal = (_hit_sphere if p["kind"] == "sphere" else _hit_box)(origins, dirs, p)
    shade = 0.3 + 0.7 * np.clip((normal * _LIGHT).sum(-1), 0.0, 1.0)
    closer = t < best
    color = np.where(closer[..., None], shade[..., None] * p["color"], color)
    best = np.where(closer, t, best)
  return color


def procedural(num_objects: int, num_views: int, image_size: int = 32, seed: int = 0) -> dict:
  """The procedural multi-view set (deterministic in ``seed``)."""
  rng = np.random.default_rng(seed)
  focal = 0.5 * image_size / math.tan(0.5 * FOV)
  images, poses = [], []
  for _ in range(num_objects):
    scene = random_scene(rng)
    pose = orbit_poses(rng, num_views)
    o, d = pinhole_rays(pose.astype(np.float64), image_size, focal)
    images.append(np.round(render_scene(scene, o, d) * 255).astype(np.uint8))
    poses.append(pose)
  return {"images": np.stack(images), "poses": np.stack(poses).astype(np.float32),
          "focal": np.full((num_objects,), focal, np.float32), "near": NEAR, "far": FAR}


def _read_image(path: str, size: int | None) -> np.ndarray:
  im = Image.open(path)
  if im.mode in ("RGBA", "LA", "P"):
    im = im.convert("RGBA")
    rgba = np.asarray(im, np.float32) / 255.0
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])     # onto white
    im = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
  im = im.convert("RGB")
  if size and im.size != (size, size):
    im = im.resize((size, size), Image.BICUBIC)
  return np.asarray(im, np.uint8)


def load_shapenet(root: str, category: str, split: str, *, image_size: int | None = None,
                  max_objects: int | None = None, objects_dir: str | None = None,
                  near: float = NEAR, far: float = FAR) -> dict:
  """ShapeNet renders in the layout of the module docstring (see there)."""
  split_file = os.path.join(root, f"{category}_splits.json")
  if not os.path.isfile(split_file):
    raise FileNotFoundError(f"ShapeNet: no split file {split_file} (expected layout: "
                            f"<root>/<category>_splits.json, <root>/<category>/<id>/"
                            "transforms.json; see glue_jax/projects/lainr/multiview_data.py)")
  with open(split_file) as f:
    splits = json.load(f)
  if split not in splits:
    raise KeyError(f"{split_file}: no split {split!r} (has {sorted(splits)})")
  ids = list(splits[split])[:max_objects]
  obj_root = os.path.join(root, objects_dir or category)
  images, poses, focals = [], [], []
  for oid in ids:
    meta_path = os.path.join(obj_root, oid, "transforms.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"ShapeNet: missing {meta_path}")
    with open(meta_path) as f:
      meta = json.load(f)
    if "camera_angle_x" not in meta or "frames" not in meta:
      raise KeyError(f"{meta_path}: needs 'camera_angle_x' and 'frames'")
    views, mats = [], []
    for fr in meta["frames"]:
      rel = fr["file_path"]
      path = os.path.normpath(os.path.join(obj_root, oid, rel))
      if not os.path.splitext(path)[1]:
        path += ".png"
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{meta_path}: frame image {path} not found")
      views.append(_read_image(path, image_size))
      mats.append(np.asarray(fr["transform_matrix"], np.float32).reshape(4, 4))
    width = views[0].shape[1]
    focals.append(0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"])))
    images.append(np.stack(views))
    poses.append(np.stack(mats))
  if not images:
    raise ValueError(f"ShapeNet: split {split!r} of {split_file} lists no objects")
  nv = min(len(v) for v in images)
  return {"images": np.stack([v[:nv] for v in images]),
          "poses": np.stack([p[:nv] for p in poses]),
          "focal": np.asarray(focals, np.float32), "near": near, "far": far}
