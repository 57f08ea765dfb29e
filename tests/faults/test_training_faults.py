"""Fault injection on the trainer: crashes, torn/corrupt checkpoints, failing
writes, bad numbers, a workdir in use.

For each fault the run either resumes and ends with exactly the parameters
and data order of an uninterrupted run, or stops with a message naming what
is at fault; earlier checkpoints are never damaged.
"""
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from glue_jax.train import checkpoint as ckpt_lib
from glue_jax import diffusion_job
from tests import train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  return train_utils.write_features(str(tmp_path_factory.mktemp("f") / "train.npz"))


@pytest.fixture(scope="module")
def straight(features, tmp_path_factory):
  """The uninterrupted reference run (checkpoints at 3 and 6)."""
  wd = str(tmp_path_factory.mktemp("straight"))
  diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)
  return wd


def _worker(features, workdir, overrides, fsize_limit=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["PYTHONPATH"] = ROOT
  cmd = [sys.executable, "-m", "tests.faults.worker", features, workdir,
         json.dumps({"train.steps": STEPS, **overrides})]
  if fsize_limit:
    cmd.append(str(fsize_limit))
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _final(workdir):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ck.latest_step()
  r = ck.restore(step, state=ck.abstract_item(step, "state"), ema=ck.abstract_item(step, "ema"))
  ck.close()
  return step, {**r["state"], "ema": r["ema"]}


def _iter_state(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step), "data_iter")
  return {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d))
          if f.startswith("process_")}


def _assert_same_as_straight(straight, workdir):
  sa, a = _final(straight)
  sb, b = _final(workdir)
  assert sa == sb == STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _iter_state(straight, STEPS) == _iter_state(workdir, STEPS)


def _tree_digest(path):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for f in sorted(files):
      h.update(os.path.relpath(os.path.join(root, f), path).encode())
      h.update(open(os.path.join(root, f), "rb").read())
  return h.hexdigest()


def test_kill_at_random_step_then_resume(features, straight, tmp_path):
  k = int(np.random.default_rng(7).integers(4, STEPS))   # between checkpoints 3 and 6
  wd = str(tmp_path / "run")
  r = _worker(features, wd, {"debug.kill_at_step": k})
  assert r.returncode == -9, r.stderr[-2000:]
  # the async write of step 3 may or may not have committed before the kill;
  # either way only committed steps are visible
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).all_steps() in ([], [3])
  diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)
  _assert_same_as_straight(straight, wd)


def test_kill_during_checkpoint_write_then_resume(features, straight, tmp_path):
  wd = str(tmp_path / "run")
  r = _worker(features, wd, {"debug.kill_during_checkpoint": STEPS})
  assert r.returncode == -9, r.stderr[-2000:]
  good = os.path.join(wd, "checkpoints", "3")
  steps = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).all_steps()
  assert set(steps) <= {3, STEPS}                      # only committed steps are visible
  digest = _tree_digest(good) if 3 in steps else None
  diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)
  _assert_same_as_straight(straight, wd)
  if digest:
    assert _tree_digest(good) == digest                # the earlier checkpoint is untouched


@pytest.mark.parametrize("damage", ["truncate_state", "delete_ema", "garbage_config"])
def test_corrupt_latest_checkpoint_falls_back_to_last_good(features, straight, tmp_path,
                                                           damage):
  wd = str(tmp_path / "run")
  diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)
  ck_dir = os.path.join(wd, "checkpoints")
  digest = _tree_digest(os.path.join(ck_dir, "3"))
  bad = os.path.join(ck_dir, str(STEPS))
  if damage == "truncate_state":
    for root, _, files in os.walk(os.path.join(bad, "state")):
      for f in files:
        p = os.path.join(root, f)
        if os.path.getsize(p) > 64:
          with open(p, "r+b") as fh:
            fh.truncate(os.path.getsize(p) // 2)
  elif damage == "delete_ema":
    import shutil
    shutil.rmtree(os.path.join(bad, "ema"))
  else:
    with open(os.path.join(bad, "config", "metadata"), "w") as fh:
      fh.write("{not json")
  out = diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)  # resumes from 3
  assert out["step"] == STEPS
  _assert_same_as_straight(straight, wd)
  assert _tree_digest(os.path.join(ck_dir, "3")) == digest
  q = os.path.join(wd, "checkpoints.quarantine")
  moved = os.listdir(q)
  assert len(moved) == 1 and moved[0].startswith(f"{STEPS}-")
  assert open(os.path.join(q, moved[0], "REASON.txt")).read()   # the reason is recorded


def test_no_readable_checkpoint_is_an_error_naming_each_step(features, tmp_path):
  """Checkpoints exist but none restores: stop with every step and its one-line
  reason (no silent restart from step 0); allow_fresh_start starts over."""
  import re
  wd = str(tmp_path / "run")
  diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)
  ck_dir = os.path.join(wd, "checkpoints")
  for step in (3, STEPS):
    with open(os.path.join(ck_dir, str(step), "config", "metadata"), "w") as fh:
      fh.write("{not json")
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)
  msg = str(err.value)
  assert "no checkpoint could be restored" in msg and "allow_fresh_start" in msg, msg
  for step in (3, STEPS):
    assert re.search(rf"^  step {step}: config: .*metadata", msg, re.M), msg
  cfg = train_utils.tiny_config(features, steps=STEPS)
  cfg.checkpoint.allow_fresh_start = True
  assert diffusion_job.train(cfg, wd)["step"] == STEPS


def test_failing_write_stops_clearly_and_keeps_earlier_checkpoints(features, straight,
                                                                   tmp_path):
  wd = str(tmp_path / "run")
  diffusion_job.train(train_utils.tiny_config(features, steps=3), wd)
  digest = _tree_digest(os.path.join(wd, "checkpoints", "3"))
  r = _worker(features, wd, {}, fsize_limit=16 * 1024)    # every file capped at 16 KiB
  assert r.returncode not in (0, -9), r.stderr[-3000:]
  assert "checkpoint step 6" in r.stderr or "checkpoint write" in r.stderr, r.stderr[-3000:]
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).all_steps() == [3]
  assert _tree_digest(os.path.join(wd, "checkpoints", "3")) == digest
  diffusion_job.train(train_utils.tiny_config(features, steps=STEPS), wd)   # space again: resumes
  _assert_same_as_straight(straight, wd)


@pytest.mark.parametrize("key,value", [("latents", np.nan), ("cls", np.inf)])
def test_non_finite_batch_stops_with_step_named(features, tmp_path, key, value):
  bad = str(tmp_path / "bad.npz")
  with np.load(features) as f:
    arrays = {k: f[k].copy() for k in f.files}
  arrays[key][:] = value
  np.savez(bad, **arrays)
  wd = str(tmp_path / "run")
  with pytest.raises(diffusion_job.NonFiniteLossError, match="step 0"):
    diffusion_job.train(train_utils.tiny_config(bad, steps=4), wd)
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).latest_step() is None


def test_non_finite_names_terms_and_records_then_exclude_skips_them(features, tmp_path):
  """One corrupt record: the error names the step, the non-finite loss terms
  and the data positions of that batch; excluding them, the run completes."""
  import re
  bad = str(tmp_path / "one_bad.npz")
  with np.load(features) as f:
    arrays = {k: f[k].copy() for k in f.files}
  arrays["cls"][13] = np.nan                         # record 13's [CLS] target
  np.savez(bad, **arrays)
  wd = str(tmp_path / "run")
  cfg = train_utils.tiny_config(bad, steps=16)
  with pytest.raises(diffusion_job.NonFiniteLossError) as err:
    diffusion_job.train(cfg, wd)
  msg = str(err.value)
  assert re.search(r"at step \d+ \(non-finite: .*global.*loss", msg), msg
  assert "13" in re.search(r"batch on process 0: \[([^\]]*)\]", msg).group(1).split(", "), msg
  assert "data.exclude" in msg
  cfg.data.exclude = (13,)
  out = diffusion_job.train(cfg, str(tmp_path / "skipped"))
  assert out["step"] == 16 and np.isfinite(out["loss"])


def test_workdir_in_use_is_a_clear_error(features, tmp_path):
  wd = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, %r)\n"
      "from glue_jax.train.checkpoint import WorkdirLock\n"
      "l = WorkdirLock(%r).acquire(); print('locked', flush=True); time.sleep(600)")
      % (ROOT, wd)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ckpt_lib.WorkdirInUseError, match=f"pid {holder.pid}"):
      diffusion_job.train(train_utils.tiny_config(features, steps=3), wd)
  finally:
    holder.kill()
    holder.wait()
  out = diffusion_job.train(train_utils.tiny_config(features, steps=3), wd)   # lock died with it
  assert out["step"] == 3
