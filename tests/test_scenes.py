"""Procedural scenes: TFDS round trip, scene/caption consistency, trainer path, scores."""
import os
import types

import numpy as np
import pytest

from glue_jax.configs import scenes as scenes_config
from glue_jax.projects.glod import composition_cli
from glue_jax.projects.glod import composition_eval as ec
from glue_jax.projects.glod import scenes_pipeline as scenes_run
from glue_jax.projects.glod import scene_data as scenes
from glue_jax.projects.glod import probes as probes_lib


def tiny_scenes_config():
  """glue_jax/configs/scenes.py:runlocal on the `built` data (12 + 4 scenes), a 1-block SiT, 2 steps."""
  c = scenes_config.get_config("runlocal")
  with c.unlocked():
    c.data.num_train, c.data.num_test, c.data.seed = 12, 4, 3
    c.train.model.overrides = {**dict(c.train.model.overrides), "depth": 1,
                               "hidden_size": 32, "num_heads": 2}
    c.train.train.update(batch_size=8, steps=2, log_every=1)
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg = scenes.builder_config(num_train=12, num_test=4, seed=3)
  scenes.build(data_dir, cfg)
  return data_dir, cfg


def test_builder_round_trips_through_data_source(built):
  data_dir, cfg = built
  src = scenes.data_source(data_dir, "train", cfg)
  assert len(src) == 12
  direct = dict(scenes.generate(cfg.params(), 12, seed=2 * 3))
  for j in range(len(src)):
    rec = src[j]
    want = direct[int(rec["index"])]
    for k, v in want.items():
      got = rec[k]
      if isinstance(v, str):
        assert (got.decode() if isinstance(got, bytes) else got) == v, k
      else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(v), err_msg=k)
  test = scenes.load_arrays(data_dir, "test", cfg)
  assert test["image"].shape == (4, 24, 24, 3) and list(test["index"]) == [0, 1, 2, 3]
  with pytest.raises(FileNotFoundError, match="not built"):
    scenes.data_source(data_dir, "train", scenes.builder_config(num_train=13))


def test_scene_content_is_consistent(built):
  data_dir, cfg = built
  a = scenes.load_arrays(data_dir, "train", cfg)
  words = {i: w for w, i in scenes.WORD_ID.items()}
  decode = lambda toks: [words[t] for t in toks if t != scenes.NULL_TOKEN]
  for i in range(len(a["image"])):
    n = int(a["num_objects"][i])
    assert 2 <= n <= 3 and np.all(a["identity"][i, n:] == -1)
    sc = scenes.scene_of(a, i)
    assert len(set(sc["colour"])) == n and len(set(sc["identity"])) == n
    glob = decode(a["global_tokens"][i])
    assert glob == a["global_caption"][i].split()
    assert decode(a["full_tokens"][i]) == a["full_caption"][i].split()
    for k in range(n):
      assert glob[a["object_position"][i, k]] == sc["identity"][k]
      assert decode(a["local_tokens"][i, k]) == [sc["size"][k], sc["colour"][k], sc["identity"][k]]
      x0, y0, x1, y1 = sc["box"][k]
      inside = a["segmentation"][i, y0:y1, x0:x1]
      assert (a["segmentation"][i] == k + 1).sum() == (inside == k + 1).sum() > 0
      # the object's pixels have its colour's dominant channel
      pix = a["image"][i][a["segmentation"][i] == k + 1].astype(float).mean(0)
      assert np.argmax(pix) == np.argmax(scenes.COLOURS[sc["colour"][k]])
    for k in range(n - 1):
      assert glob[2 * k + 1] == scenes.relation(sc["box"][k], sc["box"][k + 1])
  rows_idx, prompts = scenes_run.caption_rows(a)
  assert len(rows_idx) == int((2 + a["num_objects"]).sum()) and prompts.shape[1] == 14


def test_prompt_sit_trains_through_the_common_trainer(built, tmp_path):
  """Scenes npz (latents + prompt labels) -> diffusion_job.train with a prompt-conditioned SiT."""
  from glue_jax import api
  data_dir, cfg = built
  c = tiny_scenes_config()
  wd = str(tmp_path)
  os.symlink(data_dir, os.path.join(wd, "tfds"))
  train, test = scenes_run.dataset(c, wd)
  path = scenes_run.write_features(c, wd, train, "train")
  with np.load(path) as f:
    assert f["latents"].shape[1:] == (8, 8, 27) and f["label"].shape[1:] == (14,)
    assert f["label"].max() <= scenes.NULL_TOKEN
  from glue_jax import diffusion_job
  with c.train.unlocked():
    c.train.data.path = os.path.join(wd, "features_{split}.npz")
  metrics = diffusion_job.train(c.train, os.path.join(wd, "generator"))
  assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
  model = api.load_model(os.path.join(wd, "generator"))
  assert model.config.prompt_length == 14 and model.config.num_classes == len(scenes.VOCAB)


class OracleProbes:
  """Probes that read the ground truth of scene i for image i: scores of real scenes
  must be perfect."""

  def __init__(self, arrays):
    self.a = arrays

  def _match(self, images):
    return np.arange(len(images))

  def layout_maps(self, images):
    i = self._match(images)
    cells = probes_lib._cell_labels({k: v[i] for k, v in self.a.items()}, 8)
    return np.eye(probes_lib.NUM_IDENTITIES + 1)[cells]

  def attributes(self, images, boxes):
    i = self._match(images)
    return self.a["colour"][i], self.a["identity"][i]


def test_scores_on_real_scenes_and_leakage(built):
  data_dir, cfg = built
  a = scenes.load_arrays(data_dir, "train", cfg)
  idx = np.arange(len(a["image"]))
  probes = OracleProbes(a)
  sc = ec.score(a["image"], a, idx, probes, reference=a["image"])
  np.testing.assert_array_equal(sc["global_alignment"], 1.0)
  np.testing.assert_array_equal(sc["local_alignment"], 1.0)
  np.testing.assert_array_equal(sc["local_both"], 1.0)
  np.testing.assert_array_equal(sc["leakage"], 0.0)
  np.testing.assert_array_equal(sc["preservation"], 0.0)
  # Object 0's colour painted on every other object: leakage counts those pairs.
  leaky = types.SimpleNamespace(layout_maps=probes.layout_maps, attributes=lambda im, bx: (
      np.where(a["identity"] >= 0, a["colour"][:, :1], -1), a["identity"]))
  sc = ec.score(a["image"], a, idx, leaky)
  n = a["num_objects"]
  np.testing.assert_allclose(sc["leakage"], (n - 1) / (n * (n - 1)))
  np.testing.assert_array_equal(sc["local_both"], 1.0 / n)          # only object 0 is right
  # Colour right but identity wrong on every object: local_both 0, local_alignment 0.5.
  wrong_id = types.SimpleNamespace(layout_maps=probes.layout_maps, attributes=lambda im, bx: (
      a["colour"], np.where(a["identity"] >= 0, (a["identity"] + 1) % 4, -1)))
  sc = ec.score(a["image"], a, idx, wrong_id)
  np.testing.assert_array_equal(sc["local_both"], 0.0)
  np.testing.assert_array_equal(sc["local_alignment"], 0.5)
  # Preservation: a change inside the boxes only does not count.
  changed = a["image"].copy()
  for i in idx:
    x0, y0, x1, y1 = scenes.scene_of(a, i)["box"][0]
    changed[i, y0:y1, x0:x1] = 255 - changed[i, y0:y1, x0:x1]
  np.testing.assert_array_equal(ec.score(changed, a, idx, probes, reference=a["image"])[
      "preservation"], 0.0)


def test_relation_probe_logic_and_crops():
  maps = np.zeros((1, 8, 8, probes_lib.NUM_IDENTITIES + 1))
  maps[..., 0] = 1.0
  maps[0, 1:3, 0:2] = np.eye(probes_lib.NUM_IDENTITIES + 1)[1]       # identity 0 top-left
  maps[0, 5:7, 5:7] = np.eye(probes_lib.NUM_IDENTITIES + 1)[3]       # identity 2 bottom-right
  ident = np.array([[0, 2, -1]])
  right = scenes.RELATIONS.index("left_of")
  np.testing.assert_array_equal(probes_lib.relation_score(maps, ident, np.array([[right, -1]])), 1)
  wrong = scenes.RELATIONS.index("right_of")
  np.testing.assert_array_equal(probes_lib.relation_score(maps, ident, np.array([[wrong, -1]])), 0)
  missing = np.array([[0, 5, -1]])
  np.testing.assert_array_equal(probes_lib.relation_score(maps, missing, np.array([[right, -1]])), 0)
  img = np.arange(24 * 24 * 3, dtype=np.float32).reshape(1, 24, 24, 3)
  crop = np.asarray(probes_lib.crop_boxes(img, np.array([[[0.25, 0.5, 0.5, 0.75]]]), 6))
  np.testing.assert_allclose(crop[0, 0], img[0, 12:18, 6:12], rtol=1e-6)   # pixel-aligned box


def test_scenes_kind_end_to_end_and_evaluation_cli(built, tmp_path, capsys):
  """``config.kind='scenes'`` through glue_jax.main.run (dataset -> features ->
  trainer -> probes -> composition scores), then the composition CLI on
  the finished workdir with layout guidance; global-only and GLoD with zero local
  weights give the same images."""
  import json
  from glue_jax import main as main_lib
  data_dir, _ = built
  c = tiny_scenes_config()
  with c.unlocked():
    c.probes.steps, c.probes.batch_size = 3, 8
    c.eval.num_scenes, c.eval.num_steps, c.eval.methods = 3, 2, ("single", "glod_B")
    c.eval.layout_scale = 0.5
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  os.symlink(data_dir, os.path.join(wd, "tfds"))
  result = main_lib.run(c, wd)
  assert set(result["methods"]) == {"global", "single", "glod_B"}
  for m in result["methods"].values():
    for k in ec.METRICS:
      assert 0.0 <= m[k]["mean"] <= 1.0 and len(m[k]["per_seed"]) == 1, (k, m[k])
  assert result["methods"]["global"]["preservation"]["mean"] == 0.0   # its own reference
  assert os.path.exists(os.path.join(wd, "metrics.json"))
  assert os.path.exists(os.path.join(wd, "composition_samples.png"))

  out = str(tmp_path / "cli.json")
  assert composition_cli.main([f"--workdir={wd}", "--methods=glod_B_layout", "--seeds=0,1",
                  f"--out={out}"]) == 0
  cli = json.load(open(out))
  assert len(cli["methods"]["glod_B_layout"]["leakage"]["per_seed"]) == 2
  assert "glod_B_layout" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="unknown methods"):
    composition_cli.main([f"--workdir={wd}", "--methods=nope"])

  ctx = scenes_run.load(wd)
  ev = ctx.config.eval
  with ev.unlocked():
    ev.local_scale = 0.0
  idx = np.arange(3)
  a = ec.generate(ctx.model, ctx.first_stage, "global", ctx.test, idx, 0, ev)
  b = ec.generate(ctx.model, ctx.first_stage, "glod_B", ctx.test, idx, 0, ev)
  np.testing.assert_array_equal(a, b)


def test_minibatches_need_a_full_batch(tmp_path):
  """An auxiliary network (probes, demo stages) with fewer examples than one
  batch is an error naming the data, not an endless wait."""
  from flax import nnx
  from glue_jax.models import layers
  from glue_jax.train import module_fit
  import optax
  m = layers.Dense(2, 1, rngs=nnx.Rngs(0), axes=(None, None))
  loss = lambda mod, batch, key: (mod(batch["x"]) ** 2).mean()
  with pytest.raises(ValueError, match="12 examples per process < per-process batch 16"):
    module_fit.fit(m, loss, {"x": np.zeros((12, 2), np.float32)}, workdir=str(tmp_path / "a"),
                   name="tiny", steps=2, batch_size=16, tx=optax.sgd(0.1))
  module_fit.fit(m, loss, {"x": np.ones((12, 2), np.float32)}, workdir=str(tmp_path / "b"),
                 name="tiny", steps=2, batch_size=8, tx=optax.sgd(0.1))
