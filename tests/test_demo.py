"""The embedded demo end to end (fast mode), and that a second run reuses stages."""
import json
import os
import time

import numpy as np
from PIL import Image

from configs import demo as demo_config
from glue_jax import main as main_lib


def test_demo_pipeline_fast(tmp_path):
  wd = str(tmp_path / "demo")
  cfg = demo_config.get_config("fast")
  result = main_lib.run(cfg, wd)
  for name in ("encoder.npz", "compressor.npz", "features_train.npz", "features_test.npz",
               "metrics.json", "samples.png"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert os.listdir(os.path.join(wd, "reglue", "checkpoints"))
  assert os.listdir(os.path.join(wd, "reglue", "samples"))
  metrics = json.load(open(os.path.join(wd, "metrics.json")))
  for k in ("fd_cls_samples_vs_test", "sample_class_accuracy", "encoder_test_accuracy"):
    assert np.isfinite(metrics[k]), k
  assert 0.0 <= metrics["sample_class_accuracy"] <= 1.0
  assert metrics["encoder_test_accuracy"] > 0.3        # the encoder learned digits
  assert result["train"]["step"] == cfg.train.total_steps
  img = np.asarray(Image.open(os.path.join(wd, "samples.png")))
  assert img.ndim == 3 and img.std() > 0
  with np.load(os.path.join(wd, "features_train.npz")) as f:
    assert f["latents"].shape[1:] == (8, 8, 12) and f["semantic"].shape[1:] == (4, 4, 16)
    assert f["cls"].shape[1:] == (64,) and f["align_target"].shape[1:] == (16, 64)
  # A second run reuses every stage and resumes training at its end.
  mtime = os.path.getmtime(os.path.join(wd, "encoder.npz"))
  t0 = time.time()
  again = main_lib.run(cfg, wd)
  assert os.path.getmtime(os.path.join(wd, "encoder.npz")) == mtime
  assert again["train"]["step"] == cfg.train.total_steps
  assert time.time() - t0 < 0.5 * 600
