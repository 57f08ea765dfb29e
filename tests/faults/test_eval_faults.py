"""Fault injection on evaluation: ``python -m glue_jax.evaluate`` killed with
SIGKILL once its first sample shards are on disk resumes to exactly the
samples of an uninterrupted run (no duplicates, none missing)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_evaluate import N, make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cmd(ckpt, out):
  return [sys.executable, "-m", "glue_jax.evaluate", f"--checkpoint={ckpt}", f"--out_dir={out}",
          f"--num_samples={N}", "--per_device_batch=1", "--shard_size=1", "--features=none",
          "--noprogress"]


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
             JAX_COMPILATION_CACHE_DIR=os.environ["GLUE_JAX_TEST_CACHE"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _images(out):
  npz = [f for f in os.listdir(out) if f.startswith("samples_") and f.endswith(".npz")]
  assert len(npz) == 1, os.listdir(out)
  with np.load(os.path.join(out, npz[0])) as f:
    return f["arr_0"], f["arr_1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


def test_evaluate_killed_midway_resumes_exactly(ckpt, tmp_path):
  ref = str(tmp_path / "ref")
  subprocess.run(_cmd(ckpt, ref), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=900)
  out = str(tmp_path / "killed")
  p = subprocess.Popen(_cmd(ckpt, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  shards = os.path.join(out, "shards")
  deadline = time.time() + 900
  while time.time() < deadline and p.poll() is None:
    if os.path.isdir(shards) and any(not f.endswith(".tmp") and f != "manifest.json"
                                     for f in os.listdir(shards)):
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert p.wait() == -signal.SIGKILL, "evaluation finished before it could be killed"
  done_before = len(os.listdir(shards))
  subprocess.run(_cmd(ckpt, out), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=900)
  a, la = _images(ref)
  b, lb = _images(out)
  assert done_before < N + 2 and len(a) == len(b) == N
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
