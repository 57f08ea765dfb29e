"""Fault injection on the feature store: a precompute process killed (SIGKILL,
from outside, at a random point) resumes to byte-identical shards; shards
damaged afterwards are named by the reader."""
import os
import signal
import subprocess
import sys
import time

import pytest

from glue_jax.data import feature_reader as fsr, feature_store as fst

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["PYTHONPATH"] = ROOT
  return env


def _run(out):
  subprocess.run([sys.executable, "-m", "tests.faults.precompute_worker", out], cwd=ROOT,
                 env=_env(), check=True, capture_output=True, timeout=900)


def _shards(d):
  return sorted(f for f in os.listdir(d) if f.endswith((".array_record", ".json")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ref") / "train")
  _run(d)
  return d


def test_precompute_killed_midway_resumes_byte_identical(reference, tmp_path):
  d = str(tmp_path / "train")
  p = subprocess.Popen([sys.executable, "-m", "tests.faults.precompute_worker", d], cwd=ROOT,
                       env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 900
  while time.time() < deadline and p.poll() is None:     # kill once the first shard is done
    if os.path.isdir(d) and any(f.endswith(".done.json") for f in os.listdir(d)):
      p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert p.wait() == -signal.SIGKILL, "the worker finished before it could be killed"
  assert "manifest.json" not in os.listdir(d)            # an unfinished store is not readable
  with pytest.raises(fst.FeatureStoreError):
    fsr.open_store(d)
  _run(d)                                                # resume
  assert not any(f.endswith(".tmp") for f in os.listdir(d))
  assert _shards(d) == _shards(reference)
  for f in _shards(reference):
    assert open(os.path.join(d, f), "rb").read() == open(os.path.join(reference, f), "rb").read(), f


def test_truncated_shard_named_on_open(reference, tmp_path):
  import shutil
  d = str(tmp_path / "train")
  shutil.copytree(reference, d)
  shard = sorted(f for f in os.listdir(d) if f.endswith(".array_record"))[3]
  with open(os.path.join(d, shard), "r+b") as fh:
    fh.truncate(os.path.getsize(os.path.join(d, shard)) // 2)
  with pytest.raises(fst.FeatureStoreError, match=shard.split(".")[0]):
    fsr.open_store(d)
