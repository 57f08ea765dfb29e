"""Every training kind resumes after kill -9 with identical parameters and data order.

For each kind (diffusion, compressor, the three LA-INR tasks, GLoD's scenes
generator and the demo's encoder, compressor and REGLUE stages) a subprocess
runs the kind's tiny config (``tests/every_kind.py``) and is SIGKILLed after a
step between two checkpoints of one job; the same command then resumes to the
end in this process.  The killed job's final checkpoint must equal, bit for
bit, that of an unbroken run (parameters, optimizer state, EMA) and hold the
same Grain iterator position.
"""
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from glue_jax import main as main_lib
from glue_jax.train import trainer
from tests import every_kind

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kill_run(kind: str, workdir: str):
  name, step, _ = every_kind.CASES[kind]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(PYTHONPATH=REPO, GLUE_JAX_TEST_KILL_AT=f"{name}:{step}")
  return subprocess.run([sys.executable, "-m", "tests.every_kind", kind, workdir], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)


@functools.lru_cache(maxsize=None)
def _unbroken(family: str, root: str) -> str:
  """One unbroken run per config family (the demo's three cases share one)."""
  wd = os.path.join(root, "unbroken", family)
  main_lib.run(every_kind.config(family, wd), wd)
  return wd


def _final(workdir: str, ckpt: str):
  state, _ = trainer.latest_state(os.path.join(workdir, os.path.dirname(ckpt)))
  d = os.path.join(workdir, ckpt)
  step = max(int(s) for s in os.listdir(d) if s.isdigit())
  it = os.path.join(d, str(step), "data_iter")
  order = {f: open(os.path.join(it, f)).read() for f in sorted(os.listdir(it))
           if f.startswith("process_")}
  return step, state, order


@pytest.mark.parametrize("kind", sorted(every_kind.CASES))
def test_kill_and_resume_equals_unbroken_run(kind, tmp_path_factory):
  root = str(tmp_path_factory.getbasetemp() / "every_kind")
  family = "demo_reglue" if kind.startswith("demo") else kind
  straight = _unbroken(family, root)
  wd = os.path.join(root, "killed", kind)
  r = _kill_run(kind, wd)
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  name, step, ckpt = every_kind.CASES[kind]
  saved = [int(s) for s in os.listdir(os.path.join(wd, ckpt)) if s.isdigit()]
  assert saved and max(saved) < step, saved         # killed between two checkpoints
  main_lib.run(every_kind.config(kind, wd), wd)     # resumes to the end
  sa, a, order_a = _final(straight, ckpt)
  sb, b, order_b = _final(wd, ckpt)
  assert sa == sb
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert order_a == order_b                          # same data position
