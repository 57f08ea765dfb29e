"""Multi-process jax.distributed runs on localhost (gloo).

2 and 4 processes x 2 CPU devices (mesh data x fsdp 4, so parameters and the
batch are sharded across processes) train, checkpoint and resume; the per-step
loss curve of both launches equals that of one process on one device fed the
same global batches.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(port, nproc, pid, ndev, features, workdir, steps, mode="resume"):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["PYTHONPATH"] = ROOT
  return subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(port),
                           str(nproc), str(pid), str(ndev), features, workdir, str(steps),
                           mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _collect(procs, timeout):
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      assert p.returncode == 0, out[-3000:]
      results += [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
  finally:
    for p in procs:          # a hung collective must not outlive the test
      if p.poll() is None:
        p.kill()
  return results


@pytest.mark.parametrize("nproc", [2, 4])
def test_processes_fsdp_checkpoint_resume_reproduce_single_process_loss_curve(nproc, tmp_path):
  """N processes x 2 devices (fsdp 4) train 2 steps and checkpoint (each process
  saves its own Grain iterator state), then a second launch resumes to step 4;
  the losses of both launches equal the single-process, single-device curve on
  the same global batches."""
  features = train_utils.write_features(str(tmp_path / "train.npz"))
  steps, half = 4, 2
  wd = str(tmp_path / "dist")
  port = _free_port()
  procs = [_start(port, nproc, i, 2, features, wd, half, "curve") for i in range(nproc)]
  procs.append(_start(0, 1, 0, 1, features, str(tmp_path / "ref"), steps,
                      f"curve_ref:{nproc}"))
  results = _collect(procs, timeout=600)
  first = [r for r in results if r["processes"] == nproc]
  ref = [r for r in results if r["processes"] == 1]
  assert sorted(r["process"] for r in first) == list(range(nproc))
  assert all(r["devices"] == 2 * nproc and r["step"] == half for r in first)
  iter_state = os.listdir(os.path.join(wd, "checkpoints", str(half), "data_iter"))
  for i in range(nproc):
    assert any(f"process_{i}-of-{nproc}" in f for f in iter_state), iter_state
  port = _free_port()
  second = _collect([_start(port, nproc, i, 2, features, wd, steps, "curve")
                     for i in range(nproc)], timeout=600)
  assert sorted(r["process"] for r in second) == list(range(nproc))
  assert all(r["step"] == steps for r in second)
  assert os.path.isdir(os.path.join(wd, "checkpoints", str(steps)))
  assert len(ref) == 1 and ref[0]["devices"] == 1
  want = np.array([ref[0]["losses"][str(s)] for s in range(1, steps + 1)])
  assert np.all(np.isfinite(want)) and np.ptp(want) > 1e-3    # a curve, not a constant
  for a, b in zip(sorted(first, key=lambda r: r["process"]),
                  sorted(second, key=lambda r: r["process"])):
    assert set(a["losses"]) == {"1", "2"} and set(b["losses"]) == {"3", "4"}, (a, b)
    got = np.array([{**a["losses"], **b["losses"]}[str(s)] for s in range(1, steps + 1)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6,
                               err_msg=f"process {a['process']} of {nproc}")
