"""bench/gpu_run.py --dry-run: every section runs at tiny shapes on CPU, with
grain / clu / ml_collections / TFDS made unimportable (the lent GPU machine
has none of them)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("grain", "clu", "ml_collections", "tensorflow_datasets", "tensorflow")

_RUNNER = """
import importlib.abc, runpy, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{{name}} is blocked: the GPU machine does not have it")
    return None

sys.meta_path.insert(0, Block())
sys.argv = ["bench/gpu_run.py"] + {argv!r}
runpy.run_path("bench/gpu_run.py", run_name="__main__")
"""


def test_gpu_run_dry_run_without_grain_clu_ml_collections(tmp_path):
  out = tmp_path / "gpu_run_dry.json"
  argv = ["--dry-run", "--strict", "--budget", "600", "--out", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _RUNNER.format(blocked=BLOCKED, argv=argv)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.loads(out.read_text())
  env_ = res["environment"]
  assert env_["dry_run"] and env_["backend"] == "cpu"
  assert not any(env_[f"{m}_imported"] for m in ("grain", "clu", "ml_collections",
                                                  "tensorflow_datasets"))
  assert res["agreement"]["loss_rel_diff"] < 1e-2
  assert res["agreement"]["update_cosine"] > 0.9
  assert res["attention"]["xla"]["images_per_s"] > 0
  rows = res["train"]
  assert {r["remat"] for r in rows} == {"none", "full"}
  assert all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in rows), rows
  assert rows[0]["loss"] == rows[1]["loss"]          # remat changes memory, not the math
  assert res["sampler"]["sample_s"] > 0 and res["sampler"]["forward_bound_s"] > 0
  p = res["precompute"]
  assert p["images_per_s"] > 0
  assert p["outputs"]["semantic"][-1] == 16 and p["outputs"]["latent_moments"][-1] == 8
  assert res["official"] == {"skipped": "no --official checkout given"}
