"""Honest operation (issue #18): one-line errors that name the cause, fallbacks
that say so, and quiet entry points.

A tiny SiT (1 block, width 32, 4x4x12 pixel-tokenizer input + 4 semantic
channels, an 8-d global token) is saved at steps 3 and 5 with
``api.save_network``; faults are made by truncating or garbling its files.
"""
import glob
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from glue_jax.configs import common
from glue_jax import api, main as main_lib
from glue_jax.sampling import presets
from glue_jax.train import checkpoint as ckpt_lib
from tests import train_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL = {"name": "pixel", "factor": 2, "channels": 3, "scale": 1.0, "shift": 0.0}


def _save(d, steps=(3, 5), first_stage=PIXEL):
  cfg, state = train_utils.tiny_random_sit()
  extra = {"sampler": presets.SamplerPreset(num_steps=2, cfg_scale=1.0).to_dict()}
  if first_stage:
    extra["first_stage"] = first_stage
  for step in steps:
    api.save_network(d, "sit", cfg, state, ema=state, step=step, extra=extra)
  return d


def _truncate_largest(step_dir, item="ema"):
  files = glob.glob(os.path.join(step_dir, item, "ocdbt.process_*", "d", "*"))
  big = max(files, key=os.path.getsize)
  os.truncate(big, os.path.getsize(big) // 2)
  return big


@pytest.fixture()
def damaged(tmp_path):
  d = _save(str(tmp_path / "ckpt"))
  return d, _truncate_largest(os.path.join(d, "5"))


# -- finding 2: the reason for an unreadable step is one line naming the file ---------
def test_truncated_file_is_named_in_one_line(damaged):
  d, big = damaged
  ck = ckpt_lib.Checkpointer(d, read_only=True)
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    ck.restore(5, ema=ck.abstract_item(5, "ema"))
  reason = ckpt_lib.describe_failure(info.value, os.path.join(d, "5"))
  assert reason.startswith(f"truncated/unreadable {big}:"), reason
  assert "\n" not in reason and len(reason) < 400, reason
  assert "\n" not in str(info.value) and "TensorStore" not in str(info.value)
  assert ckpt_lib.describe_failure(info.value) == reason    # the error carries it
  ck.close()


def test_garbled_config_is_named(tmp_path):
  d = _save(str(tmp_path / "ckpt"), steps=(3,))
  with open(os.path.join(d, "3", "config", "metadata"), "w") as f:
    f.write("{not json")
  ck = ckpt_lib.Checkpointer(d, read_only=True)
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    ck.read_config(3)
  reason = ckpt_lib.describe_failure(info.value, os.path.join(d, "3"))
  assert reason.startswith(f"truncated/unreadable {d}/3/config/metadata: JSONDecodeError"), \
      reason
  ck.close()


def test_quarantine_records_one_line_reason(damaged, caplog):
  d, big = damaged
  ck = ckpt_lib.Checkpointer(d)
  try:
    ck.restore(5, ema=ck.abstract_item(5, "ema"))
  except ckpt_lib.CheckpointError as e:
    with caplog.at_level(logging.ERROR):
      dst = ck.quarantine(5, e)
  ck.close()
  text = open(os.path.join(dst, "REASON.txt")).read()
  assert text.splitlines()[0].startswith("truncated/unreadable ") and big in text
  logged = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(logged) == 1 and "\n" not in logged[0] and big in logged[0], logged
  # a long multi-line string reason is logged as one line, kept whole in REASON.txt
  ck = ckpt_lib.Checkpointer(d)
  with caplog.at_level(logging.ERROR):
    caplog.clear()
    dst = ck.quarantine(3, "restore failed: first line\n" + "spec line\n" * 60)
  ck.close()
  assert "\n" not in caplog.records[-1].getMessage()
  assert open(os.path.join(dst, "REASON.txt")).read().count("spec line") == 60


# -- finding 3: load_model falls back to the newest readable step, saying so ----------
def test_load_model_falls_back_and_names_the_skipped_step(damaged, caplog):
  d, big = damaged
  with caplog.at_level(logging.WARNING):
    model = api.load_model(d)
  assert model.step == 3
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert f"{d}/5" in warned and big in warned and "step 3" in warned, warned
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    api.load_model(d, step=5)
  msg = str(info.value)
  assert "step 5" in msg and big in msg and "\n" not in msg, msg
  assert info.value.__cause__ is None and info.value.__suppress_context__


def test_load_model_none_readable_lists_each_step(tmp_path):
  d = _save(str(tmp_path / "ckpt"))
  for step in (3, 5):
    _truncate_largest(os.path.join(d, str(step)))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint step could be read") as e:
    api.load_model(d)
  lines = str(e.value).splitlines()
  assert len(lines) == 3 and lines[1].strip().startswith("step 5: truncated/unreadable")


# -- finding 10: the missing-checkpoint error points to sub-directories; decode -------
def test_no_checkpoint_points_to_subdirectories(tmp_path):
  _save(str(tmp_path / "demo" / "reglue" / "checkpoints"), steps=(3,))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    api.load_model(str(tmp_path / "demo"))
  assert "no finished checkpoint in" in str(e.value)
  assert str(tmp_path / "demo" / "reglue") in str(e.value)
  assert api.load_model(str(tmp_path / "demo" / "reglue")).step == 3


def test_decode_and_sample_images(tmp_path):
  model = api.load_model(_save(str(tmp_path / "ckpt"), steps=(3,)))
  x0, g0 = model.sample([0, 1], num_steps=2)
  assert x0.shape == (2, 4, 4, 16) and g0.shape == (2, 8)   # latents (12) + semantic (4)
  images = model.decode(x0)
  assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(model.sample_images([0, 1], num_steps=2), images)
  vae_model = api.load_model(_save(str(tmp_path / "vae"), steps=(3,),
                                   first_stage={"name": "vae", "path": "", "scale": 0.18215}))
  with pytest.raises(ValueError, match="stores no weights path; pass vae=PATH"):
    vae_model.decode(x0)
  with pytest.raises(ValueError, match="vae=PATH"):
    vae_model.sample_images([0], num_steps=2)


# -- finding 5: config arguments ------------------------------------------------------
def test_parse_arg_names_the_key_and_rejects_bad_booleans():
  with pytest.raises(ValueError, match=r"steps=abc: not an int"):
    common.parse_arg("steps=abc", steps=0)
  with pytest.raises(ValueError, match=r"fast=flase: not a boolean"):
    common.parse_arg("fast=flase", fast=False)
  with pytest.raises(ValueError, match=r"'fsat' unknown; did you mean 'fast'"):
    common.parse_arg("fsat", fast=False)
  a = common.parse_arg("fast=off,steps=7,name=x,opt=y", fast=True, steps=0, name="",
                       opt=None)
  assert (a.fast, a.steps, a.name, a.opt) == (False, 7, "x", "y")
  assert common.parse_arg("fast", fast=False).fast is True


def _run_main(*args, env=None):
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  for k in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
    e.pop(k, None)                      # the entry point must quiet TF by itself
  e.update(env or {})
  return subprocess.run([sys.executable, *args], cwd=REPO, env=e, capture_output=True,
                        text=True, timeout=120)


CONFIG = """from glue_jax.configs import common
import ml_collections


def get_config(arg=None):
  a = common.parse_arg(arg, fast=False)
  return ml_collections.ConfigDict({"kind": "demo", "seed": 0, "fast": a.fast,
                                    "optim": {"lr": 1e-3}})
"""


def test_config_errors_are_one_line_with_exit_2(tmp_path):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG)
  work = f"--workdir={tmp_path}/w"
  cases = [
      ([f"--config={cfg}", "--config.sed=3"],
       "--config.sed: the config has no field 'sed'; did you mean --config.seed?"),
      ([f"--config={cfg}", "--config.optim.lrr=1"],
       "--config.optim.lrr: --config.optim has no field 'lrr'; did you mean --config.optim.lr?"),
      ([f"--config={cfg}:fast=flase"],
       f"--config={cfg}:fast=flase: ValueError: config argument fast=flase: not a boolean"),
      (["--config=glue_jax/configs/nope.py"], "--config=glue_jax/configs/nope.py: [Errno 2] No such file"),
  ]
  for args, expected in cases:
    r = _run_main("-m", "glue_jax.main", *args, work)
    assert r.returncode == 2, (args, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glue_jax.main: error: " + expected), \
        (args, r.stderr)
  assert not os.path.exists(f"{tmp_path}/w")


# -- finding 11 (+5): --help lists configs and kinds; no TF / Orbax noise -------------
NOISE = ("oneDNN", "absl::InitializeLog", "Given directory is read only",
         "setting save_interval_steps", "cpu_feature_guard")


def test_help_lists_configs_and_kinds_quietly():
  r = _run_main("-m", "glue_jax.main", "--help")
  assert "glue_jax/configs/demo.py" in r.stdout and "glue_jax/configs/reglue.py" in r.stdout, r.stdout
  for kind in main_lib.KINDS:
    assert f"  {kind} " in r.stdout, kind
  assert not [n for n in NOISE if n in r.stderr], r.stderr


def test_load_is_quiet(tmp_path):
  d = _save(str(tmp_path / "ckpt"), steps=(3,))
  r = _run_main("-c", f"import glue_jax, tensorflow; glue_jax.load_model({d!r})")
  assert r.returncode == 0, r.stderr[-3000:]
  assert not [n for n in NOISE if n in r.stderr], r.stderr


# -- finding 9: reference statistics at the source's own size ------------------------
def test_reference_stats_docstring_example_uses_the_sources_size(tmp_path, monkeypatch):
  """The docstring's digits example (no --image_size) computes the digits
  classifier and statistics at 16 px, the demo's size, not 256 px."""
  import shlex
  from glue_jax import evaluate
  from glue_jax.eval import features
  from glue_jax.tools import reference_stats as rs
  doc = rs.__doc__.replace("\\\n", " ")
  line = next(l for l in doc.splitlines() if "--source=digits:test" in l)
  argv = [a for a in shlex.split(line)[3:] if not a.startswith("--out")]
  sizes = []

  def fake_net(opts, image_size):
    sizes.append(image_size)
    return features.FeatureNet("flat", lambda p, x: {"pool": x.reshape(x.shape[0], -1)[:, :8]
                                                     .astype("float32"),
                                                     "spatial": x[..., :1].astype("float32"),
                                                     "logits": x.reshape(x.shape[0], -1)[:, :4]
                                                     .astype("float32")}, {}, None)
  monkeypatch.setattr(evaluate, "make_feature_net", fake_net)
  out = str(tmp_path / "ref.npz")
  assert rs.main(argv + [f"--out={out}", "--max_images=64"]) == 0
  assert sizes == [16]
  with np.load(out) as f:
    assert f["arr_0"].shape == (64, 16, 16, 3)
  assert rs.source_image_size(f"npz:{out}") == 16
  with pytest.raises(ValueError, match="give --image_size"):
    rs.source_image_size("folder:/nowhere")


# -- finding 6: runlocal keeps bf16 ------------------------------------------------------
def test_runlocal_keeps_bf16_and_tpu_presets():
  from glue_jax.configs import reglue
  c = reglue.get_config("runlocal,bf16")
  assert c.model.overrides["dtype"] == "bfloat16" and c.model.overrides["hidden_size"] == 96
  assert reglue.get_config("runlocal,tpu=v5e").model.overrides["remat"] == "full"


# -- finding 7: a finished run returns its recorded results --------------------------
def test_finished_training_returns_recorded_metrics_without_compiling(tmp_path, monkeypatch):
  from glue_jax import diffusion_job
  from glue_jax.train import trainer
  feats = train_utils.write_features(str(tmp_path / "f.npz"))
  cfg = train_utils.tiny_config(feats, steps=3)
  first = diffusion_job.train(cfg, str(tmp_path / "run"))

  def boom(*a, **k):
    raise AssertionError("a finished run must not compile or train again")
  monkeypatch.setattr(trainer, "compile_step", boom)
  monkeypatch.setattr(trainer, "_loop", boom)
  again = diffusion_job.train(cfg, str(tmp_path / "run"))
  assert again["step"] == 3 and again["loss"] == first["loss"]


# -- finding 8: demo stages are keyed by the config that made them --------------------
def test_demo_stage_made_by_another_config_is_an_error(tmp_path):
  from glue_jax.projects.reglue import digits_demo
  path = str(tmp_path / "encoder.npz")
  open(path, "wb").write(b"x")
  key = {"steps": 150, "lr": 2e-3}
  digits_demo._record(path, key)
  assert digits_demo._reuse(path, key, "encoder")                # same config: reused
  with pytest.raises(ValueError, match=r"demo stage 'encoder'.*differs in \['steps'\]"):
    digits_demo._reuse(path, {"steps": 300, "lr": 2e-3}, "encoder")
  assert not digits_demo._reuse(str(tmp_path / "absent.npz"), key, "encoder")
