"""GLoD on class-conditional checkpoints (``glue_jax.projects.glod.class_composition``).

- the README section "GLoD on released checkpoints" runs as written on the tiny official
  fixtures (imported with ``import_torch`` as the README's reproduction section does; the
  ImageNet class numbers become fixture classes), and its first row (CFG on the global
  class alone) equals ``load_model(...).sample`` with the same preset and noise, for a
  checkpoint with a [CLS] token (REGLUE) and one without (SiT);
- the composed [CLS] velocity is the global class's guided one whatever the local classes;
- outside the guidance interval every active weight is 1 (CFG -> the conditional velocity).
"""
import json
import os
import re
import shlex
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")                 # import_torch reads the .pt fixtures

from glue_jax import api  # noqa: E402
from glue_jax.projects.glod import class_composition as cc  # noqa: E402
from glue_jax.sampling import compose, guidance  # noqa: E402
from glue_jax.tools import import_torch  # noqa: E402

from tests import test_reproduce as repro  # noqa: E402  (its tiny VAE, fixtures and helpers)

SECTION = "## GLoD on released checkpoints"
CLASSES = {"970": "9", "207": "2", "281": "7"}    # ImageNet -> the fixtures' 10 classes


def readme_commands():
  text = open(os.path.join(repro.ROOT, "README.md")).read()
  m = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  assert m, f"README has no section {SECTION!r}"
  blocks = re.findall(r"```bash\n(.*?)```", m.group(1), re.S)
  assert len(blocks) == 1
  cmds = []
  for line in blocks[0].replace("\\\n", " ").splitlines():
    if line.strip() and not line.strip().startswith("#"):
      words = shlex.split(line)
      assert words[:3] == ["python", "-m", "glue_jax.projects.glod.class_composition"], line
      cmds.append(words[3:])
  return cmds


def fixture_classes(args):
  out = []
  for a in args:
    if a.startswith("--global_class="):
      a = "--global_class=" + CLASSES[a.split("=")[1]]
    elif a.startswith("--local="):
      label, _, box = a.split("=")[1].partition(":")
      a = f"--local={CLASSES[label]}:{box}"
    out.append(a)
  return out


def import_fixture(arch: str, out: str):
  src = f"{arch}_fixture.pt"
  shutil.copy(os.path.join(repro.FIX, f"{arch}_tiny.pt"), src)
  assert import_torch.main(["--arch", arch, "--model", "custom", "--set", "num_heads=4",
                            "--set", "encoder_depth=2", "--checkpoint", src, "--out", out]) == 0


def test_readme_commands_run_and_global_row_is_the_presets_sample(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("weights")
  repro.write_tiny_vae("weights/sd_vae_ft_ema.npz")
  cmds = readme_commands()
  archs = set()
  for args in cmds:
    args = fixture_classes(args)
    ckpt = repro.flag(args, "checkpoint")
    arch = os.path.basename(ckpt).split("_")[0]
    archs.add(arch)
    import_fixture(arch, ckpt)
    assert cc.main(args + ["--num_steps=12"]) == 0
    out = repro.flag(args, "out")
    png = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out))
    with open(os.path.splitext(out)[0] + ".json") as f:
      settings = json.load(f)
    n = settings["num_samples"]
    assert png.shape[0] > 2 * repro.IMAGE and png.shape[1] >= n * repro.IMAGE, png.shape
    model = api.load_model(ckpt)
    assert settings["cfg_scale"] == model.preset.cfg_scale > 1
    assert settings["guidance_interval"] == list(model.preset.interval)
    regions = [cc.parse_region(a.split("=", 1)[1]) for a in args if a.startswith("--local=")]
    res = cc.compose_classes(model, settings["global_class"], regions, num_samples=n,
                             num_steps=12)
    x_ref, g_ref = model.sample(np.full((n,), settings["global_class"]), seed=0, num_steps=12)
    np.testing.assert_allclose(res["global"][0], x_ref, rtol=1e-4, atol=1e-4)
    if model.config.global_token_dim:
      np.testing.assert_allclose(res["global"][1], g_ref, rtol=1e-4, atol=1e-4)
    # The local classes change the sample inside their boxes (more than outside).
    d = np.abs(np.asarray(res["glod"][0]) - np.asarray(res["global"][0])).mean((0, 3))
    inside = compose.box_masks(np.asarray([r.box for r in regions]), *d.shape).max(0) > 0
    assert d[inside].mean() > 0
  assert archs == {"reglue", "sit"}, archs


def test_region_errors_name_the_argument():
  assert cc.parse_region("5:0,0.5,0.5,1") == cc.Region(5, (0.0, 0.5, 0.5, 1.0))
  for bad in ("5:0,0.5,0.5", "x:0,0,1,1", "5", "5:0.6,0,0.5,1", "5:0,0,1,1.5"):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
      cc.parse_region(bad)


def _toy_apply(x, t, y, g):
  """A velocity model whose outputs depend on the label, x, t (and a global token)."""
  y = jnp.asarray(y, jnp.float32)[:, None, None, None]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))[:, None, None, None]
  v = x * (1.0 + 0.1 * y) + t * y
  vg = None if g is None else g * 0.5 + y[:, :, 0, 0] ** 2
  return v, vg, None


def test_cls_token_is_guided_by_the_global_class_only_and_interval_gives_unit_weights():
  b, hw = 2, (4, 4)
  x = jax.random.normal(jax.random.key(0), (b,) + hw + (3,))
  g = jax.random.normal(jax.random.key(1), (b, 5))
  null, glob = np.full((b,), 10), np.full((b, 1), 9)
  masks = compose.box_masks(np.asarray([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]), *hw)
  cfg_vel = guidance.classifier_free(_toy_apply, null_label=10, scale=3.0, global_scale=2.0,
                                     interval=(0.0, 0.6))
  for locals_ in (np.asarray([[1, 2]] * b), np.asarray([[7, 3]] * b)):
    conds = compose.make_conditions(null, glob, locals_, np.broadcast_to(masks, (b, 2) + hw),
                                    global_weights=3.0, local_weights=2.0)
    vel = compose.composed_velocity(_toy_apply, global_token_weights=2.0,
                                    guidance_interval=(0.0, 0.6))
    for t in (0.3, 0.9):
      tt = jnp.float32(t)
      v, vg = vel(x, g, tt, conds)
      v_ref, vg_ref = cfg_vel(x, g, tt, jnp.full((b,), 9))
      np.testing.assert_allclose(vg, vg_ref, rtol=1e-5, atol=1e-5)     # locals never enter
      outside = masks.max(0) == 0
      if t > 0.6:                        # unit weights: the box-free cells get v_global
        np.testing.assert_allclose(np.asarray(v)[:, outside], np.asarray(v_ref)[:, outside],
                                   rtol=1e-5, atol=1e-5)
    # Plain CFG as a composition equals guidance.classifier_free inside and outside the interval.
    plain = compose.cfg_conditions(null, glob[:, 0], 3.0, hw)
    for t in (0.3, 0.9):
      tt = jnp.float32(t)
      v, _ = vel(x, g, tt, plain)
      np.testing.assert_allclose(v, cfg_vel(x, g, tt, jnp.full((b,), 9))[0], rtol=1e-5,
                                 atol=1e-5)
