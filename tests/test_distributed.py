"""A 2-process jax.distributed run on localhost (gloo): trains, checkpoints, resumes."""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests import train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(nproc, ndev, features, workdir, steps, timeout=420):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["PYTHONPATH"] = ROOT
  procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(port),
                             str(nproc), str(i), str(ndev), features, workdir, str(steps)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(nproc)]
  results, logs = [], []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      logs.append(out)
      assert p.returncode == 0, out[-3000:]
      results += [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
  finally:
    for p in procs:          # a hung collective must not outlive the test
      if p.poll() is None:
        p.kill()
  return results


def test_two_processes_train_checkpoint_resume(tmp_path):
  features = train_utils.write_features(str(tmp_path / "train.npz"))
  wd = str(tmp_path / "run")
  first = _launch(2, 2, features, wd, steps=3)
  assert sorted(r["process"] for r in first) == [0, 1]
  assert all(r["devices"] == 4 and r["step"] == 3 for r in first)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))
  iter_state = os.listdir(os.path.join(wd, "checkpoints", "3", "data_iter"))
  assert any("process_1-of-2" in f for f in iter_state), iter_state
  second = _launch(2, 2, features, wd, steps=5)
  assert all(r["step"] == 5 for r in second)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "5"))
