"""The colabs/ notebooks, executed top to bottom in FAST mode on CPU (nbclient).

Each notebook runs in a fresh 'python3' kernel with GLUE_JAX_COLAB_MODE=fast,
JAX_PLATFORMS=cpu and its own work directory (GLUE_JAX_COLAB_WORKDIR); any
cell error fails the test, and every notebook must render non-blank figures
(display_data with image/png).  The digits-demo notebook's test is also the
demo's end-to-end test: it checks the work directory the notebook trained
(stage files, finite metrics, checkpoints, sample grids) and that a second
``main.run`` reuses every stage and resumes at the end of training.
"""
import base64
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("01_quickstart.ipynb", "02_train_digits_demo.ipynb", "03_glod_composition.ipynb",
             "04_lainr.ipynb")
CELL_TIMEOUT = 900     # seconds per cell: generous, the CI machine may be loaded


def run_notebook(name: str, workdir, monkeypatch):
  """Executes colabs/<name> in a new kernel (cwd colabs/); returns the executed notebook."""
  env = {
      "GLUE_JAX_COLAB_MODE": "fast",
      "GLUE_JAX_COLAB_WORKDIR": str(workdir),
      "JAX_PLATFORMS": "cpu",
      "CUDA_VISIBLE_DEVICES": "",
      "TF_CPP_MIN_LOG_LEVEL": "3",
      # As tests/conftest.py: the models are tiny and compile time dominates.
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
      # The checkout under test, whether or not (and wherever) glue_jax is installed.
      "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
  }
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("MPLBACKEND", raising=False)     # the inline backend renders figures
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": COLABS}})
  client.execute()          # raises CellExecutionError (cell source + traceback) on an error
  return nb


def figures(nb) -> list[np.ndarray]:
  """Every image/png output of the executed notebook, decoded."""
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
      if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {}):
        png = base64.b64decode(o["data"]["image/png"])
        out.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
  return out


def stdout_of(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.output_type == "stream")


def check_figures(nb, at_least: int):
  figs = figures(nb)
  assert len(figs) >= at_least, f"{len(figs)} figures rendered, expected >= {at_least}"
  for i, f in enumerate(figs):
    assert f.std() > 1.0, f"figure {i} is blank"


def check_png(path):
  img = np.asarray(Image.open(path))
  assert img.ndim == 3 and img.std() > 0, path


def test_notebooks_are_clean_and_follow_the_setup_convention():
  """Committed without outputs; the first code cell installs only when needed and reads MODE."""
  assert sorted(n for n in os.listdir(COLABS) if n.endswith(".ipynb")) == list(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3", name
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: has outputs"
    setup = code[0].source
    for needle in ('REPO_URL = "', 'os.environ.get("GLUE_JAX_COLAB_MODE")',
                   'jax.default_backend() == "cpu"', "GLUE_JAX_COLAB_WORKDIR", "pip"):
      assert needle in setup, f"{name}: setup cell lacks {needle!r}"
    assert setup.index("pip") < setup.index("import jax"), f"{name}: install after import jax"


def test_01_quickstart(tmp_path, monkeypatch):
  nb = run_notebook("01_quickstart.ipynb", tmp_path, monkeypatch)
  check_figures(nb, 1)
  check_png(tmp_path / "quickstart" / "samples.png")
  assert (tmp_path / "quickstart" / "reglue_imported" / "123").is_dir()   # official 'steps'
  assert "relative error vs the official PyTorch outputs" in stdout_of(nb)


def test_02_digits_demo(tmp_path, monkeypatch):
  """The notebook trains the demo (glue_jax/configs/demo.py:runlocal); then the demo's checks."""
  wd = str(tmp_path)
  nb = run_notebook("02_train_digits_demo.ipynb", wd, monkeypatch)
  check_figures(nb, 2)          # loss curves, sample grids
  for name in ("encoder.npz", "compressor.npz", "features_train.npz", "features_test.npz",
               "metrics.json", "samples.png"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert os.listdir(os.path.join(wd, "reglue", "checkpoints"))
  grids = sorted(os.listdir(os.path.join(wd, "reglue", "samples")))
  assert grids == ["step_0000050.png", "step_0000100.png"], grids
  metrics = json.load(open(os.path.join(wd, "metrics.json")))
  for k in ("fd_cls_samples_vs_test", "sample_class_accuracy", "encoder_test_accuracy"):
    assert np.isfinite(metrics[k]), k
  assert 0.0 <= metrics["sample_class_accuracy"] <= 1.0
  assert metrics["encoder_test_accuracy"] > 0.3        # the encoder learned digits
  assert np.isfinite(metrics["train"]["loss"])
  img = np.asarray(Image.open(os.path.join(wd, "samples.png")))
  assert img.ndim == 3 and img.std() > 0
  with np.load(os.path.join(wd, "features_train.npz")) as f:
    assert f["latents"].shape[1:] == (8, 8, 12) and f["semantic"].shape[1:] == (4, 4, 16)
    assert f["cls"].shape[1:] == (64,) and f["align_target"].shape[1:] == (16, 64)

  # A second run reuses every stage and resumes training at its end.
  from glue_jax.configs import demo as demo_config
  from glue_jax import main as main_lib
  cfg = demo_config.get_config("runlocal")
  with cfg.unlocked():              # as the notebook sets them
    cfg.train.train.log_every = 10
    cfg.train.train.sample_every = cfg.train.train.steps // 2
  assert metrics["train"]["step"] == cfg.train.train.steps
  mtime = os.path.getmtime(os.path.join(wd, "encoder.npz"))
  t0 = time.time()
  again = main_lib.run(cfg, wd)
  assert os.path.getmtime(os.path.join(wd, "encoder.npz")) == mtime
  assert again["train"]["step"] == cfg.train.train.steps
  assert time.time() - t0 < 0.5 * 600


def test_03_glod_composition(tmp_path, monkeypatch):
  nb = run_notebook("03_glod_composition.ipynb", tmp_path, monkeypatch)
  check_figures(nb, 5)   # scenes, masks, overlap rules, methods side by side, class composition
  check_png(tmp_path / "glod" / "glod_comparison.png")
  assert os.listdir(tmp_path / "glod" / "generator" / "checkpoints")
  assert os.listdir(tmp_path / "glod" / "tiny_classes")        # the class-composition cell ran
  assert "'global_class': 9, 'variant': 'B'" in stdout_of(nb)


def test_04_lainr(tmp_path, monkeypatch):
  nb = run_notebook("04_lainr.ipynb", tmp_path, monkeypatch)
  check_figures(nb, 3)          # reconstructions, resolutions, per-band outputs
  metrics = json.load(open(tmp_path / "lainr" / "metrics.json"))
  assert np.isfinite(metrics["test_psnr"]) and metrics["train"]["step"] > 0
  for name in ("reconstructions.png", "reconstructions_x2.png", "levels.png"):
    check_png(tmp_path / "lainr" / name)
