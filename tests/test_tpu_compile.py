"""The tiny config's train step compiles for a small TPU topology (libtpu,
no TPU): bench/tpu_compile.py in a subprocess, so this process keeps its CPU
backend and TPU compilation cannot silently break."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_train_step_compiles_for_tpu(tmp_path):
  out = tmp_path / "tpu_compile_tiny.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")   # host work on CPU; XLA:TPU via libtpu
  r = subprocess.run(
      [sys.executable, "bench/tpu_compile.py", "--tiny", "--topologies", "v5e:2x2",
       "--batch", "8", "--no-sampler", "--no-precompute", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  rows = json.loads(out.read_text())["results"]
  assert len(rows) == 1
  row = rows[0]
  assert row["chips"] == 4 and row["chip"] == "TPU v5e"
  assert row["mesh"] == {"data": 1, "fsdp": 4}       # the v5e preset of glue_jax/configs/reglue.py
  assert row["remat"] == "full" and row["scan"] is False
  assert 0 < row["peak_gib"] < row["hbm_gib"] and row["fits"]
  assert row["xla_flops_per_device"] > 0 and row["model_flops_per_step"] > 0


def test_tiny_sampler_step_is_two_forwards(tmp_path):
  """The sampler executable holds the scan body and the last (mean) step, both guided:
  per step, XLA's FLOP count is two forwards (CFG doubles the batch)."""
  out = tmp_path / "tpu_compile_sampler.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "bench/tpu_compile.py", "--tiny", "--no-train", "--sampler", "v5e:2x2",
       "--sampler-steps", "6", "--batch", "8", "--no-precompute", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  fwd, smp = json.loads(out.read_text())["results"]
  assert smp["steps_in_executable"] == 2
  # 2 forwards of the network plus the sampler's elementwise update: within 10% of 2.
  assert 1.9 < smp["step_over_forward_flops"] < 2.2, smp["step_over_forward_flops"]
